"""The README's "Install as a system service", run as written on this machine (Debian, root), in a
private mount namespace so that nothing it installs stays: a copy of /etc is bound over /etc and
/opt, /run, /var/lib, /usr/lib/sysusers.d and /usr/lib/tmpfiles.d are fresh tmpfs.

The block's own commands run unchanged (the venv under /opt/aund with `pip install .`, the
/usr/local/bin link, the unit files, systemd-sysusers, systemd-tmpfiles, the seed made 0600);
`$EDITOR` is a script writing a config for the test devnet, and `systemctl enable --now` (there
is no systemd PID 1 here) is replaced by starting the installed unit's `ExecStart=` the way
systemd would: as its `User=`/`Group=`, with its `Environment=`, `StateDirectory=` and
`LoadCredential=` (the seed in `$CREDENTIALS_DIRECTORY`), after `systemd-analyze verify` of the
installed units. Then, as a person would: `aund status`, `aund health` (exit 0) and an app (with
the installed client_stub) that registers an AID and round-trips through the daemon.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(420)


def _install_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Install as a system service"):]
    section = section[:section.index("\n### ", 5)]
    return re.search(r"^```sh\n(.*?)^```", section, flags=re.S | re.M).group(1)


def _unit(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_readme_install_gives_a_running_service_and_a_working_app(devnet, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the install test runs as root (the CI does)", pytrace=False)
    for tool in ("unshare", "systemd-sysusers", "systemd-tmpfiles", "systemd-analyze", "setpriv"):
        assert shutil.which(tool), f"{tool} is missing (Debian packages systemd, util-linux: ./dev test installs them)"
    block = _install_block()
    assert "systemctl enable --now aund.socket aund.service" in block and "$EDITOR /etc/aund/aund.toml" in block
    unit = _unit(ROOT / "systemd" / "aund.service")
    exec_start = unit["ExecStart"][0]
    user, group = unit["User"][0], unit["Group"][0]
    cred_name, _, cred_path = unit["LoadCredential"][0].partition(":")
    env = dict(e.split("=", 1) for e in unit.get("Environment", []))
    state_dir = f"/var/lib/{unit['StateDirectory'][0]}"
    assert env.get("AUND_STATE_DIR") == state_dir

    editor = tmp_path / "editor"
    editor.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        cp {shlex.quote(str(devnet.root_ca))} /etc/aund/devnet-root.pem && chmod 0644 /etc/aund/devnet-root.pem
        cat > "$1" <<'EOF'
        gateway_url = ["{devnet.gateway_url}"]
        root_ca = ["/etc/aund/devnet-root.pem"]
        socket = "/run/aund/aund.sock"
        EOF
        """))
    editor.chmod(0o755)
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""\
        import json, os
        from client_stub import Client
        aid = "install-{os.getpid() % 100000}.aid.test"
        with Client("/run/aund/aund.sock", app="install-check", timeout=30) as c:
            c.ensure_identity(aid)
            with c.session(aid) as s:
                s.wait_ready(30)
                print(json.dumps({{"app": "ok", "ping": isinstance(s.call("meta.ping", {{}}), dict)}}))
        """))
    run_unit = f"""
install -d -o {user} -g {group} -m 0700 {state_dir}
creds=$(mktemp -d) && install -m 0400 -o {user} {cred_path} "$creds/{cred_name}" && chown {user}:{group} "$creds" && chmod 0500 "$creds"
systemd-analyze verify /etc/systemd/system/aund.service /etc/systemd/system/aund.socket
( cd / && exec env -i PATH=/usr/bin:/bin {' '.join(f'{k}={v}' for k, v in env.items())} CREDENTIALS_DIRECTORY="$creds" \\
    setpriv --reuid={user} --regid={group} --init-groups --inh-caps=-all {exec_start} ) > {tmp_path}/daemon.log 2>&1 &
pid=$!
for i in $(seq 1 150); do [ -S /run/aund/aund.sock ] && aund health >/dev/null 2>&1 && break; sleep 0.2; done
echo "{{\\"seed_mode\\": \\"$(stat -c %a {cred_path})\\", \\"state_owner\\": \\"$(stat -c %U:%a {state_dir})\\"}}"
aund status --json > {tmp_path}/status.json 2> {tmp_path}/status.err; echo "{{\\"status_rc\\": $?}}"
aund health >/dev/null; echo "{{\\"health_rc\\": $?}}"
/opt/aund/bin/python {app}
kill -TERM $pid; wait $pid; echo "{{\\"daemon_rc\\": $?}}"
"""
    script = ("set -e\n"
              "cp -a /etc {tmp}/etc && mount --bind {tmp}/etc /etc\n"
              "for d in /opt /run /var/lib /usr/lib/sysusers.d /usr/lib/tmpfiles.d; do mount -t tmpfs -o mode=0755 tmpfs $d; done\n"
              "export EDITOR={editor}\n"
              "cd {root}\n"
              "{block}\n"
              "set +e\n"
              "{run_unit}\n").format(tmp=tmp_path, editor=editor, root=ROOT,
                                     block=block.replace("systemctl enable --now aund.socket aund.service", "true"),
                                     run_unit=run_unit)
    (tmp_path / "install.sh").write_text(script)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(tmp_path / "install.sh")],
                          capture_output=True, text=True, timeout=400)
    lines = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    log = (tmp_path / "daemon.log").read_text() if (tmp_path / "daemon.log").exists() else ""
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:], log[-2000:])
    assert lines.get("seed_mode") == "600" and lines.get("state_owner") == f"{user}:700", lines
    err = (tmp_path / "status.err").read_text() if (tmp_path / "status.err").exists() else ""
    assert lines.get("status_rc") == 0 and lines.get("health_rc") == 0, (lines, err, log[-2000:])
    assert lines.get("app") == "ok" and lines.get("ping") is True, (lines, proc.stderr[-2000:], log[-2000:])
    assert lines.get("daemon_rc") == 0, (lines, log[-2000:])
    status = json.loads((tmp_path / "status.json").read_text())
    assert status.get("daemon_version"), status
    # nothing of it stayed outside the namespace
    assert not os.path.exists("/opt/aund") and not os.path.exists("/etc/aund/aund.toml")
