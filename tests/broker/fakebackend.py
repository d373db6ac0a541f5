"""A scripted ``Backend`` for the broker's tests: it only scripts answers and injects faults.

Everything else (the socket, framing, dispatch, quotas, policy, pumps, the client) is the real
code. The real Backend is the daemon; the lead's integration tests use it.

Scripted call methods (``session.call(method, params)``):

- ``echo``: returns ``{"echo": params, "background": ..., "timeout": ...}``
- ``hold``: waits until ``backend.gate`` is set (counts cancellations in ``calls_cancelled``)
- ``fail``: raises ``ERROR_CLASSES[params["type"]](params["message"])``
- ``publish``: appends ``params["count"]`` events of ``params["kind"]`` to this AID's inbox
- ``blob``: returns ``{"blob": b"x" * params["size"]}``
"""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from aund.aun import methods
from aund.broker.backend import AppIdentity, InboxEvent
from aund.broker.policy import Policy
from client_stub.errors import ERROR_CLASSES, AundError, GatewayUnavailable, InvalidParams, ResourceNotExistError


class FakeSession:
    header_methods = methods.PROTECTED_HEADERS

    def __init__(self, backend: "FakeBackend", app: AppIdentity, aid: str, slot_id: str) -> None:
        self.backend, self.app, self.aid, self.slot_id = backend, app, aid, slot_id

    def state(self) -> str:
        return "ready" if self.backend.ready.is_set() else "connecting"

    async def wait_ready(self) -> None:
        await self.backend.ready.wait()
        if self.backend.link_failed:
            raise GatewayUnavailable(f"{self.aid}: link failed for good", retryable=False)

    async def call(self, method: str, params: dict[str, Any], *, timeout: float | None, background: bool,
                   app: AppIdentity) -> dict[str, Any]:
        b = self.backend
        b.calls_started += 1
        b.in_flight += 1
        b.max_in_flight = max(b.max_in_flight, b.in_flight)
        try:
            if method == "echo":
                return {"echo": params, "background": background, "timeout": timeout, "aid": self.aid,
                        "conn_id": app.conn_id}
            if method == "hold":
                await b.gate.wait()
                return {"held": True}
            if method == "fail":
                raise ERROR_CLASSES[params["type"]](params.get("message", "scripted failure"))
            if method == "publish":
                for i in range(params.get("count", 1)):
                    b.publish(self.aid, params.get("kind", "message.received"), {"i": i, **params.get("data", {})})
                return {"published": params.get("count", 1)}
            if method == "blob":
                return {"blob": b"x" * params["size"]}
            raise InvalidParams(f"fake backend: unknown method {method!r}")
        except trio.Cancelled:
            b.calls_cancelled += 1
            raise
        finally:
            b.in_flight -= 1

    async def storage_upload(self, data: bytes, params: dict[str, Any], *, overwrite: bool, app: AppIdentity,
                             timeout: float | None) -> dict[str, Any]:
        """Objects in memory (backend.objects by (owner, key)); the real data plane is the daemon's."""
        key = (params.get("owner_aid") or self.aid, params["object_key"])
        self.backend.objects[key] = data
        return {"object_key": key[1], "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    async def storage_download(self, params: dict[str, Any], *, app: AppIdentity,
                               timeout: float | None) -> tuple[dict[str, Any], bytes]:
        key = (params.get("owner_aid") or self.aid, params["object_key"])
        if key not in self.backend.objects:
            raise ResourceNotExistError(f"no object {key[1]}")
        return {"object_key": key[1]}, self.backend.objects[key]

    def set_protected_headers(self, app: AppIdentity, headers: dict[str, str]) -> None:
        self.backend.headers[(app.conn_id, self.aid)] = dict(headers)

    def invalidate_prekey_cache(self, peer_aid: str) -> None:
        self.backend.invalidated.append((self.aid, peer_aid))


class FakeBackend:
    """Inboxes are in-memory lists (cursor = position + 1); acks per (aid, consumer)."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.cards: dict[str, str] = {}  # agent.md by AID
        self.identities: dict[str, dict[str, Any]] = {}
        self.inboxes: dict[str, list[InboxEvent]] = {}
        self.acks: dict[tuple[str, str], int] = {}
        self.headers: dict[tuple[int, str], dict[str, str]] = {}
        self.invalidated: list[tuple[str, str]] = []
        self.objects: dict[tuple[str, str], bytes] = {}  # storage, by (owner, object key)
        self.opened: list[tuple[int, str, str]] = []
        self.released: list[tuple[int, str, str]] = []
        self.gate = trio.Event()
        self.ready = trio.Event()
        self.ready.set()
        self.link_failed = False
        self.subscribe_error: AundError | None = None
        self.calls_started = self.calls_cancelled = 0
        self.in_flight = self.max_in_flight = 0
        self.active_subscriptions = 0
        self._new_events = trio.lowlevel.ParkingLot()

    # --- test hooks ---
    def publish(self, aid: str, kind: str, data: dict[str, Any]) -> int:
        inbox = self.inboxes.setdefault(aid, [])
        inbox.append(InboxEvent(len(inbox) + 1, kind, data))
        self._new_events.unpark_all()
        return len(inbox)

    @property
    def open_sessions(self) -> int:
        return len(self.opened) - len(self.released)

    # --- Backend ---
    def daemon_info(self) -> dict[str, Any]:
        return {"daemon_version": "0.0.0-fake", "features": ["fake"]}

    def status(self, app: AppIdentity | None = None) -> dict[str, Any]:
        return {"fake": True, "view_uid": None if app is None else app.uid, "identities": len(self.identities), "open_sessions": self.open_sessions}

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        if not aid.endswith(".aid.test"):
            raise InvalidParams(f"not a test AID: {aid}")
        await trio.lowlevel.checkpoint()
        return self.identities.setdefault(aid, {"aid": aid, "cert_fingerprint":
                                                "sha256:" + hashlib.sha256(aid.encode()).hexdigest()})

    def list_identities(self) -> list[dict[str, Any]]:
        return list(self.identities.values())

    async def agent_md(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if aid not in self.cards:
            raise ResourceNotExistError(f"no agent.md is published for {aid}", data={"aid": aid})
        return {"aid": aid, "content": self.cards[aid], "etag": '"' + hashlib.sha256(self.cards[aid].encode()).hexdigest() + '"'}

    async def show_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"aid": aid, "links": [], "consumers": []}

    async def reset_consumer(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"aid": aid, "consumer": consumer, "cursor": cursor}

    async def restart_link(self, app: AppIdentity, aid: str, slot_id: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"aid": aid, "slot_id": slot_id, "restarted": False, "state": self.sessions_state()}

    def sessions_state(self) -> str:
        return "ready" if self.ready.is_set() else "connecting"

    async def set_agent_md(self, app: AppIdentity, aid: str, content: str) -> dict[str, Any]:
        if not content.startswith("---\n"):
            raise InvalidParams("agent.md: it must start with YAML front matter", data={"arg": "content"})
        await trio.lowlevel.checkpoint()
        self.cards[aid] = content
        return await self.agent_md(app, aid)

    def canonical_aid(self, aid: str) -> str:
        return aid.strip().lower()  # lenient: the broker tests use short made-up AIDs

    def allowed(self, app: AppIdentity, aid: str) -> bool:
        return self.policy.allows(app.uid, app.gid, aid, app.groups)

    async def open_session(self, app: AppIdentity, aid: str, slot_id: str,
                           options: dict[str, Any] | None = None) -> FakeSession:
        await trio.lowlevel.checkpoint()
        self.opened.append((app.conn_id, aid, slot_id))
        return FakeSession(self, app, aid, slot_id)

    async def release_session(self, app: AppIdentity, handle: FakeSession) -> None:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        self.released.append((app.conn_id, handle.aid, handle.slot_id))

    def subscribe(self, app: AppIdentity, aid: str, kinds: tuple[str, ...], consumer: str,
                  start: str | int) -> AsyncIterator[InboxEvent]:
        return self._events(aid, kinds, consumer, start)

    async def _events(self, aid: str, kinds: tuple[str, ...], consumer: str,
                      start: str | int) -> AsyncIterator[InboxEvent]:
        self.active_subscriptions += 1
        try:
            if self.subscribe_error is not None:
                raise self.subscribe_error
            inbox = self.inboxes.setdefault(aid, [])
            pos = (self.acks.get((aid, consumer), 0) if start == "last_ack"
                   else len(inbox) if start == "now" else int(start))
            while True:
                while pos < len(inbox):
                    event = inbox[pos]
                    pos += 1
                    if not kinds or event.kind in kinds:
                        yield event
                await self._new_events.park()
        finally:
            self.active_subscriptions -= 1

    async def ack(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> None:
        await trio.lowlevel.checkpoint()
        self.acks[(aid, consumer)] = max(cursor, self.acks.get((aid, consumer), 0))
