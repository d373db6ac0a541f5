"""Shared verbs of the system tests: a config file, an `aund run` process, app processes
(``tests.system.apps``) and the fastaun flood driver (``tests/system/fastaun_flood.py``).

Everything is a real process talking over real sockets; see tests/conftest.py for the rules.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, AundProcess, DevnetProcess

FLOOD_DRIVER = ROOT / "tests" / "system" / "fastaun_flood.py"
NOGROUP = 65534


@contextlib.contextmanager
def group_socket_dir(gid: int = NOGROUP) -> Iterator[Path]:
    """The socket path inside a directory made as an admin makes one for a system service (root
    only): root:`gid`, mode 2750 under /tmp, so that members of `gid` (by primary group) can reach
    the daemon's 0660 socket, whose group the setgid bit makes `gid` too, and nobody else can.
    Removed afterwards."""
    sock_dir = Path(tempfile.mkdtemp(prefix="aund-uid-", dir="/tmp"))
    try:
        os.chown(sock_dir, 0, gid)
        os.chmod(sock_dir, 0o2750)
        yield sock_dir / "aund.sock"
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@contextlib.contextmanager
def shared_work_dir() -> Iterator[Path]:
    """A directory under /tmp that apps under any uid can write to (for ready/go files)."""
    work = Path(tempfile.mkdtemp(prefix="aund-work-", dir="/tmp"))
    try:
        os.chmod(work, 0o777)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def aid(name: str) -> str:
    """A reserved test AID, unique per test process."""
    return f"{name}-{os.getpid() % 100000}.aid.test"


def write_config(path: Path, devnet: DevnetProcess, aids: Iterable[str],
                 policy: Mapping[str, Mapping[str, list[Any]]] | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """The config file; `extra`: more top-level keys (numbers or strings), or tables (a dict, e.g.
    `{"limits": {"stall_timeout": 3.0}}`)."""
    lines = [f'gateway_url = ["{devnet.gateway_url}"]', f'root_ca = ["{devnet.root_ca}"]',
             "identities = [" + ", ".join(f'"{a}"' for a in aids) + "]"]
    extra = dict(extra or {})
    tables = {key: extra.pop(key) for key in list(extra) if isinstance(extra[key], Mapping)}
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    for key, table in tables.items():
        lines.append(f"[{key}]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in table.items()]
    for key, rule in (policy or {}).items():
        lines.append(f'[policy."{key}"]')
        lines += [f"{name} = {json.dumps(list(values))}" for name, values in rule.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_aund(tmp: Path, devnet: DevnetProcess, aids: Iterable[str], *, socket: Path | None = None,
               policy: Mapping[str, Any] | None = None, name: str = "aund",
               extra: Mapping[str, Any] | None = None) -> AundProcess:
    """`aund run` with its state in tmp/<name>-state and its socket at `socket` (tmp/<name>.sock)."""
    cfg = write_config(tmp / f"{name}.toml", devnet, aids, policy, extra)
    daemon = AundProcess(tmp / f"{name}-state", socket or tmp / f"{name}.sock", cfg)
    daemon.start()
    return daemon


# Run the `aund` CLI under another uid: import everything it needs as root (the interpreter and the
# venv may live where that uid cannot read), drop to uid/gid/groups for good, then run main(argv).
_CLI_AS = """
import importlib, json, os, sys
cfg = json.loads(sys.argv[1])
import client_stub, aund.cli
for name in aund.cli.SUBCOMMANDS:
    importlib.import_module("aund.cli." + name)
os.setgroups(cfg["groups"]); os.setgid(cfg["gid"]); os.setuid(cfg["uid"])
sys.exit(aund.cli.main(cfg["argv"]))
"""


def run_cli_as(uid: int, gid: int, argv: list[str], *, groups: Iterable[int] = (),
               timeout: float = 60) -> subprocess.CompletedProcess:
    """`aund ARGV` as uid/gid (and supplementary `groups`), started as root; output captured."""
    cfg = {"uid": uid, "gid": gid, "groups": list(groups), "argv": argv}
    return subprocess.run([sys.executable, "-c", _CLI_AS, json.dumps(cfg)], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=timeout)


def spawn_app(command: str, cfg: dict[str, Any], log: Path, **popen: Any) -> subprocess.Popen:
    """Start ``python -m tests.system.apps COMMAND cfg`` (stdout: its result line; stderr: `log`)."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "tests.system.apps", command, json.dumps(cfg)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, **popen)


def finish(proc: subprocess.Popen, timeout: float, log: Path | None = None) -> dict[str, Any]:
    """Wait for an app and return its final JSON line (AssertionError with its log if it failed)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"app {proc.args[3]} did not finish in {timeout} s; log:\n{_tail(log)}") from None
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and lines, f"app {proc.args[3]} exited {proc.returncode}; log:\n{_tail(log)}"
    return json.loads(lines[-1])


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


def kill_all(procs: Iterable[subprocess.Popen | None]) -> None:
    """SIGKILL what is still running (only our own children, by handle) and reap it."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
    for proc in procs:
        if proc is not None:
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


def start_flood(devnet: DevnetProcess, work: Path, targets: Iterable[str], n: int | list[int], senders: int,
                go: Path | None = None, log: Path | None = None) -> subprocess.Popen:
    """The fastaun flood driver in its own process (see its docstring). `n`: a count (sent once
    `go` exists, if given), or a list of phase counts (phase p waits for work/go-<p>)."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
               TARGETS=",".join(targets), SENDERS=str(senders))
    if isinstance(n, list):
        env["PHASES"] = ",".join(map(str, n))
    else:
        env["N"] = str(n)
    if go is not None:
        env["GO"] = str(go)
    with open(log or work / "flood.log", "w") as err:
        return subprocess.Popen([sys.executable, str(FLOOD_DRIVER), "flood"], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)


def finish_flood(proc: subprocess.Popen, timeout: float) -> list[dict[str, Any]]:
    """Wait for the flood driver; returns its JSON lines, asserting every check passed."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the fastaun flood did not finish in {timeout} s: {out[-2000:]}") from None
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    failed = [c for c in lines if "check" in c and not c["ok"]]
    assert proc.returncode == 0 and not failed, f"fastaun flood failed (rc={proc.returncode}): {failed or lines}"
    return lines


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {path.name}"
        time.sleep(0.02)


def strictly_increasing(values: list[Any]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def by_key(rows: Iterable[dict[str, Any]], key: str, value: str) -> dict[Any, list[Any]]:
    """{row[key]: [row[value], ...]} in row order."""
    out: dict[Any, list[Any]] = {}
    for row in rows:
        out.setdefault(row[key], []).append(row[value])
    return out


def others(status: dict[str, Any], *keep: str) -> list[dict[str, Any]]:
    """The connected apps in `status`, except those named in `keep` (e.g. the test's own monitor)."""
    return [a for a in status["broker"]["apps"] if a["app"] not in keep]


def released(status: dict[str, Any], *keep: str) -> bool:
    """Nothing of the apps that left is held: no other app, no call in flight or waiting, no
    budget token in use, and no link held by anyone."""
    b = status["broker"]
    return (not others(status, *keep) and b["calls_in_flight"] == 0 and b["calls_waiting"] == 0
            and status["budget"]["in_use"] == 0 and all(link["holders"] == 0 for link in status["links"]))
