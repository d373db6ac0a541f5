"""Apps' client for aund (layer: client_stub; imports msgpack, the stdlib and client_stub only).

Two front ends with the same names and shapes, over ONE sans-IO core (``_Core``: request ids,
pending replies, hello, event routing; ``_SubState``: where a subscription resumes):

    with Client() as aund:                          async with AsyncClient() as aund:
        aund.ensure_identity(aid)                       await aund.ensure_identity(aid)
        s = aund.session(aid, slot_id="main")           s = aund.session(aid, slot_id="main")
        s.wait_ready(timeout=10)                        await s.wait_ready(timeout=10)
        s.call("message.send", {...})                   await s.call("message.send", {...})
        for ev in s.events(consumer="bot"):             async for ev in s.events(consumer="bot"):
            handle(ev.kind, ev.data); ev.ack()              handle(ev.kind, ev.data); await ev.ack()

``Client`` is a blocking socket plus one reader thread that routes replies by request id, so it
may be used from several threads at once (one thread per ``EventStream``). ``AsyncClient`` is the
asyncio twin (one reader task). Neither keeps a nursery or task group in a context manager.

One source: ``client_stub/_async/client.py`` holds the asyncio front end, and
``client_stub/_sync/client.py`` is generated from it by ``scripts/unasync.py`` (never edit the
generated file); the I/O that really differs is ``client_stub._asyncio_io`` / ``client_stub._thread_io``,
the sans-IO core is ``client_stub._core``. This module only gathers the names.

Socket path: the first argument, else ``$AUND_SOCKET``, else ``/run/aund/aund.sock`` as root,
else ``$XDG_RUNTIME_DIR/aund/aund.sock``, else ``~/.local/state/aund/run/aund.sock`` (falling back to
the system socket if only that exists): ``client_stub.localsock``. Before connecting the stub checks
who could have made the socket's directory, and after connecting who listens (``SO_PEERCRED``):
an untrusted directory or a listener that is not root, you or the directory's owner is refused
with ``DaemonUnavailable`` (the rule is in ``client_stub.localsock``).

Connections: a request made after the daemon connection dropped reconnects once (connect
timeout 5 s); requests that were in flight when it dropped raise ``DaemonUnavailable``. Sessions
re-open themselves on the new connection. An events iterator reconnects with bounded retries and
capped exponential backoff, resuming from the consumer's last ack (at least once); within one
iterator an event is yielded at most once (cursors only grow).

Errors: every method raises ``client_stub.errors`` classes: ``DaemonUnavailable`` (socket missing,
refused, lost; carries ``socket_path`` and ``hint``), ``RpcTimeout`` (no reply within the
client-side wait), and whatever the daemon sent (``PermissionDenied``, ``LimitsExceeded``,
``InvalidParams``, ``NotReady``, ``GatewayError`` ...). Using a closed client raises RuntimeError.
"""
from __future__ import annotations

from client_stub._async.client import AsyncClient, AsyncEventStream, AsyncSession, _AsyncConn  # noqa: F401
from client_stub._asyncio_io import _LazyAsyncio, asyncio  # noqa: F401 (asyncio is imported on first use)
from client_stub._core import (  # noqa: F401 (the knobs, for apps and tests that look them up here)
    BACKOFF_BASE, BACKOFF_MAX, BROKEN_WAIT, CALL_MARGIN, DEFAULT_CALL_WAIT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
    ENSURE_WAIT, ENV_SOCKET, EVENT_QUEUE_MAX, READ_SIZE, RECONNECT_ATTEMPTS, SYSTEM_SOCKET, Event, _Core, _SinkState,
    _SubState, default_socket_path,
)
from client_stub._sync.client import Client, EventStream, Session, _ThreadConn  # noqa: F401

__all__ = ["Client", "AsyncClient", "Session", "AsyncSession", "EventStream", "AsyncEventStream",
           "Event", "default_socket_path"]
