"""`aund aid import` of an identity the official SDK registered.

- The README's command works as written (aund's seed from `--seed-file`, none in the environment),
  and the imported identity comes online in the daemon.
- Run as root into the state dir of a daemon that runs as its own user (as aund.service does), the
  import leaves nothing root-owned behind, so that daemon lists the identity and `status`,
  `health` and `aid list` keep working for root and for the daemon's user.
- An AID directory the daemon cannot read (root's, 0700: what older imports left) breaks none of
  those commands; health names it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client_stub import Client
from tests.helpers import ROOT, AundProcess, run_fastaun
from tests.hostile.common import as_user, aund_cli, daemon_user, mode, require_root, shared_dir, user_daemon
from tests.system.harness import write_config

pytestmark = pytest.mark.timeout(120)
SDK_SEED = "t"  # the seed tests/interop/fastaun_common.py gives the SDK's AIDStore


def _sdk_identity(devnet, work: Path) -> tuple[str, Path]:
    run_fastaun("register_only", devnet, work, timeout=60)
    return json.loads((work / "ids.json").read_text())["imported"], work / "imported"


def _readme_import_command() -> str:
    """The README's `aund aid import` command (its continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^(AUND_IMPORT_SEED=.*aund aid import(?:.*\\\n)*.*)$", text, re.MULTILINE)
    assert m, "no aund aid import command in the README"
    return m.group(1).replace("\\\n", " ")


def test_readme_import_command_works_with_the_seed_file(devnet, tmp_path):
    aid, aun_path = _sdk_identity(devnet, tmp_path / "sdk")
    seed = "import-seed-" + secrets.token_hex(8)
    seed_file = tmp_path / "encryption_seed"
    seed_file.write_text(seed + "\n")
    seed_file.chmod(0o600)
    state = tmp_path / "state"
    words = shlex.split(_readme_import_command())  # aund's seed: only where the README says (no env)
    subst = {"alice.aid.test": aid, "~/.aun/myapp": str(aun_path), "/var/lib/aund": str(state),
             "/etc/aund/encryption_seed": str(seed_file), "AUND_IMPORT_SEED=<the SDK seed>": f"AUND_IMPORT_SEED={SDK_SEED}"}
    words = [subst.get(w, w) for w in words]
    i = words.index("aund")
    argv = [*words[:i], sys.executable, "-m", "aund", *words[i + 1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("AUND_ENCRYPTION_SEED", "AUND_CONFIG", "CREDENTIALS_DIRECTORY")}
    done = subprocess.run(["sh", "-c", 'umask 022 && exec env "$@"', "sh", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=30)  # by hand, in a permissive shell
    assert done.returncode == 0, (argv, done.stderr)
    assert done.stdout.startswith(f"imported {aid}"), done.stdout
    exposed = {str(p): oct(mode(p)) for p in [state, *state.rglob("*")] if mode(p) & 0o077}
    assert exposed == {}, f"the import left group/world-readable files: {exposed}"

    cfg = write_config(tmp_path / "aund.toml", devnet, [aid])
    daemon = AundProcess(state, tmp_path / "aund.sock", cfg, env={"AUND_ENCRYPTION_SEED": seed})
    daemon.start()
    try:
        with Client(daemon.socket, app="import-test") as client:
            assert aid in [x["aid"] for x in client.list_identities()]
            client.session(aid).wait_ready(15)
            assert client.session(aid).call("meta.status", {})["aid"] == aid
    finally:
        assert daemon.stop() == 0


def _clis(daemon: AundProcess, base: Path, uid: int, gid: int):
    """("root" | "the daemon's user", run `aund ARGS --socket S`) for both of them."""
    for who, wrap in (("root", None), ("the daemon's user", as_user(uid, gid, base))):
        def cli(*args: str, wrap=wrap, who=who) -> subprocess.CompletedProcess:
            argv = [sys.executable, "-m", "aund", *args, "--socket", str(daemon.socket)]
            done = subprocess.run(wrap(argv) if wrap else argv, capture_output=True, text=True, cwd=ROOT,
                                  timeout=20, env={**os.environ, "HOME": str(base)})
            assert "Traceback" not in done.stderr, (who, args, done.stderr)
            return done
        yield who, cli


def _user_config(base: Path, devnet) -> Path:
    shutil.copy(devnet.root_ca, base / "root.crt")
    os.chmod(base / "root.crt", 0o644)
    cfg = base / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{base / "root.crt"}"]\n')
    os.chmod(cfg, 0o644)
    return cfg


def test_root_import_leaves_the_daemon_users_state_dir_usable(devnet, tmp_path):
    require_root("imports as root into the state dir of a daemon run as another uid")
    uid, gid = daemon_user()
    aid, aun_path = _sdk_identity(devnet, tmp_path / "sdk")
    seed = "import-seed-" + secrets.token_hex(8)
    with shared_dir("aund-import-") as base:
        daemon = user_daemon(base, uid, gid, config=_user_config(base, devnet), env={"AUND_ENCRYPTION_SEED": seed})
        daemon.start()  # the service has run before: its state dir is set up, by its user
        assert daemon.stop() == 0

        # `systemctl stop aund`, then the import as root (the seed as aund.service would see it)
        done = aund_cli("aid", "import", aid, "--from", str(aun_path), "--state-dir", str(daemon.state_dir),
                        env={"AUND_IMPORT_SEED": SDK_SEED, "AUND_ENCRYPTION_SEED": seed})
        assert done.returncode == 0, done.stderr
        root_owned = [str(p) for p in [daemon.state_dir, *daemon.state_dir.rglob("*")] if os.lstat(p).st_uid != uid]
        assert root_owned == [], f"the import left files the daemon's user does not own: {root_owned}"

        daemon.start()
        try:
            for who, cli in _clis(daemon, base, uid, gid):
                listed, status, health = cli("aid", "list"), cli("status", "--json"), cli("health")
                assert listed.returncode == 0 and aid in listed.stdout, (who, listed.stdout, listed.stderr)
                assert status.returncode == 0, (who, status.stderr)
                assert json.loads(status.stdout)["identities"] == 1, (who, status.stdout)
                assert health.returncode == 0 and health.stdout.startswith("healthy"), (who, health.stdout,
                                                                                           health.stderr)
            with Client(daemon.socket, app="import-test") as client:
                client.session(aid).wait_ready(15)  # and the imported identity comes online there
        finally:
            assert daemon.stop() == 0


def test_unreadable_aid_directory_breaks_no_command(devnet, tmp_path):
    require_root("makes a root-only AID directory in the state dir of a daemon run as another uid")
    uid, gid = daemon_user()
    with shared_dir("aund-unreadable-") as base:
        daemon = user_daemon(base, uid, gid, config=_user_config(base, devnet),
                             env={"AUND_ENCRYPTION_SEED": "seed-" + secrets.token_hex(6)})
        daemon.start()
        try:
            with Client(daemon.socket, app="import-test") as client:
                mine = f"mine-{secrets.token_hex(3)}.aid.test"
                client.ensure_identity(mine)
                client.session(mine).wait_ready(15)
            stray = daemon.state_dir / "AIDs" / f"stray-{secrets.token_hex(3)}.aid.test"
            stray.mkdir(mode=0o700)  # root's, as `sudo aund aid import` used to leave it
            (stray / "key.enc.json").write_text("{}")
            for who, cli in _clis(daemon, base, uid, gid):
                listed, status, health = cli("aid", "list"), cli("status", "--json"), cli("health", "--json")
                assert listed.returncode == 0 and mine in listed.stdout, (who, listed.stdout, listed.stderr)
                assert status.returncode == 0 and json.loads(status.stdout)["identities"] == 1, (who, status.stderr)
                report = json.loads(health.stdout)
                assert health.returncode == 1, (who, health.stdout, health.stderr)
                named = [r for r in report["reasons"] if r["code"] == "identity.unreadable"]
                assert [r["aid"] for r in named] == [stray.name] and "uid 0" in named[0]["text"], (who, report)
        finally:
            assert daemon.stop() == 0


def test_root_import_gives_away_nothing_outside_the_state_dir(devnet, tmp_path):
    """The state dir belongs to the daemon's user, who may be hostile: root's import must hand over
    only what it created there. A hard link planted in the state dir to a root-owned file elsewhere
    (possible where fs.protected_hardlinks is 0; root makes it here) must stay root's."""
    require_root("imports as root into the state dir of a daemon run as another uid")
    uid, gid = daemon_user()
    aid, aun_path = _sdk_identity(devnet, tmp_path / "sdk")
    seed = "import-seed-" + secrets.token_hex(8)
    with shared_dir("aund-import-") as base:
        daemon = user_daemon(base, uid, gid, config=_user_config(base, devnet), env={"AUND_ENCRYPTION_SEED": seed})
        daemon.start()
        assert daemon.stop() == 0
        precious = base / "root-only.conf"  # stands in for /etc/shadow (same file system)
        precious.write_text("root's\n")
        os.chmod(precious, 0o600)
        os.link(precious, daemon.state_dir / "AIDs" / "planted")
        done = aund_cli("aid", "import", aid, "--from", str(aun_path), "--state-dir", str(daemon.state_dir),
                        env={"AUND_IMPORT_SEED": SDK_SEED, "AUND_ENCRYPTION_SEED": seed})
        assert done.returncode == 0, done.stderr
        st = os.stat(precious)
        assert (st.st_uid, st.st_gid) == (0, 0), f"root's import gave {precious} to uid {st.st_uid}"
        imported = daemon.state_dir / "AIDs" / aid
        assert all(os.lstat(p).st_uid == uid for p in [imported, *imported.rglob("*")])


def test_root_import_writes_nowhere_a_planted_symlink_points(devnet, tmp_path):
    """The daemon's user owns AIDs/ and may plant AIDs/_pending/<aid> as a symlink to a directory
    only root may write (/etc/cron.d, say): root's import must not create its files there."""
    require_root("imports as root into the state dir of a daemon run as another uid")
    uid, gid = daemon_user()
    aid, aun_path = _sdk_identity(devnet, tmp_path / "sdk")
    seed = "import-seed-" + secrets.token_hex(8)
    with shared_dir("aund-import-") as base:
        daemon = user_daemon(base, uid, gid, config=_user_config(base, devnet), env={"AUND_ENCRYPTION_SEED": seed})
        daemon.start()
        assert daemon.stop() == 0
        root_only = base / "root-only.d"
        root_only.mkdir(mode=0o755)
        pending = daemon.state_dir / "AIDs" / "_pending"
        plant = f'mkdir -p -m 0700 "{pending}" && ln -s "{root_only}" "{pending / aid}"'
        subprocess.run(as_user(uid, gid, base)(["sh", "-c", plant]), check=True, timeout=10)  # the daemon's user
        done = aund_cli("aid", "import", aid, "--from", str(aun_path), "--state-dir", str(daemon.state_dir),
                        env={"AUND_IMPORT_SEED": SDK_SEED, "AUND_ENCRYPTION_SEED": seed})
        assert "Traceback" not in done.stderr, done.stderr
        assert sorted(os.listdir(root_only)) == [], f"root's import wrote into {root_only}: {done.stdout}{done.stderr}"
