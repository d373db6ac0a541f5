"""Harness verbs shared by the integration and interop tests: spawn, wait for ready, stop."""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"^aund devnet ready gateway=(wss?://([0-9.]+):(\d+)/aun) root_ca=(/\S+)$")


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """One line of the process's stdout, or AssertionError once the deadline passes."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"process exited early with {proc.wait()}")
                return line.rstrip("\n")
        raise AssertionError("timed out waiting for a line from the process")
    finally:
        sel.close()


@dataclass
class DevnetProcess:
    state_dir: Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    gateway_url: str = ""
    root_ca: str = ""

    host: str = "127.0.0.1"
    wrap: Any = None            # e.g. tests.netsim.NetSim.wrap: run inside a private name space
    env: dict[str, str] | None = None

    @property
    def http_url(self) -> str:
        return f"{'https' if self.gateway_url.startswith('wss') else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Spawn the devnet (on the same port as before, after a restart) and wait for its ready line."""
        args = [sys.executable, "-m", "aund", "devnet", "--state-dir", str(self.state_dir),
                "--listen", f"{self.host}:{self.port}", *self.extra_args]
        self.proc = subprocess.Popen(self.wrap(args) if self.wrap else args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=self.env)
        line = read_line(self.proc, time.monotonic() + timeout)
        m = READY_RE.match(line)
        assert m, f"unexpected first line: {line!r}"
        self.gateway_url, self.port, self.root_ca = m.group(1), int(m.group(3)), m.group(4)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._close_pipes()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code (tests assert 0)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("devnet did not stop within the grace period after SIGTERM") from None
        finally:
            self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.http_url + "/devnet/stats", timeout=5) as r:
            return json.loads(r.read())

    def push_event(self, aid: str, event: str, params: Any) -> dict[str, Any]:
        """Have the devnet push `event/{event}` with `params` (as they are) to the AID's long connections."""
        body = json.dumps({"aid": aid, "event": event, "params": params}).encode()
        req = urllib.request.Request(self.http_url + "/devnet/push", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def set_faults(self, **knobs: Any) -> dict[str, Any]:
        req = urllib.request.Request(self.http_url + "/devnet/faults", data=json.dumps(knobs).encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


def run_fastaun(scenario: str, devnet: DevnetProcess, workdir: Path, timeout: float = 120.0,
                driver: str = "fastaun_driver.py", **env: str) -> list[dict[str, Any]]:
    """Run one scenario of a fastaun driver (tests/interop/`driver`) in a subprocess; returns its
    output lines, asserting that every check passed."""
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca,
                    AUN_WORKDIR=str(workdir), **env)
    driver = ROOT / "tests" / "interop" / driver
    done = subprocess.run([sys.executable, str(driver), scenario], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    checks = [x for x in lines if "check" in x]
    failed = [c for c in checks if not c["ok"]]
    assert done.returncode == 0 and not failed and checks, (
        f"fastaun {driver.name} scenario {scenario} failed (rc={done.returncode}): {failed or checks}\n"
        f"stderr tail:\n{done.stderr[-3000:]}")
    return lines


@dataclass
class AundProcess:
    """A real `aund run` process; its JSON-lines log (stderr) is read for `daemon.started`."""

    state_dir: Path
    socket: Path
    config_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    wrap: Any = None            # argv -> argv, e.g. another uid or umask (tests/hostile/common.py)
    root: Path | None = None    # another source tree to run (`python -m aund` from there), e.g. a bench baseline

    def start(self, timeout: float = 30.0) -> None:
        args = [sys.executable, "-m", "aund", "run", "--state-dir", str(self.state_dir), "--socket", str(self.socket)]
        if self.config_file:
            args += ["--config", str(self.config_file)]
        args += self.extra_args
        env = {**os.environ, "AUND_ENCRYPTION_SEED": "test-seed-not-secret", **self.env}
        env.pop("AUND_CONFIG", None)
        if self.root is not None:
            env["PYTHONPATH"] = str(self.root)
        self.log_path = self.state_dir.parent / f"aund-{int(time.time() * 1000)}.log"
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.wrap(args) if self.wrap else args, stdout=subprocess.DEVNULL,
                                     stderr=log, cwd=self.root or ROOT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == "daemon.started" for e in self.log_events()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"aund exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError("aund did not start in time")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("aund did not stop within the grace period after SIGTERM") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
