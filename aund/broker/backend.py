"""Broker layer: what the app-facing socket server needs from the daemon (the seam between them).

The daemon (`aund.daemon`) implements `Backend`; the broker only ever talks to this protocol, so
that its tests can inject faults with a scripted backend while integration tests use the real one.
Every method raises only `client_stub.errors` classes (AundError subtree) for API errors.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class AppIdentity:
    """Who is on the other end of an app connection (from SO_PEERCRED at accept)."""

    conn_id: int
    pid: int
    uid: int
    gid: int
    app_name: str = ""


@dataclass(frozen=True)
class InboxEvent:
    """One event for a consumer: `cursor` is what the app acks (monotonic per consumer); live link
    events that are not stored (state changes) have cursor None."""

    cursor: int | None
    kind: str
    data: dict[str, Any]


class SessionHandle(Protocol):
    """A daemon-held link for (AID, slot) that an app holds; released when the app lets go."""

    aid: str
    slot_id: str

    def state(self) -> str: ...

    async def wait_ready(self) -> None:
        """Return once ready; raise GatewayUnavailable (retryable=False) if the link failed for good."""

    async def call(self, method: str, params: dict[str, Any], *, timeout: float | None, background: bool,
                   app: AppIdentity) -> dict[str, Any]:
        """One gateway RPC within the link's budget, on behalf of `app` (for fair accounting)."""

    def set_protected_headers(self, app: AppIdentity, headers: dict[str, str]) -> None: ...

    def invalidate_prekey_cache(self, peer_aid: str) -> None: ...


class Backend(Protocol):
    def daemon_info(self) -> dict[str, Any]:
        """Version, protocol, features; merged into the hello reply."""

    def status(self) -> dict[str, Any]:
        """Per-link, budget, inbox and warnings for `aund status` (JSON-safe)."""

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        """Load, register only if absent, load again; returns at least aid and cert_fingerprint."""

    def list_identities(self) -> list[dict[str, Any]]: ...

    async def agent_md(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """The AID's published agent.md: `{aid, content, etag}` (ResourceNotExistError if none)."""

    async def set_agent_md(self, app: AppIdentity, aid: str, content: str) -> dict[str, Any]:
        """Sign `content` with the AID key, check and upload it: `{aid, etag, content}`;
        InvalidParams (`data.field`, `data.reason`) for a document that does not validate."""

    def allowed(self, app: AppIdentity, aid: str) -> bool:
        """The policy: may this app's uid/gid use this AID?"""

    async def open_session(self, app: AppIdentity, aid: str, slot_id: str) -> SessionHandle:
        """Hold the (AID, slot) link for this app, starting it on demand."""

    async def release_session(self, app: AppIdentity, handle: SessionHandle) -> None:
        """The app let go of the link (idle links opened on demand close later)."""

    def check_kinds(self, kinds: tuple[str, ...]) -> None:
        """Refuse (InvalidParams listing the known kinds) a subscription to kinds that do not exist."""

    def subscribe(self, app: AppIdentity, aid: str, kinds: tuple[str, ...], consumer: str,
                  start: str | int) -> AsyncIterator[InboxEvent]:
        """Events for `aid` from the durable inbox (and link events), from `start`:
        "last_ack" (resume where `consumer` acked), "now" (skip history), or an int cursor."""

    async def ack(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> None: ...
