"""Broker layer: the app-facing Unix socket server. Imports trio, structlog, client_stub and the
rest of ``aund.broker``; never the daemon (it reaches identities and links through ``Backend``).

``serve_broker`` binds the socket (or takes listeners handed over by systemd), accepts apps with
``trio.serve_listeners``, identifies each with ``SO_PEERCRED`` and runs one ``AppConnection`` per
connection. ``task_status.started(server)`` hands back the ``BrokerServer``, whose
``statistics()`` the daemon merges into ``status``. ``set_policy()`` applies a reloaded policy to
the connected apps (``AppConnection.enforce`` / ``revoke``).

Logged events (stable names, all at warning level and at most once per cause and connection):
``broker.connection_rejected`` (max connections, policy), ``broker.protocol_violation``,
``broker.permission_denied``, ``broker.limits_exceeded``, ``broker.outbox_overflow``,
``broker.consumer_stalled``, ``broker.event_undeliverable``, ``broker.release_failed``,
``broker.release_timeout``, ``broker.access_revoked``; ``broker.session_crashed`` (error, with the traceback: a bug).
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import structlog
import trio

from aund.broker.backend import Backend
from aund.broker.limits import BrokerStatistics, Limits
from aund.broker.policy import Policy
from aund.broker.session import AppConnection
from aund.broker.sockets import BoundPath, bind_unix, peer_credentials, peer_groups
from client_stub import wire
from client_stub.errors import AundError, LimitsExceeded, NotReady, PermissionDenied

log = structlog.get_logger("aund.broker")

MAX_LOGGED_UIDS = 256


class BrokerServer:
    """The socket server's state: connected apps, the global call limiter and counters.

    ``call_limiter`` bounds ``call`` requests across all apps; pass the daemon's own limiter to
    share one budget, or let the server make one of ``limits.global_calls`` tokens. Every call
    acquires it with ``acquire_on_behalf_of(CallBorrower(...))`` (one borrower per call, naming the
    app), so ``call_limiter.statistics().borrowers`` shows which app holds which tokens.
    ``policy``, if given, only admits connections from its owners and from uids/groups some rule
    names; per-AID decisions are always ``backend.allowed``.
    """

    def __init__(self, backend: Backend, *, limits: Limits | None = None, policy: Policy | None = None,
                 call_limiter: trio.CapacityLimiter | None = None) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.policy = policy
        self.call_limiter = call_limiter or trio.CapacityLimiter(self.limits.global_calls)
        self.apps: dict[int, AppConnection] = {}
        self.connections_total = 0
        self.connections_rejected = 0
        self.protocol_violations = 0
        self.stalled_disconnects = 0
        self._conn_ids = itertools.count(1)
        self._rejecting = False
        self._refused_uids: set[tuple[int, str]] = set()
        self.draining = False
        # call slots of one uid / one AID (created on first use, dropped once unused)
        self._shares: dict[tuple[str, Any], trio.CapacityLimiter] = {}
        self._calls = 0  # app calls and notifications in flight, all apps
        self._no_calls = trio.Event()

    def call_began(self) -> None:
        self._calls += 1

    def call_ended(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._no_calls.set()
            self._no_calls = trio.Event()

    async def calls_done(self) -> None:
        """Return once no app call is in flight (a graceful stop waits for this)."""
        while self._calls:
            idle = self._no_calls
            await idle.wait()

    def uid_apps(self, uid: int) -> list[AppConnection]:
        return [a for a in self.apps.values() if a.app.uid == uid]

    def call_stages(self, uid: int, aid: str) -> list[tuple[str, tuple[str, Any] | None, trio.CapacityLimiter]]:
        """The limiters a call acquires in order: its AID's share, its uid's share, the global budget.

        The AID's comes first so that calls queued behind a slow AID hold nothing its user's other
        AIDs need."""
        stages: list[tuple[str, tuple[str, Any] | None, trio.CapacityLimiter]] = []
        for name, key, size in (("aid", ("aid", aid), self.limits.calls_per_aid),
                                ("uid", ("uid", uid), self.limits.calls_per_uid)):
            limiter = self._shares.get(key)
            if limiter is None:
                limiter = self._shares[key] = trio.CapacityLimiter(size)
            stages.append((name, key, limiter))
        stages.append(("global", None, self.call_limiter))
        return stages

    def release_call(self, held: list[tuple[str, tuple[str, Any] | None, trio.CapacityLimiter]], borrower: Any) -> None:
        for _, key, limiter in reversed(held):
            limiter.release_on_behalf_of(borrower)
        for _, key, limiter in held:
            stats = limiter.statistics()
            if key is not None and stats.borrowed_tokens == 0 and stats.tasks_waiting == 0:
                self._shares.pop(key, None)

    def __repr__(self) -> str:
        lim = self.call_limiter.statistics()
        return (f"<BrokerServer {len(self.apps)} apps | calls {lim.borrowed_tokens}/{lim.total_tokens}, "
                f"{lim.tasks_waiting} waiting>")

    def statistics(self) -> BrokerStatistics:
        lim = self.call_limiter.statistics()
        apps = tuple(s.statistics() for s in self.apps.values())
        return BrokerStatistics(
            connections=len(apps), max_connections=self.limits.max_connections, apps=apps,
            calls_in_flight=sum(a.calls_in_flight for a in apps), calls_waiting=lim.tasks_waiting,
            global_calls=lim.total_tokens, connections_total=self.connections_total,
            connections_rejected=self.connections_rejected, protocol_violations=self.protocol_violations,
            stalled_disconnects=self.stalled_disconnects,
        )

    def stop_accepting(self) -> None:
        """Graceful stop, step 1: new app connections are refused (NotReady); connected apps keep
        their in-flight calls, which the caller lets finish within its grace period."""
        self.draining = True

    def set_policy(self, policy: Policy | None) -> None:
        """A reloaded policy (the backend answers ``allowed`` by it already): apps whose uid it no
        longer admits are told so and closed; the others lose what they may no longer use."""
        self.policy = policy
        self._refused_uids.clear()
        for session in list(self.apps.values()):
            a = session.app
            if policy is not None and not policy.admits(a.uid, a.gid, a.groups):
                session.revoke()
            else:
                session.enforce()

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[BrokerServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` until cancelled; ``started(self)`` once accepting."""
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(trio.serve_listeners, self.handle, listeners))
            task_status.started(self)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection to its end (the ``trio.serve_listeners`` handler)."""
        try:
            pid, uid, gid = peer_credentials(stream.socket)
            groups = peer_groups(stream.socket)
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        conn_id = next(self._conn_ids)
        self.connections_total += 1
        if len(self.apps) >= self.limits.max_connections:
            if not self._rejecting:
                self._rejecting = True
                log.warning("broker.connection_rejected", reason="max_connections", conn=conn_id, uid=uid,
                            pid=pid, max_connections=self.limits.max_connections)
            await self._reject(stream, LimitsExceeded(
                f"aund serves at most {self.limits.max_connections} app connections",
                data={"quota": "connections", "limit": self.limits.max_connections}))
            return
        self._rejecting = False
        if len(self.uid_apps(uid)) >= self.limits.connections_per_uid:
            self._log_refused(uid, "connections_per_uid", conn=conn_id, pid=pid)
            await self._reject(stream, LimitsExceeded(
                f"uid {uid} has {self.limits.connections_per_uid} connections to aund already (the most one user "
                "may hold); close some", data={"quota": "connections_per_uid", "limit": self.limits.connections_per_uid}))
            return
        if self.draining:
            await self._reject(stream, NotReady("aund is stopping; try again when it is back",
                                                data={"reason": "stopping"}))
            return
        if self.policy is not None and not self.policy.admits(uid, gid, groups):
            self._log_refused(uid, "policy", conn=conn_id, gid=gid, pid=pid)
            await self._reject(stream, PermissionDenied(f"uid {uid} may not use aund", data={"uid": uid}))
            return
        session = AppConnection(self, stream, conn_id, pid, uid, gid, groups)
        self.apps[conn_id] = session
        try:
            await session.run()
        except Exception:  # the per-app boundary: a bug closes this connection only
            session.log.error("broker.session_crashed", app=session.app.app_name, exc_info=True)
        finally:
            del self.apps[conn_id]
            await trio.aclose_forcefully(stream)

    def _log_refused(self, uid: int, reason: str, **kw: Any) -> None:
        """One warning per (uid, reason), for a bounded number of them."""
        if (uid, reason) not in self._refused_uids and len(self._refused_uids) < MAX_LOGGED_UIDS:
            self._refused_uids.add((uid, reason))
            log.warning("broker.connection_rejected", reason=reason, uid=uid, **kw)

    async def _reject(self, stream: trio.SocketStream, exc: AundError) -> None:
        self.connections_rejected += 1
        with trio.move_on_after(1.0):
            try:
                await stream.send_all(wire.encode_frame(wire.make_error(None, exc)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)


async def serve_broker(
    backend: Backend,
    *,
    listeners: list[trio.SocketListener] | None = None,
    socket_path: Path | str | None = None,
    policy: Policy | None = None,
    limits: Limits | None = None,
    call_limiter: trio.CapacityLimiter | None = None,
    task_status: trio.TaskStatus[BrokerServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local protocol until cancelled; ``task_status.started(server)``.

    Pass exactly one of ``listeners`` (e.g. ``activated_listeners()``; they are not closed here)
    or ``socket_path`` (bound with ``bind_unix``; the file is removed on exit if it is still ours).

    Errors: ``ValueError`` unless exactly one of ``listeners``/``socket_path`` is given;
    ``DaemonAlreadyRunning`` / ``SocketPathInUse`` / ``OSError`` from ``bind_unix``.
    """
    if (listeners is None) == (socket_path is None):
        raise ValueError("serve_broker needs exactly one of listeners= or socket_path=")
    server = BrokerServer(backend, limits=limits, policy=policy, call_limiter=call_limiter)
    if listeners is not None:
        await server.serve(listeners, task_status=task_status)
        return
    path = Path(socket_path)  # type: ignore[arg-type]
    listener = bind_unix(path)
    bound = BoundPath.of(path)
    try:
        await server.serve([listener], task_status=task_status)
    finally:
        bound.unlink_if_ours()
        await trio.aclose_forcefully(listener)

