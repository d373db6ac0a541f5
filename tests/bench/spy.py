"""Which layer spends the CPU: py-spy samples of a running process, folded into aund's layers.

`Profiler(pid, path)` runs `py-spy record --format raw` on a process while a workload runs (stop
with `.stop()`); `summarize(path)` returns the share of on-CPU samples per layer (by the file of
the innermost frame: self time), per aund module anywhere on the stack (inclusive), and the top
functions by self time. Native code (OpenSSL via cryptography, sqlite3, syscalls) has no Python
frame of its own: its time counts for the Python function that called it (e.g. `sign_der` in
aund/identity/pki.py, `_nonblocking_helper` in trio's socket layer for send/recv syscalls). py-spy is optional: without it the bench says so and skips profiles.
"""
from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# (layer, pattern on the frame's file), first match wins; the innermost frame decides (self time).
LAYERS = [
    ("crypto (cryptography/OpenSSL)", re.compile(r"cryptography/|hazmat")),
    ("e2ee (aund/aun/e2ee, incl. the native crypto it calls)", re.compile(r"aund/aun/e2ee/")),
    ("crypto wrappers (aund/identity/pki.py, incl. native sign/verify)", re.compile(r"aund/identity/pki\.py")),
    ("websocket (aund/aun/ws.py, wsproto, h11)", re.compile(r"aund/aun/ws\.py|trio_websocket|wsproto|h11/")),
    ("websocket (websockets sans-IO)", re.compile(r"websockets/")),
    ("link transport (aund/aun/transport.py)", re.compile(r"aund/aun/transport\.py")),
    ("link (aund/aun/link, jsonrpc, budget, signing, auth)",
     re.compile(r"aund/aun/(link|jsonrpc|budget|signing|auth|ids)\.py")),
    ("messaging + sync (aund/aun/messaging, coverage)", re.compile(r"aund/aun/(messaging|coverage)\.py")),
    ("inbox (aund/inbox.py + sqlite3)", re.compile(r"aund/inbox\.py|sqlite3/")),
    ("broker (aund/broker)", re.compile(r"aund/broker/")),
    ("daemon (aund/daemon.py)", re.compile(r"aund/daemon\.py")),
    ("identity store (aund/identity)", re.compile(r"aund/identity/")),
    ("local protocol codec (client_stub, msgpack)", re.compile(r"client_stub/|msgpack/")),
    ("logging (structlog, logging)", re.compile(r"structlog/|logging/|aund/logs\.py")),
    ("json (stdlib)", re.compile(r"(^|/)json/")),
    ("trio core (scheduler, sockets, threads)", re.compile(r"trio/|outcome/|sniffio/")),
    ("asyncio", re.compile(r"asyncio/")),
    ("fastaun (aun_core)", re.compile(r"aun_core/")),
    ("threading/queue (stdlib)", re.compile(r"(^|/)(threading|queue|selectors|socket|ssl)\.py")),
]
# Leaf frames that are waiting, not working (py-spy's own idle filter lets some through).
IDLE_LEAVES = re.compile(r"^(EpollIOManager\.get_events|EpollIOManager\._epoll_wait|WorkerThread\._work|"
                         r"EpollSelector\.select|Condition\.wait|Event\.wait|_wait_for_tstate_lock|"
                         r"BaseSelector\.select|KqueueSelector\.select) ")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
AUND_MODULE = re.compile(r"((?:aund|client_stub)/(?:[\w]+/)*[\w]+\.py)")


def pyspy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else None


_install_tried = False


def install() -> bool:
    """py-spy is a bench-only tool: install it into this environment once, on demand."""
    global _install_tried
    if not _install_tried:
        _install_tried = True
        print("[bench] installing py-spy (pip) for the profiles", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=False, timeout=300)
    return pyspy() is not None


class Profiler:
    """py-spy sampling one process (all threads, on-CPU samples only) until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        tool = pyspy()
        self.proc: subprocess.Popen | None = None
        if tool is None:
            return
        self.proc = subprocess.Popen([tool, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out),
                                      "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.out if self.out.exists() else None


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part.strip())
        out.append((m.group("func"), m.group("file")) if m else (part.strip(), ""))
    return out


def layer_of(file: str, func: str) -> str:
    for name, pattern in LAYERS:
        if pattern.search(file):
            return name
    if not file and func.startswith(("process ", "thread ")):
        return "other"
    return "other Python (stdlib, interpreter)"


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    self_layer: collections.Counter[str] = collections.Counter()
    self_func: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if not frames:
            continue
        if IDLE_LEAVES.match(stack.split(";")[-1].strip()):
            idle += n
            continue
        total += n
        func, file = frames[-1]
        self_layer[layer_of(file, func)] += n
        self_func[f"{func} ({file})"] += n
        seen = set()
        for _, f in frames:
            m = AUND_MODULE.search(f)
            if m:
                seen.add(m.group(1))
        for mod in seen:
            inclusive[mod] += n
    if not total:
        return {"samples": 0, "idle_samples_dropped": idle}

    def pct(c: collections.Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in c.most_common(k)]

    return {"samples": total, "idle_samples_dropped": idle, "self_by_layer_pct": pct(self_layer, 20), "inclusive_by_module_pct": pct(inclusive, 15),
            "top_self_functions_pct": pct(self_func, top)}


def one_line(summary: dict[str, Any], k: int = 5) -> str:
    """A short human line: the top layers by self time."""
    if not summary.get("samples"):
        return "no samples"
    return ", ".join(f"{name} {p}%" for name, p in summary["self_by_layer_pct"][:k])
