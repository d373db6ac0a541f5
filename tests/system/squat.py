"""Actors of test_local_hostile, each a process under another uid:

    python -m tests.system.squat COMMAND '<json config>'

- ``squatter``: another local user pretending to be aund: makes ``dirs`` mode 0777, listens on
  ``socket`` (0777), prints ``{"listening": path}``, then answers ``hello`` like a daemon and every
  other request with ``{"status": "delivered"}``, printing ``{"got": op}`` for each request.
- ``victim``: an app of the victim uid: connects (``socket`` or the default path) and pings, with
  ``Client`` and with ``AsyncClient``; prints what happened (``{"path", "outcome", "message",
  "async.outcome", "async.message"}``).
- ``aund``: the victim's own ``aund run ARGV`` (stderr: its log).

Each starts as root, imports what it needs, then drops to ``uid``/``gid`` for good (no supplementary
groups): the interpreter lives under /root (0700), where the other uid cannot read. The kernel takes
SO_PEERCRED at connect()/listen(), i.e. the dropped credentials.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import threading
from typing import Any

from client_stub import AsyncClient, Client, wire
from client_stub.errors import AundError


def _drop(cfg: dict[str, Any]) -> None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    assert os.getresuid() == (cfg["uid"],) * 3


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _serve(conn: socket.socket) -> None:
    decoder = wire.FrameDecoder()
    with conn:
        while data := conn.recv(65536):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                op = frame.get("op")
                _say({"got": op})
                result = ({"daemon_version": "9.9-squat", "protocol": wire.PROTOCOL_VERSION, "ops": [],
                           "features": [], "max_frame": wire.DEFAULT_MAX_FRAME, "limits": {}, "conn_id": 1}
                          if op == wire.HELLO_OP else {"status": "delivered", "pong": True})
                conn.sendall(wire.encode_frame(wire.make_reply(frame["id"], result)))


def squatter(cfg: dict[str, Any]) -> None:
    _drop(cfg)
    for d in cfg["dirs"]:
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o777)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(cfg["socket"])
    os.chmod(cfg["socket"], 0o777)
    listener.listen(16)
    _say({"listening": cfg["socket"]})
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


def victim(cfg: dict[str, Any]) -> None:
    """Connects and pings with ``Client``, then with ``AsyncClient`` ("async." keys)."""
    import asyncio

    _drop(cfg)
    kw = {"app": "victim", "timeout": 10, "connect_timeout": 5, "reconnect_attempts": 0}
    client = Client(cfg.get("socket"), **kw)
    out: dict[str, Any] = {"path": str(client.socket_path)}
    try:
        with client:
            client.ping()
            out["daemon_version"] = client.hello.get("daemon_version")
    except AundError as exc:
        out.update(outcome=type(exc).__name__, message=exc.message)
    else:
        out["outcome"] = "ok"

    async def twin() -> None:
        try:
            async with AsyncClient(cfg.get("socket"), **kw) as aclient:
                await aclient.ping()
        except AundError as exc:
            out.update({"async.outcome": type(exc).__name__, "async.message": exc.message})
        else:
            out["async.outcome"] = "ok"

    asyncio.run(twin())
    _say(out)


def aund(cfg: dict[str, Any]) -> int:
    # everything `aund run` imports, while the interpreter can still be read (found with -X importtime)
    import encodings.ascii  # noqa: F401
    import importlib.readers as _readers  # noqa: F401
    import importlib.resources.readers as _resource_readers  # noqa: F401
    import resource  # noqa: F401

    import aund.aun.transport  # noqa: F401
    import aund.aun.trust  # noqa: F401
    import aund.broker  # noqa: F401
    import aund.broker.sockets  # noqa: F401
    import aund.cli.run  # noqa: F401
    import aund.daemon  # noqa: F401
    import aund.identity.store  # noqa: F401
    import aund.logs  # noqa: F401
    import aund.systemd  # noqa: F401
    import structlog  # noqa: F401
    import trio  # noqa: F401
    from aund.cli import SUBCOMMANDS, main

    for name in SUBCOMMANDS:  # main() builds its parser from every subcommand's module
        importlib.import_module(f"aund.cli.{name}")
    _drop(cfg)
    return main(cfg["argv"])


COMMANDS = {"squatter": squatter, "victim": victim, "aund": aund}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](json.loads(sys.argv[2])))
