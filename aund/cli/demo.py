"""`aund demo`: a local AUN network, a daemon and two apps exchanging E2EE messages, in a temp dir
that is removed afterwards (unless --keep). Everything runs on loopback and Unix sockets."""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aund.cli._common import say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="keep the temp dir (state, logs) for a look")
    p.add_argument("--timeout", type=float, default=60.0)


def _say(text: str) -> None:
    say(f"aund demo: {text}", flush=True)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None, stdout=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=stdout or subprocess.DEVNULL,
                            stderr=open(log, "w"), env=env, text=True)


def _stop(proc: subprocess.Popen | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="aund-demo-"))
    devnet = daemon = None
    try:
        devnet = _spawn(["aund", "devnet", "--state-dir", str(tmp / "devnet"), "--listen", "127.0.0.1:0"],
                        tmp / "devnet.log", stdout=subprocess.PIPE)
        line = devnet.stdout.readline().strip()
        if not line.startswith("aund devnet ready"):
            _say(f"the devnet did not start: {(tmp / 'devnet.log').read_text()[-500:]}")
            return 1
        fields = dict(f.split("=", 1) for f in line.split()[3:])
        _say(f"local AUN network at {fields['gateway']} (state in {tmp})")
        sock = tmp / "aund.sock"
        (tmp / "aund.toml").write_text(f'gateway_url = ["{fields["gateway"]}"]\nroot_ca = ["{fields["root_ca"]}"]\n')
        env = dict(os.environ, AUND_ENCRYPTION_SEED=secrets.token_urlsafe(24))  # a throwaway seed
        env.pop("AUND_CONFIG", None)
        daemon = _spawn(["aund", "run", "--config", str(tmp / "aund.toml"), "--state-dir", str(tmp / "aund"),
                         "--socket", str(sock)], tmp / "aund.log", env=env)
        deadline = time.monotonic() + args.timeout
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                _say(f"the daemon did not start: {(tmp / 'aund.log').read_text()[-800:]}")
                return 1
            time.sleep(0.05)
        _say(f"aund is up (socket {sock})")
        suffix = secrets.token_hex(3)
        alice, bob = f"alice-{suffix}.aid.test", f"bob-{suffix}.aid.test"
        app_env = dict(os.environ, AUND_SOCKET=str(sock))
        a = subprocess.Popen([sys.executable, "-m", "aund.cli.demo_app", "alice", str(sock), alice, bob],
                             env=app_env, text=True)
        while not _ready(sock, alice) and time.monotonic() < deadline and a.poll() is None:
            time.sleep(0.05)
        b = subprocess.Popen([sys.executable, "-m", "aund.cli.demo_app", "bob", str(sock), bob, alice],
                             env=app_env, text=True)
        codes = [p.wait(max(1.0, deadline - time.monotonic())) for p in (a, b)]
        if codes != [0, 0]:
            _say(f"an app failed (exit codes {codes}); logs in {tmp}")
            args.keep = True
            return 1
        _say(f"two apps exchanged end-to-end encrypted messages through one daemon "
             f"in {time.monotonic() - started:.1f} s")
        return 0
    except subprocess.TimeoutExpired:
        _say(f"timed out; logs in {tmp}")
        args.keep = True
        return 1
    finally:
        code = _stop(daemon)
        _stop(devnet)
        if code not in (0, None):
            _say(f"the daemon exited with {code}; logs in {tmp}")
            args.keep = True
        if args.keep:
            _say(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # a throwaway network: its keys are worthless
            _say("cleaned up")


def _ready(sock: Path, aid: str) -> bool:
    """alice's link is ready (so bob's first message finds her prekey)."""
    from client_stub import AundError, Client

    try:
        with Client(sock, app="aund-demo", reconnect_attempts=0) as client:
            return any(link["aid"] == aid and link["state"] == "ready" for link in client.status().get("links", []))
    except AundError:
        return False
