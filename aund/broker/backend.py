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
    """Who is on the other end of an app connection (SO_PEERCRED and SO_PEERGROUPS at accept;
    ``groups`` are the supplementary groups)."""

    conn_id: int
    pid: int
    uid: int
    gid: int
    app_name: str = ""
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class InboxEvent:
    """One event for a consumer: `cursor` is what the app acks (monotonic per consumer); live link
    events that are not stored (state changes) have cursor None."""

    cursor: int | None
    kind: str
    data: dict[str, Any]


class LinkLease(Protocol):
    """A daemon-held link for (AID, slot) that an app holds; released when the app lets go."""

    aid: str
    slot_id: str
    #: the methods that carry signed protected headers (the daemon's method table says which)
    header_methods: frozenset[str]

    def state(self) -> str: ...

    async def wait_ready(self) -> None:
        """Return once ready; raise GatewayUnavailable (retryable=False) if the link failed for good."""

    async def call(self, method: str, params: dict[str, Any], *, timeout: float | None, background: bool,
                   app: AppIdentity) -> dict[str, Any]:
        """One gateway RPC within the link's budget, on behalf of `app` (for fair accounting)."""

    async def notify(self, method: str, params: dict[str, Any], *, app: AppIdentity, timeout: float | None,
                     to: str | None, group_id: str | None, device_id: str | None, slot_id: str | None,
                     ttl_ms: int | None) -> dict[str, Any]:
        """One JSON-RPC notification on the link (no id, no answer): `{sent, method}` once written."""

    async def storage_upload(self, data: bytes, params: dict[str, Any], *, overwrite: bool, app: AppIdentity,
                             timeout: float | None) -> dict[str, Any]:
        """Store `data` at `params` (object_key, bucket, owner_aid?, content_type, is_private, metadata?),
        inline or by upload session as the gateway says; its object view."""

    async def storage_download(self, params: dict[str, Any], *, app: AppIdentity,
                               timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """(object view, body) of the object at `params`, its hash checked; the data plane and the
        access token stay in the daemon."""

    def set_protected_headers(self, app: AppIdentity, headers: dict[str, str]) -> None: ...

    def invalidate_prekey_cache(self, peer_aid: str) -> None: ...


class Backend(Protocol):
    def daemon_info(self) -> dict[str, Any]:
        """Version, protocol, features; merged into the hello reply."""

    def status(self, app: AppIdentity | None = None, *, links: int | None = None, offset: int = 0,
               aids: list[str] | None = None) -> dict[str, Any]:
        """Per-link, budget, inbox and warnings for `aund status` (JSON-safe): for `app`, only
        what its policy lets it see (everything for the owners and for None); `link_counts` by
        state for every link, the per-link list paged (`links` entries from `offset`, of `aids`)."""

    def canonical_aid(self, aid: str) -> str:
        """The normalised AID (what the policy is asked about and what is used);
        InvalidParams if `aid` is not an AID."""

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        """Load, register only if absent, load again; returns at least aid and cert_fingerprint."""

    def list_identities(self) -> list[dict[str, Any]]: ...

    async def agent_md(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """The AID's published agent.md: `{aid, content, etag}` (ResourceNotExistError if none)."""

    async def set_agent_md(self, app: AppIdentity, aid: str, content: str) -> dict[str, Any]:
        """Sign `content` with the AID key, check and upload it: `{aid, etag, content}`;
        InvalidParams (`data.field`, `data.reason`) for a document that does not validate."""

    async def sign(self, app: AppIdentity, aid: str, data: bytes) -> dict[str, Any]:
        """A signature with the AID key: `{aid, signature, signature_b64, cert_fingerprint, algorithm}`."""

    async def verify(self, app: AppIdentity, data: bytes, signature: bytes, *, aid: str | None,
                     cert_pem: str | None, fingerprint: str, via: str | None) -> dict[str, Any]:
        """`{valid, aid, cert_fingerprint}` against a verified certificate (of `aid`, or `cert_pem`)."""

    async def resolve_peer(self, app: AppIdentity, aid: str, fingerprint: str, via: str | None) -> dict[str, Any]:
        """The peer's verified certificate and gateway."""

    async def renew_identity(self, app: AppIdentity | None, aid: str, *, rekey: bool) -> dict[str, Any]:
        """A renewed certificate (or with `rekey` a new key and certificate); nothing is deleted."""

    def allowed(self, app: AppIdentity, aid: str) -> bool:
        """The policy: may this app's uid/gid/groups use this (normalised) AID? The answer may
        change at a policy reload, after which the broker checks what its apps hold again."""

    async def open_session(self, app: AppIdentity, aid: str, slot_id: str,
                           options: dict[str, Any] | None = None) -> LinkLease:
        """Hold the (AID, slot) link for this app, starting it on demand with the SDK-style connect
        `options` (`delivery_mode`, ...); InvalidParams when they conflict with the running link."""

    async def release_session(self, app: AppIdentity, handle: LinkLease) -> None:
        """The app let go of the link (idle links opened on demand close later)."""

    async def show_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """Certificate, device, gateways, links, inbox depth and this uid's consumers of one AID."""

    async def disable_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """Stop holding `aid` (persisted; links closed, new sessions and subscriptions refused):
        `{aid, disabled, changed, links_closed}`."""

    async def enable_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """Hold a disabled `aid` again: `{aid, disabled, changed, connecting}`."""

    def check_enabled(self, aid: str) -> None:
        """PermissionDenied (`data.reason` "identity_disabled") when `aid` is disabled."""

    async def reset_consumer(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> dict[str, Any]:
        """Set this uid's durable consumer to `cursor` (back or forward): `{aid, consumer, cursor}`."""

    async def restart_link(self, app: AppIdentity, aid: str, slot_id: str) -> dict[str, Any]:
        """Start the (AID, slot) link again if it stopped for good: `{aid, slot_id, restarted, state}`."""

    def check_kinds(self, kinds: tuple[str, ...]) -> None:
        """Refuse (InvalidParams listing the known kinds) a subscription to kinds that do not exist."""

    def subscribe(self, app: AppIdentity, aid: str, kinds: tuple[str, ...], consumer: str,
                  start: str | int) -> AsyncIterator[InboxEvent]:
        """Events for `aid` from the durable inbox (and link events), from `start`:
        "last_ack" (resume where `consumer` acked), "now" (skip history), or an int cursor.
        While it runs, the subscription holds the AID's link (as a session does), so a
        subscribe-only app keeps receiving."""

    async def ack(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> None: ...
