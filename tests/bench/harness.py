"""Bench plumbing: statistics, /proc readers, worker subprocesses driven by JSON lines, the bench
environment (one devnet, one aund daemon, identities registered once and reused).

Imports only the stdlib and tests.helpers: the harness process itself never runs trio, asyncio
clients or fastaun (every measured party is its own process, read from /proc).
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, AundProcess, DevnetProcess

BENCH = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SEED = "test-seed-not-secret"          # AundProcess sets AUND_ENCRYPTION_SEED to this
FASTAUN_SEED = "bench"
CACHE_FORMAT = 1                        # bump to invalidate every cached bench state dir


# --- statistics --------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, Any]:
    """Median with min-max over runs (the one shape every figure has)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals),
            "values": [round(v, 6) for v in vals]}


def ratio_runs(a: list[float], b: list[float]) -> list[float]:
    """Per-run ratios a[i]/b[i] (runs were interleaved, so pairs share conditions)."""
    return [x / y for x, y in zip(a, b) if x is not None and y]


# --- /proc --------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages divided among their users); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


# --- workers: subprocesses that answer JSON commands on stdin/stdout ------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """A long-lived measured process (fastaun_worker.py or app_worker.py). One command at a time:
    write one JSON line, read JSON lines until the one answering it."""

    def __init__(self, script: str, env: dict[str, str], name: str, log_dir: Path) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=ROOT,
                                     env=dict(os.environ, **env), bufsize=1)
        self.pid = self.proc.pid
        self.hello: dict[str, Any] | None = None

    def ready(self, timeout: float = 180.0) -> "Worker":
        """Wait for the worker's first line (sent once its imports are done)."""
        if self.hello is None:
            self.hello = self.recv(timeout)
        return self

    def send(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise WorkerError(f"{self.name}: no answer within {timeout} s; stderr: {self.tail()}")
                line = self.proc.stdout.readline()
                if not line:
                    raise WorkerError(f"{self.name} exited ({self.proc.wait()}); stderr: {self.tail()}")
                if line.startswith("{"):
                    msg = json.loads(line)
                    if "error" in msg:
                        raise WorkerError(f"{self.name}: {msg['error']}; stderr: {self.tail()}")
                    return msg
        finally:
            sel.close()

    def call(self, cmd: str, timeout: float = 300.0, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.recv(timeout)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.stderr_path.read_text()[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass
        self._err.close()


# --- the environment ------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aund-bench"


def aid_name(kind: str, i: int) -> str:
    return f"bench-{kind}{i:04d}.aid.test"


@dataclass
class BenchEnv:
    """One devnet and the daemon state, kept in `cache` across bench runs (identities are
    registered once: registering 1,000 AIDs takes a while). Everything runs on loopback."""

    cache: Path
    run_dir: Path
    devnet: DevnetProcess | None = None
    daemons: list[AundProcess] = field(default_factory=list)

    @property
    def devnet_dir(self) -> Path:
        return self.cache / "devnet"

    @property
    def fastaun_dir(self) -> Path:
        return self.cache / "fastaun"

    def prepare(self, fresh: bool) -> None:
        marker = self.cache / "format"
        if fresh or not marker.exists() or marker.read_text().strip() != str(CACHE_FORMAT):
            shutil.rmtree(self.cache, ignore_errors=True)
            self.cache.mkdir(parents=True)
            marker.write_text(str(CACHE_FORMAT))
        for old in self.cache.glob("aund-*.log"):  # AundProcess logs beside the state dirs
            old.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def start_devnet(self) -> DevnetProcess:
        port = 0
        if self.devnet is not None:
            port = self.devnet.port
        self.devnet = DevnetProcess(self.devnet_dir, port=port)
        self.devnet.start(timeout=60)
        return self.devnet

    def write_config(self, path: Path, aids: list[str]) -> Path:
        assert self.devnet is not None
        ids = ", ".join(f'"{a}"' for a in aids)
        path.write_text(f'gateway_url = ["{self.devnet.gateway_url}"]\nroot_ca = ["{self.devnet.root_ca}"]\n'
                        f"identities = [{ids}]\n")
        return path

    def daemon(self, name: str, state: str, aids: list[str], env: dict[str, str] | None = None,
               root: Path | None = None) -> AundProcess:
        """An `aund run` over the cached state dir `state`, keeping `aids` connected (not started yet);
        from the source tree `root` (a baseline) instead of this checkout when given."""
        cfg = self.write_config(self.run_dir / f"{name}.toml", aids)
        sock = self.run_dir / f"{name}.sock"
        d = AundProcess(self.cache / state, sock, cfg, env=dict(env or {}), root=root)
        self.daemons.append(d)
        return d

    def fastaun_env(self) -> dict[str, str]:
        assert self.devnet is not None
        return {"AUN_GW_URL": self.devnet.gateway_url, "AUN_ROOT_CA": self.devnet.root_ca,
                "AUN_WORKDIR": str(self.fastaun_dir), "PYTHONUNBUFFERED": "1"}

    def close(self) -> None:
        for d in self.daemons:
            try:
                d.stop()
            except AssertionError:
                pass
        if self.devnet is not None and self.devnet.proc is not None and self.devnet.proc.poll() is None:
            try:
                self.devnet.stop()
            except AssertionError:
                pass


def daemon_status(sock: Path, links: int | None = None) -> dict[str, Any]:
    """The daemon's `status`; `links`: at most that many per-link entries (0: counts only)."""
    from client_stub import Client

    with Client(sock, app="bench-poll", connect_timeout=5, timeout=30) as c:
        return c.request("status", {} if links is None else {"links": links})


def ready_links(sock: Path) -> tuple[int, int]:
    """(links ready, links known) according to the daemon's status: its `link_counts` (a daemon
    of before the compact status: its list of links). DaemonUnavailable (still starting) is
    (0, 0); any other error is raised."""
    from client_stub import DaemonUnavailable

    try:
        status = daemon_status(sock, links=0)
    except DaemonUnavailable:
        return 0, 0
    counts = status.get("link_counts")
    if counts is not None:
        return counts.get("ready", 0), sum(counts.values())
    links = status["links"]
    return sum(1 for link in links if link["state"] == "ready"), len(links)


def wait_links_ready(sock: Path, n: int, timeout: float, interval: float = 0.2) -> float:
    """Seconds until `n` links are ready (AssertionError on timeout, naming the last error)."""
    t0 = time.monotonic()
    ready, error = 0, ""
    while True:
        try:
            ready, _ = ready_links(sock)
            error = ""
        except Exception as exc:  # noqa: BLE001 - a status that fails is said, not counted as 0 ready
            error = f"{type(exc).__name__}: {exc}"
        if ready >= n:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"only {ready}/{n} links ready after {timeout} s"
                                 + (f" (last status error: {error})" if error else ""))
        time.sleep(interval)


class NotifySocket:
    """A fake systemd NOTIFY_SOCKET (datagrams), as tests/integration/test_systemd.py uses."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_for(self, word: str, timeout: float) -> float | None:
        """time.monotonic() when a datagram containing the line `word` arrived, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            if word in data.decode(errors="replace").split("\n"):
                return time.monotonic()
        return None

    def close(self) -> None:
        self.sock.close()


def kill_quietly(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def start_nowait(d: AundProcess) -> None:
    """AundProcess.start without waiting (for timing READY on a NOTIFY_SOCKET from the spawn on)."""
    args = [sys.executable, "-m", "aund", "run", "--state-dir", str(d.state_dir), "--socket", str(d.socket)]
    if d.config_file:
        args += ["--config", str(d.config_file)]
    env = dict(os.environ, AUND_ENCRYPTION_SEED=SEED, **d.env)
    env.pop("AUND_CONFIG", None)
    if d.root is not None:
        env["PYTHONPATH"] = str(d.root)
    d.log_path = d.state_dir.parent / f"aund-{int(time.time() * 1000)}.log"
    with open(d.log_path, "w") as log:
        d.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, cwd=d.root or ROOT, env=env)


def export_baseline(rev: str, cache: Path) -> tuple[Path, str]:
    """The source tree (aund/, client_stub/) of git revision `rev`, exported once into the cache:
    (its directory, its short commit). Its daemon and apps run from there (`python -m aund` with
    that directory first on the path), against this checkout's devnet and with this venv's packages."""
    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"--baseline {rev}: git {' '.join(a)} failed: {done.stderr.strip()[-300:]}")
        return done.stdout.strip()
    commit = git("rev-parse", "--short", f"{rev}^{{commit}}")
    tree = cache / "baseline" / commit
    if not (tree / "aund" / "__main__.py").exists():
        tmp = tree.with_name(commit + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "aund", "client_stub"], cwd=ROOT,
                                 capture_output=True, timeout=120, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True, timeout=120)
        tmp.rename(tree)
    return tree, commit


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "aund", "client_stub"))}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem / 2**30, 1),
            "python": sys.version.split()[0], "kernel": os.uname().release}
