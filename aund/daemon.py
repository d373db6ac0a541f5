"""The daemon core and its supervisor.

`Daemon` owns the long-lived nursery, the identity store, the inbox, every gateway link and the
daemon-wide call budget. `Supervisor` (at the end) starts the Daemon and then the app socket with
`nursery.start`, reloads both, and stops them gracefully; `aund run` is a thin shell around it.

Pure core: it reads no environment and no config file (the CLI does, and passes a Config in).
It implements the broker's `Backend` protocol (aund.broker.backend), so the app socket server
reaches identities and links only through it.
"""
from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

import aund
from aund import systemd
from aund.aun import auth, cards, events as gw_events, ids, methods, notify as notify_frames, storage, transport
from aund.aun.budget import CallBudget
from aund.aun.link import DEFAULT_CONNECT_OPTIONS, Link, LinkConfig, LinkState, connect_options, own_card_refused
from aund.aun.groups import GROUP_CHANGED_KIND, GROUP_EVENTS, GROUP_MESSAGE_KIND, GroupKeys, GroupSync
from aund.aun.messaging import P2PKeys, PeerSync
from aund.aun.looplag import LoopLag
from aund.aun.peers import PeerDirectory
from aund.aun.trust import TrustRoots
from aund.broker.backend import AppIdentity, InboxEvent
from aund.config import Config
from aund.errors import (
    AundError, AuthError, ClientError, GatewayError, GatewayUnavailable, InvalidParams, NotReady, PermissionDenied,
    ResourceAlreadyExistError, ResourceNotExistError, StorageError,
)
from aund.identity import agent_md, pki
from aund.identity.errors import CorruptIdentity, IdentityNotFound
from aund.identity.store import Identity, IdentityStore
from aund.inbox import QUARANTINED_KIND, AckPastHead, Inbox

log = structlog.get_logger("aund.daemon")

LINK_EVENT_KINDS = frozenset({"state_change", "connection.error", "token.refreshed", "gateway.disconnect",
                              "sync.proof_rejected"})
MESSAGE_EVENT_KINDS = frozenset({"message.received", "message.undecryptable", GROUP_MESSAGE_KIND, GROUP_CHANGED_KIND})
#: Everything `subscribe` accepts (and `kinds: []` means): durable kinds come from the inbox, the
#: others live; aund/aun/events.py has the table of gateway events behind them.
DURABLE_KINDS = MESSAGE_EVENT_KINDS | gw_events.DURABLE_KINDS
LIVE_KINDS = LINK_EVENT_KINDS | gw_events.LIVE_KINDS
ALL_KINDS = DURABLE_KINDS | LIVE_KINDS | gw_events.FAMILIES | {QUARANTINED_KIND}  # (it stands in for a damaged row)
RESYNC_BUDGET_SECONDS = 10.0
SYNC_POLLS_PER_SECOND = 50.0  # the quiet-link polls of all configured links together (see _poll_seconds)
DROP_SPREAD_MAX = 10.0   # s: the widest extra jitter of a reconnect after the gateway dropped every link
STATUS_LINKS = 256       # per-link entries `status` lists unless asked for another number (the counts cover all)
STATUS_LINK_WARNINGS = 32  # link.failed / link.not_ready warnings named one by one; the rest are counted
STORE_LIST_TTL = 30.0    # seconds `status` may reuse the identity store's listing (see Daemon._listed)
RENEW_RETRY_SECONDS = (30.0, 3600.0)  # a failed automatic renewal is retried after 30 s, doubling to 1 h
RENEW_CHECK_SECONDS = 6 * 3600.0      # the renewal timer looks again at least this often (clock changes)


class StoreCredentials:
    """Adapts one stored identity to what a Link needs; file I/O runs in worker threads."""

    def __init__(self, store: IdentityStore, identity: Identity, on_cert_changed=None) -> None:
        self.store = store
        self.aid = identity.aid
        self.private_key = identity.private_key
        self.cert_pem = identity.cert_pem
        self.cert_fingerprint = identity.cert_fingerprint
        self.on_cert_changed = on_cert_changed  # (Identity) -> None: the daemon moves everything over

    async def sync_cert(self, gateway_url: str, trust: auth.GatewayTrust) -> bool:
        """Take the certificate the gateway now serves for our key, if it is another one (verified,
        and kept: the old one stays in the store's history). True when it changed."""
        cert = await auth.current_cert(gateway_url, trust, self.aid, self.private_key)
        if cert is None or pki.cert_fingerprint(cert) == self.cert_fingerprint:
            return False
        await self.adopt_cert(cert, event="identity.cert_synced")
        return True

    async def adopt_cert(self, cert: Any, *, event: str = "identity.cert_adopted") -> None:
        """Make a verified certificate of our key the identity's (login2's `new_cert`, or the one
        the gateway serves): stored (the old one kept in the history), then used everywhere."""
        if pki.cert_fingerprint(cert) == self.cert_fingerprint:
            return
        await trio.to_thread.run_sync(self.store.save_cert, self.aid, pki.cert_pem(cert))
        identity = await trio.to_thread.run_sync(self.store.load, self.aid)
        self.cert_pem, self.cert_fingerprint = identity.cert_pem, identity.cert_fingerprint
        log.info(event, aid=self.aid, cert_fingerprint=identity.cert_fingerprint)
        if self.on_cert_changed is not None:
            await self.on_cert_changed(identity)

    async def load_tokens(self) -> auth.Tokens | None:
        """The stored tokens, or None. Tokens are disposable: a damaged file means a fresh login with
        the key (whose file is never touched), and the next save replaces the damaged one."""
        try:
            stored = await trio.to_thread.run_sync(self.store.load_tokens, self.aid)
            return auth.Tokens.from_json(stored)
        except (CorruptIdentity, TypeError, ValueError) as exc:
            log.warning("identity.tokens_unreadable", aid=self.aid, error=str(exc)[:300], action="login again")
            return None

    async def save_tokens(self, tokens: auth.Tokens) -> None:
        await trio.to_thread.run_sync(self.store.save_tokens, self.aid, tokens.to_json())


@dataclass
class LinkEntry:
    link: Link
    sync: PeerSync
    session: P2PKeys
    pinned: bool
    holders: dict[object, int] = field(default_factory=dict)  # each session or subscription -> its app's conn_id
    groups: GroupSync | None = None
    events: gw_events.GatewayEvents | None = None
    idle_since: float | None = None
    trust_epoch: int = 0  # the trust roots it was started with (a failed link is retried after they change)
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONNECT_OPTIONS))  # connect options
    parked: bool = False  # closed by `identity.disable`; `identity.enable` starts it again in place


class _Lease:
    """An app's lease on the shared link of (AID, slot) (the broker's LinkLease; a stub
    `Session` on the wire): calls, notifications and this lease's protected headers."""

    header_methods = methods.PROTECTED_HEADERS

    def __init__(self, daemon: "Daemon", entry: LinkEntry) -> None:
        self.daemon, self.entry = daemon, entry
        self.aid, self.slot_id = entry.link.aid, entry.link.config.slot_id
        self.protected_headers: dict[str, str] = {}  # signed into this session's sends

    def state(self) -> str:
        return self.entry.link.state.value

    async def wait_ready(self) -> None:
        self.daemon.check_enabled(self.aid)
        await self.entry.link.wait_ready()

    async def call(self, method: str, params: dict[str, Any], *, timeout: float | None, background: bool,
                   app: AppIdentity) -> dict[str, Any]:
        self.daemon.check_enabled(self.aid)
        rule = methods.rule(method)  # what the SDK (and aund) does around this method
        if rule.managed:
            raise InvalidParams(f"{method}: aund pulls and acks messages itself; subscribe to "
                                "message.received events instead")
        refused = [name for name in rule.refused_params if name in params]
        if refused:
            raise InvalidParams(f"{method} does not accept {refused[0]!r}: delivery is a property of the "
                                "connection, not of one message (the official SDK refuses it too)",
                                data={"arg": f"params.{refused[0]}"})
        headers = self.protected_headers
        session, link = self.entry.session, self.entry.link
        if method == "message.send":
            return await session.send(link, params, headers, timeout=timeout)
        if method == "message.thought.put":
            return await session.thought_put(link, params, headers, timeout=timeout)
        if method == "message.history":
            return await session.history(link, params, timeout=timeout)
        if method == "message.thought.get":
            result = await link.call(method, params, timeout=timeout, background=background, on_behalf_of=app)
            return await session.decrypt_thoughts(link.gateway, result)
        if rule.route == "group" and self.entry.groups is not None:
            return await self.entry.groups.call(method, params, headers, timeout=timeout)
        if rule.encrypts or rule.decrypts_result:  # never forwarded as plaintext, never handed on as ciphertext
            raise NotReady(f"{method}: aund holds no E2EE session for {self.aid} here", data={"method": method})
        return await link.call(method, params, timeout=timeout, background=background, on_behalf_of=app)

    async def notify(self, method: str, params: dict[str, Any], *, app: AppIdentity, timeout: float | None = None,
                     **route: Any) -> dict[str, Any]:
        """One notification (no id, no answer) as the SDK's `notify()` frames it (aund.aun.notify)."""
        self.daemon.check_enabled(self.aid)
        wire_method, wire_params = notify_frames.frame(method, params, **route)
        await self.entry.link.notify(wire_method, wire_params, timeout=timeout, on_behalf_of=app)
        return {"sent": True, "method": wire_method}

    def _storage_call(self, app: AppIdentity, timeout: float | None) -> storage.Call:
        link = self.entry.link

        async def call(method: str, params: dict[str, Any]) -> Any:
            return await link.call(method, params, timeout=timeout, background=False, on_behalf_of=app)
        return call

    async def storage_upload(self, data: bytes, params: dict[str, Any], *, overwrite: bool, app: AppIdentity,
                             timeout: float | None) -> dict[str, Any]:
        """Store `data` as the SDK does (inline or by upload session; aund.aun.storage)."""
        return await storage.upload(self._storage_call(app, timeout), data, params, overwrite=overwrite)

    async def storage_download(self, params: dict[str, Any], *, app: AppIdentity,
                               timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """(object view, body): the data plane with this link's access token, which stays here."""
        link = self.entry.link
        return await storage.download(self._storage_call(app, timeout), params, gateway_url=link.gateway,
                                      token=link.access_token)

    def set_protected_headers(self, app: AppIdentity, headers: dict[str, str]) -> None:
        """This session's headers (the SDK's are per client instance; here per app session, so
        closing another session of the same AID leaves them alone)."""
        self.protected_headers = dict(headers)

    def invalidate_prekey_cache(self, peer_aid: str) -> None:
        self.entry.session.invalidate(peer_aid)


class Daemon:
    def __init__(self, config: Config, store: IdentityStore, trust: auth.GatewayTrust, *,
                 policy: Any = None, rng=random.random, connector: transport.Connector | None = None) -> None:
        """`connector` opens every link's gateway WebSockets (default the network's; tests pass
        `aund.testing.FakeGateway.connect`)."""
        self.config, self.store, self.trust = config, store, trust
        self.connector = connector
        self.peers = PeerDirectory(trust, discovery_port=config.discovery_port or None)
        self.trust_epoch = 0
        self.policy = policy
        self.rng = rng
        self.global_budget = CallBudget(config.global_in_flight)  # the socket's and every link's
        self.connect_gate = trio.CapacityLimiter(max(1, config.connect_concurrency))  # handshakes at once
        self.loop_lag = LoopLag()
        self.links: dict[tuple[str, str], LinkEntry] = {}
        self.sessions: dict[str, P2PKeys] = {}
        self.group_sessions: dict[str, GroupKeys] = {}
        self.inbox: Inbox | None = None
        self._subscribers: dict[str, set["_Subscriber"]] = {}
        self.started_at = time.time()
        self.stopping = False
        self.inbox_depth: dict[str, int] = {}
        self.identity_errors: dict[str, tuple[str, str]] = {}
        self.store_write_error = ""  # the identity store's last failed write, "" once one succeeds
        self.store_list_error = ""  # the identity store could not be listed (status says so)
        self._listing: tuple[tuple[int, int] | None, float, list[str]] | None = None  # _listed's cache
        self._nursery: trio.Nursery | None = None
        self._identity_locks: dict[str, trio.Lock] = {}
        self._link_locks: dict[tuple[str, str], trio.Lock] = {}
        self._event_listeners: set[trio.MemorySendChannel] = set()
        self._agent_md_locks: dict[str, trio.Lock] = {}
        self._renewers: set[str] = set()  # AIDs whose certificate renewal timer runs
        self.renewals: dict[str, dict[str, Any]] = {}  # AID -> the last renewal (for status)
        self.disabled: dict[str, dict[str, Any]] = {}  # AID -> {at, by_uid}: `identity.disable` (meta.json)

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus["Daemon"] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the configured identities' links, then serve until cancelled."""
        key = await trio.to_thread.run_sync(self.store.derive_key, "inbox")
        self.inbox = await trio.to_thread.run_sync(Inbox, self.config.state_dir / "inbox.sqlite3", key)
        self.inbox.on_commit = self._wake_subscribers
        self.disabled = await trio.to_thread.run_sync(self._stored_disabled)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.loop_lag.run)
            for aid in self.config.identities:
                nursery.start_soon(self._keep_configured, aid)
            nursery.start_soon(self._reap_idle_links)
            nursery.start_soon(self._watch_inbox)
            task_status.started(self)
            await trio.sleep_forever()

    async def aclose(self) -> None:
        """Close every link politely (bounded), then stop the nursery."""
        self.stopping = True
        with trio.move_on_after(self.config.shutdown_grace) as scope:
            scope.shield = True
            async with trio.open_nursery() as closer:
                for entry in list(self.links.values()):
                    closer.start_soon(entry.link.aclose)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def reload(self, config: Config, policy: Any = None) -> dict[str, Any]:
        """Apply a new configuration: trust roots (bundled + root_ca + the state dir's trust-roots.pem,
        re-read; caches of chains, revocation answers and peer certificates are dropped when they
        change), the identity list (start links for added AIDs, unpin removed ones: they close
        once idle) and, if given, the already validated `policy` built from `config.policy` (the
        broker then takes from its apps what it no longer allows). Other links are not touched.
        Returns what changed."""
        roots = TrustRoots.load(config.root_ca, config.state_dir)  # a bad root file keeps everything as it was
        if roots.certs != self.trust.roots.certs:
            self.trust.replace_roots(roots)
            self.peers.forget()
            self.trust_epoch += 1
            log.info("daemon.trust_reloaded", roots=roots.names(), sources=list(roots.sources))
        old, new = set(self.config.identities), set(config.identities)
        assert self._nursery is not None
        for aid in sorted(old & new):  # configured identities that failed for good get another try now
            entry = self.links.get((aid, config.slot_id))
            if aid in self.identity_errors or (entry is not None and entry.trust_epoch != self.trust_epoch
                                               and entry.link.state == LinkState.CONNECTION_FAILED):
                self.identity_errors.pop(aid, None)
                self._nursery.start_soon(self._keep_configured, aid)
        added, removed = sorted(new - old), sorted(old - new)
        self.config = config
        for aid in added:
            self._nursery.start_soon(self._keep_configured, aid)
        for aid in removed:
            entry = self.links.get((aid, config.slot_id))
            if entry is not None:
                entry.pinned = False
                if not entry.holders:
                    entry.idle_since = trio.current_time()
        changed = policy is not None and policy != self.policy
        if policy is not None:
            self.policy = policy
            if changed:
                log.info("daemon.policy_reloaded", rules=len(policy.rules), owners=sorted(policy.owners))
        log.info("daemon.reloaded", added=added, removed=removed, policy_changed=changed)
        return {"added": added, "removed": removed, "policy_changed": changed}

    async def restart_link(self, app: AppIdentity, aid: str, slot_id: str) -> dict[str, Any]:
        """Start a link that stopped for good (kicked by another instance: 4015, refused, ...) again,
        without a daemon restart; a link that is still running is left as it is."""
        aid = self._permitted(app, aid)
        entry = self.links.get((aid, slot_id))
        if entry is None:
            raise ResourceNotExistError(f"no link for {aid}/{slot_id} (open a session on it first)",
                                        data={"aid": aid, "slot_id": slot_id})
        before = entry.link.state
        if before == LinkState.CONNECTION_FAILED:
            log.info("link.restart", aid=aid, slot_id=slot_id, last_error=entry.link.last_error)
            entry.trust_epoch = -1  # stale: _open_link starts it anew
            entry = await self._open_link(aid, slot_id, pinned=entry.pinned)
        return {"aid": aid, "slot_id": slot_id, "restarted": before == LinkState.CONNECTION_FAILED,
                "state": entry.link.state.value}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        ready = sum(e.link.state == LinkState.READY for e in self.links.values())
        return f"{ready}/{len(self.links)} links ready; {len(self.config.identities)} configured identities"

    async def _keep_configured(self, aid: str) -> None:
        """Make sure a configured identity exists and its link runs; retry registration with backoff."""
        delay = 1.0
        while True:
            if self._note_disabled(aid):
                return
            try:
                loaded = await self._ensure(aid)
                await self._open_link(aid, self.config.slot_id, pinned=True, loaded=loaded)
                self.identity_errors.pop(aid, None)
                return
            except (GatewayUnavailable, trio.TooSlowError) as exc:
                log.warning("identity.ensure_failed", aid=aid, error=str(exc), retry_in=round(delay, 1))
                self.identity_errors[aid] = ("identity.unavailable", str(exc))
            except (StorageError, ClientError) as exc:
                if self._note_disabled(aid):  # disabled while it was being ensured
                    return
                # a damaged or undecryptable identity: say so loudly, touch nothing, do not retry
                log.error("identity.load_failed", aid=aid, error=str(exc), path=exc.data.get("path"))
                self.identity_errors[aid] = ("identity.corrupt" if isinstance(exc, StorageError)
                                             else "identity.invalid", str(exc))
                return
            await trio.sleep(delay * (0.5 + self.rng()))
            delay = min(delay * 2, 64.0)

    # --- identities ----------------------------------------------------------------------------
    async def _gateways(self, aid: str) -> tuple[str, ...]:
        if self.config.gateway_url:
            return self.config.gateway_url
        if self.store.exists(aid):
            meta = await trio.to_thread.run_sync(self.store.load_meta, aid)
            if meta.get("gateway_urls"):
                return tuple(meta["gateway_urls"])
        return tuple(await auth.discover_gateways(aid, port=self.config.discovery_port or None))

    async def ensure_identity(self, aid: str) -> dict[str, Any]:
        """Load; register only if absent; load again. Returns aid and cert_fingerprint."""
        identity, _ = await self._ensure(aid)
        return {"aid": identity.aid, "cert_fingerprint": identity.cert_fingerprint,
                "device_id": identity.device_id}

    async def _ensure(self, aid: str) -> tuple[Identity, tuple[str, ...]]:
        """ensure_identity's work: the loaded identity and its gateways (a configured link starts
        with them, not loading them again)."""
        aid = _normalize_aid(aid)
        lock = self._identity_locks.setdefault(aid, trio.Lock())
        async with lock:
            gateways = await self._gateways(aid)

            async def register(aid_: str, public_key) -> str:
                await self.trust.check_anchor(gateways[0])  # never claim a name where login would fail
                return await auth.create_aid(gateways[0], aid_, public_key)

            try:
                identity = await self.store.ensure(aid, register, meta={"gateway_urls": list(gateways)})
            except ResourceAlreadyExistError as exc:  # the name is someone else's: our pending key is of no use
                kept = await trio.to_thread.run_sync(self.store.abandon_pending, aid)
                log.warning("identity.name_taken", aid=aid, kept=str(kept) if kept else None)
                raise ResourceAlreadyExistError(
                    f"{aid} is registered on its gateway with another key: choose another name (the unused key "
                    f"was kept in {kept})" if kept else str(exc), data={"aid": aid}) from None
            except StorageError as exc:
                if not isinstance(exc, CorruptIdentity):  # a failed write (full disk, ...): for health
                    self.store_write_error = exc.message
                raise
            self.store_write_error = ""
        return identity, gateways

    async def show_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """One identity as `aund aid show` prints it: certificate, device, gateways, links, inbox
        depth and the durable consumers of the app's uid (of every uid for the owners)."""
        aid = self._permitted(app, aid)
        try:
            identity = await trio.to_thread.run_sync(self.store.load, aid)
        except IdentityNotFound:
            raise IdentityNotFound(f"aund holds no identity {aid}: run identity.ensure first", data={"aid": aid}) \
                from None
        meta = await trio.to_thread.run_sync(self.store.load_meta, aid)
        cert = identity.cert
        everything = self.sees_all(app)
        assert self.inbox is not None
        prefix = "" if everything else consumer_key(app, "")
        consumers = [{"consumer": name if everything else name[len(prefix):], "cursor": cursor, "updated_at": at}
                     for name, cursor, at in await self.inbox.consumers(aid, prefix)]
        links = [vars(e.link.statistics()) for (a, _), e in sorted(self.links.items()) if a == aid]
        return {"aid": aid, "cert_fingerprint": identity.cert_fingerprint, "device_id": identity.device_id,
                "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_before": cert.not_valid_before_utc.timestamp(), "not_after": cert.not_valid_after_utc.timestamp(),
                "gateways": list(meta.get("gateway_urls") or self.config.gateway_url),
                "agent_md_etag": meta.get("agent_md_etag", ""), "links": links,
                "inbox_events": (await self.inbox.depth()).get(aid, 0), "consumers": consumers,
                "disabled": self.disabled.get(aid)}

    async def reset_consumer(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> dict[str, Any]:
        """Move the app uid's durable consumer back (or forward) to `cursor`: it reads again after it."""
        aid = self._permitted(app, aid)
        assert self.inbox is not None
        try:
            await self.inbox.reset_consumer(aid, consumer_key(app, consumer), cursor)
        except AckPastHead as exc:
            raise InvalidParams(f"cursor {cursor} is past the newest event of {aid} ({exc.head})",
                                data={"cursor": cursor, "head": exc.head}) from None
        log.info("inbox.consumer_reset", aid=aid, consumer=consumer, uid=app.uid, cursor=cursor)
        return {"aid": aid, "consumer": consumer, "cursor": cursor}

    # --- disable / enable: the daemon stops holding an AID, and holds it again ---------------------
    def _stored_disabled(self) -> dict[str, dict[str, Any]]:
        """The AIDs whose meta.json says `disabled` (read at start: it survives restarts)."""
        out = {}
        for aid in self._listed():
            try:
                flag = self.store.load_meta(aid).get("disabled")
            except StorageError as exc:
                log.warning("identity.meta_unreadable", aid=aid, error=str(exc))
                continue
            if flag:
                out[aid] = flag if isinstance(flag, dict) else {"at": 0, "by_uid": None}
        return out

    def _disabled_error(self, aid: str) -> PermissionDenied:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.disabled[aid].get("at") or 0))
        return PermissionDenied(f"{aid} is disabled (since {when}): aund holds no link for it; "
                                f"`aund aid enable {aid}` holds it again",
                                data={"aid": aid, "reason": "identity_disabled", "disabled": self.disabled[aid]})

    def check_enabled(self, aid: str) -> None:
        """PermissionDenied (`data.reason` "identity_disabled", saying how to enable it) for a disabled AID."""
        if aid in self.disabled:
            raise self._disabled_error(aid)

    def _note_disabled(self, aid: str) -> bool:
        """For a configured identity: True (and logged once) when it is disabled and so not connected."""
        if aid not in self.disabled:
            return False
        log.info("identity.disabled_not_connected", aid=aid)
        return True

    async def disable_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """Stop holding `aid`: flag it in its meta.json (kept across restarts), close its links
        (kept as entries, so the apps' sessions follow when it is enabled), end its subscriptions
        with PermissionDenied; sessions, calls and subscriptions are refused until `enable_identity`.
        Nothing is deleted. `{aid, disabled, changed, links_closed}`."""
        aid = self._permitted(app, aid)
        await self._load(aid)  # IdentityNotFound for an AID aund does not hold
        changed = aid not in self.disabled
        if changed:
            flag = {"at": time.time(), "by_uid": app.uid}
            await trio.to_thread.run_sync(lambda: self.store.update_meta(aid, disabled=flag))
            self.disabled[aid] = flag
        closed = 0
        for (a, slot) in [key for key in self.links if key[0] == aid]:
            async with self._link_locks.setdefault((a, slot), trio.Lock()):  # not while one is being started
                entry = self.links.get((a, slot))
                if entry is None:
                    continue
                if entry.link.state != LinkState.CLOSED:
                    closed += 1
                entry.parked = True
                await entry.link.aclose()
        error = self._disabled_error(aid)
        for sub in list(self._subscribers.get(aid, ())):
            sub.error = error
            sub.wake()
        log.info("identity.disabled", aid=aid, uid=app.uid, links_closed=closed, changed=changed)
        return {"aid": aid, "disabled": True, "changed": changed, "links_closed": closed}

    async def enable_identity(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """Hold a disabled `aid` again: the flag in meta.json is cleared (the time is kept as
        `enabled`), links that apps or the configuration held start again in place, a configured
        identity that was never connected is connected. `{aid, disabled, changed, connecting}`."""
        aid = self._permitted(app, aid)
        await self._load(aid)
        changed = aid in self.disabled
        if changed:
            mark = {"at": time.time(), "by_uid": app.uid}
            await trio.to_thread.run_sync(lambda: self.store.update_meta(aid, disabled=None, enabled=mark))
            self.disabled.pop(aid, None)
        assert self._nursery is not None
        restart = []
        for key, entry in list(self.links.items()):
            if key[0] != aid or not entry.parked:
                continue
            if entry.pinned or entry.holders:
                restart.append((key[1], entry.pinned))
            else:
                del self.links[key]  # nobody holds it: opened again on demand
        for slot, pinned in restart:
            self._nursery.start_soon(self._reopen_after_enable, aid, slot, pinned)
        connecting = bool(restart)
        if changed and aid in self.config.identities and (aid, self.config.slot_id) not in self.links:
            self._nursery.start_soon(self._keep_configured, aid)
            connecting = True
        log.info("identity.enabled", aid=aid, uid=app.uid, changed=changed, links=len(restart))
        return {"aid": aid, "disabled": False, "changed": changed, "connecting": connecting}

    async def _reopen_after_enable(self, aid: str, slot_id: str, pinned: bool) -> None:
        try:
            await self._open_link(aid, slot_id, pinned=pinned)
        except AundError as exc:
            log.warning("link.reopen_failed", aid=aid, slot=slot_id, error=str(exc))

    def call_budget(self, limits: Any, configured: set[str]) -> CallBudget:
        """The one daemon-wide budget of gateway calls in flight, for the app socket as for the
        links (aund.aun.budget.CallBudget). `[limits] global_calls`, when configured, sizes it;
        else `global_in_flight`."""
        if "global_calls" in configured:
            self.global_budget.resize(limits.global_calls)
        return self.global_budget

    def list_identities(self) -> list[dict[str, Any]]:
        out = []
        for aid in self.store.list():
            links = [e.link.statistics() for (a, _), e in self.links.items() if a == aid]
            out.append({"aid": aid, "links": [{"slot_id": s.slot_id, "state": s.state} for s in links],
                        "disabled": aid in self.disabled})
        return out

    async def _open_link(self, aid: str, slot_id: str, *, pinned: bool,
                         options: dict[str, Any] | None = None,
                         loaded: tuple[Identity, tuple[str, ...]] | None = None) -> LinkEntry:
        """The running link for (aid, slot), started once even when asked for concurrently.
        `options` (normalised connect options) must agree with a link that runs; an idle link
        (no holder, not configured) with other options is closed and started again with them."""
        key = (aid, slot_id)
        lock = self._link_locks.setdefault(key, trio.Lock())
        async with lock:
            return await self._open_link_locked(aid, slot_id, pinned=pinned, options=options, loaded=loaded)

    def _check_options(self, aid: str, slot_id: str, options: dict[str, Any]) -> None:
        """The gateway wants one delivery mode per AID: refuse up front, naming the link that differs."""
        for (other_aid, other_slot), entry in self.links.items():
            if other_aid != aid or entry.link.state == LinkState.CLOSED or entry.options == options:
                continue
            if other_slot == slot_id and not entry.holders and not entry.pinned:
                continue  # idle: restarted with the new options
            what = "is open" if other_slot == slot_id else "runs on slot " + repr(other_slot)
            raise InvalidParams(
                f"{aid}/{slot_id}: the link {what} with delivery_mode {entry.options['delivery_mode']!r}"
                f"{' (' + entry.options['delivery_routing'] + ')' if entry.options['delivery_routing'] else ''}; "
                f"asked for {options['delivery_mode']!r}. All links of one AID share one delivery mode "
                "(the gateway refuses a mix); open it with the same options, or "
                + ("note that it is configured (`identities`) and kept with the default options" if entry.pinned
                   else "release the other sessions first"),
                data={"arg": "options.delivery_mode", "slot_id": other_slot, "current": dict(entry.options)})

    async def _open_link_locked(self, aid: str, slot_id: str, *, pinned: bool,
                                options: dict[str, Any] | None = None,
                                loaded: tuple[Identity, tuple[str, ...]] | None = None) -> LinkEntry:
        key = (aid, slot_id)
        entry = self.links.get(key)
        if options is not None:
            self._check_options(aid, slot_id, options)
        else:  # as the link runs; a new one as the AID's other links run (one delivery mode per AID)
            others = (e.options for (a, _), e in self.links.items() if a == aid and e.link.state != LinkState.CLOSED)
            options = entry.options if entry is not None else next(others, dict(DEFAULT_CONNECT_OPTIONS))
        if entry is not None and entry.options != options and entry.link.state != LinkState.CLOSED:
            log.info("link.restart_for_options", aid=aid, slot=slot_id, options=options)  # idle (checked above)
            del self.links[key]
            await entry.link.aclose()
            entry = None
        stale = entry is not None and entry.link.state == LinkState.CONNECTION_FAILED \
            and entry.trust_epoch != self.trust_epoch  # it failed under other trust roots: start anew
        if entry is not None and entry.link.state not in (LinkState.CLOSED,) and not stale:
            entry.pinned = entry.pinned or pinned
            return entry
        self.check_enabled(aid)
        if loaded is not None:  # just ensured (a configured identity at start): not loaded again
            identity, gateways = loaded
        else:
            try:
                identity = await trio.to_thread.run_sync(self.store.load, aid)
            except IdentityNotFound:
                raise IdentityNotFound(f"unknown identity {aid}: run identity.ensure first") from None
            gateways = await self._gateways(aid)
        session = self.sessions.get(aid)
        if session is None:
            session = P2PKeys(identity, self.store, self.peers)
            await session.load()
            self.sessions[aid] = session
        group_session = self.group_sessions.get(aid)
        if group_session is None:
            group_session = GroupKeys(session)
            await group_session.load()
            self.group_sessions[aid] = group_session
        config = LinkConfig(gateways=gateways, device_id=identity.device_id, slot_id=slot_id,
                            call_timeout=self.config.call_timeout, drop_spread=self._drop_spread(),
                            max_frame=self.config.gateway_max_frame or transport.MAX_FRAME, **options)
        creds = StoreCredentials(self.store, identity, on_cert_changed=self._cert_synced)
        link = Link(creds, config, self.trust, global_budget=self.global_budget,
                    on_event=self._on_link_event, on_state=self._on_link_state, on_connected=self._on_connected,
                    on_admission_refused=self._admission_refused,
                    rng=self.rng, connector=self.connector, connect_gate=self.connect_gate, loop_lag=self.loop_lag)
        assert self.inbox is not None
        poll = self._poll_seconds()
        sync = PeerSync(link, session, self.inbox, on_notice=self._publish, poll_seconds=poll)
        groups = GroupSync(link, group_session, self.inbox, poll_seconds=poll)
        events = gw_events.GatewayEvents(link, session, self.inbox, self._publish)
        sync.on_volatile = lambda row: events.on_event("message.received", {"inline_message": row})
        if entry is not None and (entry.link.state == LinkState.CONNECTION_FAILED or entry.parked):
            # started anew in place: the apps' handles and holds stay valid and follow the new link
            entry.parked = False
            entry.link, entry.sync, entry.groups, entry.events = link, sync, groups, events
            entry.trust_epoch, entry.pinned, entry.options = self.trust_epoch, entry.pinned or pinned, dict(options)
        else:
            entry = LinkEntry(link, sync, session, pinned, groups=groups, trust_epoch=self.trust_epoch,
                              options=dict(options), events=events)
            self.links[key] = entry
        assert self._nursery is not None
        await self._nursery.start(self._run_link, entry)
        if aid not in self._renewers:
            self._renewers.add(aid)
            self._nursery.start_soon(self._renew_loop, aid)
        return entry

    def _poll_seconds(self) -> float:
        """How often a quiet link checks for a lost push (`message.peers`, `group.list_my`):
        `sync_poll_seconds`, stretched so that all configured links together poll at most
        SYNC_POLLS_PER_SECOND times a second (10,000 links: every 200 s, not 667 RPCs a second)."""
        return max(self.config.sync_poll_seconds, len(self.config.identities) / SYNC_POLLS_PER_SECOND)

    def _drop_spread(self) -> float:
        """The extra reconnect jitter after the gateway closed the links: none for a few links (the
        SDK's schedule), 1 s per 1,000 configured identities above 100, at most DROP_SPREAD_MAX."""
        n = len(self.config.identities)
        return 0.0 if n < 100 else min(DROP_SPREAD_MAX, n / 1000)

    async def _run_link(self, entry: LinkEntry, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The link's supervisor and its sync task live and die together."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entry.sync.run)
            nursery.start_soon(entry.groups.run)
            nursery.start_soon(entry.events.run)
            await nursery.start(entry.link.run)
            task_status.started()
            await entry.link.wait_stopped()
            nursery.cancel_scope.cancel()

    async def _on_connected(self, link: Link) -> None:
        """After every (re)connect, before the link is ready: publish the prekey, then catch up."""
        entry = self.links[(link.aid, link.config.slot_id)]
        with trio.move_on_after(RESYNC_BUDGET_SECONDS):  # first: the gateway may admit nothing without it
            await self._publish_agent_md(link, entry.session.identity)
        await entry.session.publish_prekey(link)
        with trio.move_on_after(RESYNC_BUDGET_SECONDS):
            await entry.sync.full_sync()
        with trio.move_on_after(RESYNC_BUDGET_SECONDS):
            await entry.groups.on_connected()  # group prekeys, then catch-up queued to the group sync
        if entry.events is not None:
            entry.events.on_connected()  # invites and read positions missed while away, queued

    async def _admission_refused(self, link: Link, exc: AuthError, method: str, params: dict[str, Any]) -> bool:
        """A -32003: publish the AID's own card again, or bind / publish the group's identity it
        names; True when the call is worth retrying."""
        entry = self.links.get((link.aid, link.config.slot_id))
        if entry is None:
            return False
        if own_card_refused(exc):
            await self._publish_agent_md(link, entry.session.identity, force=True)
            return True
        try:
            return await entry.groups.session.identities.recover(link, exc, params)
        except AundError as error:
            log.warning("groups.identity_recovery_failed", aid=link.aid, method=method, error=str(error))
            return False

    async def _publish_agent_md(self, link: Link, identity: Identity, *, force: bool = False) -> None:
        """Publish the AID's signed agent.md once (the production gateway refuses clients that
        declare agent.md validation without one): a HEAD, then a PUT only when it is missing (the
        text kept in meta is published again where there is one). Recorded in the identity's
        meta, so later connects do nothing. Failures are logged and
        retried at the next connect; they never stop the link."""
        meta = await trio.to_thread.run_sync(self.store.load_meta, identity.aid)
        if meta.get("agent_md_etag") and not force:  # force: the gateway says it has none (-32003)
            return
        try:
            status, headers, _ = await cards.request("HEAD", link.gateway, identity.aid)
            if status == 404:
                text = agent_md.sign(meta.get("agent_md") or agent_md.default_document(identity.aid),
                                     identity.private_key, identity.cert)
                status, headers, _ = await cards.request("PUT", link.gateway, identity.aid, text.encode("utf-8"),
                                                          token=link.access_token, condition=("If-None-Match", "*"))
                if status == 200:
                    await trio.to_thread.run_sync(lambda: self.store.update_meta(identity.aid, agent_md=text))
            if status in (200, 412) and headers.get("etag"):
                await trio.to_thread.run_sync(lambda: self.store.update_meta(identity.aid,
                                                                             agent_md_etag=headers["etag"]))
                log.info("identity.agent_md_published", aid=identity.aid, etag=headers["etag"])
            else:
                log.warning("identity.agent_md_failed", aid=identity.aid, status=status)
        except (AundError, agent_md.AgentMdError) as exc:
            log.warning("identity.agent_md_failed", aid=identity.aid, error=str(exc))

    async def agent_md(self, app: AppIdentity, aid: str) -> dict[str, Any]:
        """The AID's agent.md as its gateway serves it: `{aid, content, etag}`."""
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}")
        entry = self.links.get((aid, self.config.slot_id))
        gateway = entry.link.gateway if entry is not None else (await self._gateways(aid))[0]
        status, headers, body = await cards.request("GET", gateway, aid)
        if status == 404:
            raise ResourceNotExistError(f"no agent.md is published for {aid}", data={"aid": aid})
        if status != 200:
            raise GatewayError(f"GET agent.md of {aid}: HTTP {status}", retryable=status >= 500 or status == 429)
        try:
            content = body.decode("utf-8")
        except UnicodeDecodeError:
            raise GatewayError(f"the gateway serves an agent.md of {aid} that is not UTF-8", retryable=False) from None
        return {"aid": aid, "content": content, "etag": headers.get("etag", "")}

    async def set_agent_md(self, app: AppIdentity, aid: str, content: str) -> dict[str, Any]:
        """Replace the AID's agent.md with `content` (any signature in it dropped), signed with the
        AID key: checked first (InvalidParams naming the field, nothing uploaded), then uploaded
        over the AID's link and kept in its meta (the card published again when a gateway lost it).
        Returns `{aid, etag, content}` (the signed document)."""
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}")
        try:
            identity = await trio.to_thread.run_sync(self.store.load, aid)
        except IdentityNotFound:
            raise IdentityNotFound(f"unknown identity {aid}: run identity.ensure first", data={"aid": aid}) from None
        try:
            text = agent_md.sign(content, identity.private_key, identity.cert)
            agent_md.validate(text, aid=aid, cert=identity.cert)
        except agent_md.AgentMdError as exc:
            raise cards.bad_card(str(exc), exc.field, exc.code) from None
        entry = await self._open_link(aid, self.config.slot_id, pinned=False)
        hold = object()  # keeps the link from being reaped while it uploads (the daemon's own hold, no app)
        self._hold(entry, hold, 0)
        try:
            with trio.move_on_after(self.config.call_timeout):
                await entry.link.wait_ready()
            if entry.link.state != LinkState.READY:
                raise NotReady(f"{aid}: the link is {entry.link.state.value}, agent.md not uploaded",
                               data={"aid": aid, "state": entry.link.state.value})
            async with self._agent_md_locks.setdefault(aid, trio.Lock()):  # the card kept = the card published
                etag = await self._replace_agent_md(entry.link, aid, text)
                await trio.to_thread.run_sync(lambda: self.store.update_meta(aid, agent_md=text, agent_md_etag=etag))
        finally:
            self._let_go(entry, hold)
        log.info("identity.agent_md_replaced", aid=aid, etag=etag)
        return {"aid": aid, "etag": etag, "content": text}

    async def _replace_agent_md(self, link: Link, aid: str, text: str) -> str:
        return await cards.replace(link.gateway, aid, text, token=link.access_token)

    # --- identity operations: sign, verify, resolve, renew, rekey ----------------------------------
    def _check_allowed(self, app: AppIdentity, aid: str) -> str:
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}", data={"aid": aid})
        return aid

    async def _load(self, aid: str) -> Identity:
        try:
            return await trio.to_thread.run_sync(self.store.load, aid)
        except IdentityNotFound:
            raise IdentityNotFound(f"unknown identity {aid}: run identity.ensure first", data={"aid": aid}) from None

    async def sign(self, app: AppIdentity, aid: str, data: bytes) -> dict[str, Any]:
        """A signature over `data` with the AID key, the hash its curve calls for (the key never
        leaves the daemon): `{aid, signature (DER bytes), signature_b64, cert_fingerprint, algorithm}`."""
        aid = self._check_allowed(app, aid)
        self.check_enabled(aid)  # a disabled AID signs nothing either
        identity = await self._load(aid)
        signature = pki.sign_for_key(identity.private_key, data)
        hash_ = pki.hash_for_key(identity.private_key)
        return {"aid": aid, "signature": signature, "signature_b64": pki.b64e(signature),
                "cert_fingerprint": identity.cert_fingerprint,
                "algorithm": f"ECDSA-{hash_.name.upper()}" if hash_ is not None else "Ed25519"}

    async def _home(self, app: AppIdentity, via: str | None, subject: str) -> tuple[str, str]:
        """(gateway, AID) the peer directory looks from: `via` (an AID of this app), else the
        subject itself or the first identity this app may use; discovery alone when there is none."""
        candidates = [via] if via else [subject, *self.store.list()]
        for aid in candidates:
            aid = _normalize_aid(aid)
            if via and not self.allowed(app, aid):
                raise PermissionDenied(f"uid {app.uid} may not use {aid}", data={"aid": aid})
            if self.allowed(app, aid) and self.store.exists(aid):
                entry = self.links.get((aid, self.config.slot_id))
                return (entry.link.gateway if entry is not None else (await self._gateways(aid))[0]), aid
            if via:
                raise IdentityNotFound(f"unknown identity {aid}", data={"aid": aid})
        if self.config.gateway_url:
            return self.config.gateway_url[0], subject
        return "", ""

    async def _verified_cert(self, app: AppIdentity, aid: str, fingerprint: str, via: str | None):
        gateway, home = await self._home(app, via, aid)
        cert = await self.peers.certificate(aid, home_gateway=gateway, home_aid=home, fingerprint=fingerprint)
        return cert, await self.peers.gateway_for(aid, gateway, home)

    async def resolve_peer(self, app: AppIdentity, aid: str, fingerprint: str = "", via: str | None = None
                           ) -> dict[str, Any]:
        """The peer's certificate, verified (chain to a trusted root, CN, CRL and OCSP), and its gateway."""
        aid = _normalize_aid(aid)
        cert, gateway = await self._verified_cert(app, aid, fingerprint, via)
        return _cert_view(aid, cert, gateway)

    async def verify(self, app: AppIdentity, data: bytes, signature: bytes, *, aid: str | None = None,
                     cert_pem: str | None = None, fingerprint: str = "", via: str | None = None) -> dict[str, Any]:
        """Does `signature` over `data` verify with the key of `aid` (its verified certificate, the
        one `fingerprint` names, else the current one) or of `cert_pem` (verified the same way)?"""
        if cert_pem is not None:
            try:
                cert = pki.load_cert_pem(cert_pem)
            except pki.PKIError as exc:
                raise InvalidParams(f"cert: {exc}", data={"arg": "cert"}) from None
            subject = _normalize_aid(pki.cert_aid(cert))
            if aid is not None and _normalize_aid(aid) != subject:
                raise InvalidParams(f"cert is for {subject}, not {aid}", data={"arg": "cert"})
            gateway, home = await self._home(app, via, subject)
            gateway = await self.peers.gateway_for(subject, gateway, home)
            await self.trust.verify(gateway, cert, expected_cn=subject)
        elif aid is not None:
            subject = _normalize_aid(aid)
            cert, gateway = await self._verified_cert(app, subject, fingerprint, via)
        else:
            raise InvalidParams("identity.verify needs `aid` or `cert`", data={"arg": "aid"})
        return {"valid": pki.verify_signature(cert.public_key(), signature, data), "aid": subject,
                "cert_fingerprint": pki.cert_fingerprint(cert)}

    async def renew_identity(self, app: AppIdentity | None, aid: str, *, rekey: bool = False) -> dict[str, Any]:
        """A new certificate for the AID from its gateway (`auth.renew_cert`: same key), or with
        `rekey` a new key and its certificate (`auth.rekey`). Nothing is deleted: old certificates
        stay in the store's history (peers fetch them by fingerprint), old keys in `keys/` (late
        messages wrapped to them still open). Links, E2EE and the agent.md move to the new one."""
        aid = self._check_allowed(app, aid) if app is not None else _normalize_aid(aid)
        self.check_enabled(aid)
        async with self._identity_locks.setdefault(aid, trio.Lock()):
            old = await self._load(aid)
            entry = self.links.get((aid, self.config.slot_id))
            gateway = entry.link.gateway if entry is not None else (await self._gateways(aid))[0]
            if rekey:
                new_key = await trio.to_thread.run_sync(self.store.rekey_pending, aid)
                # a rekey the gateway took before we could store its answer (crash, lost reply): finish it
                cert = await auth.current_cert(gateway, self.trust, aid, new_key)
                if cert is None:
                    cert = await auth.rekey(gateway, self.trust, aid, old.private_key, old.cert_pem, new_key)
                else:
                    log.info("identity.rekey_recovered", aid=aid, cert_fingerprint=pki.cert_fingerprint(cert))
                await trio.to_thread.run_sync(self.store.commit_rekey, aid, new_key, pki.cert_pem(cert))
            else:
                cert = await auth.renew_cert(gateway, self.trust, aid, old.private_key, old.cert_pem)
                await trio.to_thread.run_sync(self.store.save_cert, aid, pki.cert_pem(cert))
            identity = await self._load(aid)
            past = await trio.to_thread.run_sync(self.store.past_keys, aid)
        self._apply_identity(identity, past)
        log.info("identity.rekeyed" if rekey else "identity.cert_renewed", aid=aid,
                 old_fingerprint=old.cert_fingerprint, cert_fingerprint=identity.cert_fingerprint,
                 not_after=identity.cert.not_valid_after_utc.isoformat())
        self.renewals[aid] = {"at": time.time(), "rekey": rekey, "cert_fingerprint": identity.cert_fingerprint}
        await self._after_renewal(identity, rekey)
        return {"aid": aid, "rekeyed": rekey, "cert_fingerprint": identity.cert_fingerprint,
                "old_cert_fingerprint": old.cert_fingerprint,
                "not_after": identity.cert.not_valid_after_utc.timestamp()}

    async def _cert_synced(self, identity: Identity) -> None:
        """A link found a newer certificate of our key at the gateway (another instance renewed)."""
        past = await trio.to_thread.run_sync(self.store.past_keys, identity.aid)
        self._apply_identity(identity, past)
        await trio.to_thread.run_sync(lambda: self.store.update_meta(identity.aid, agent_md_etag=""))

    def _apply_identity(self, identity: Identity, past: list[Any]) -> None:
        """Every in-memory user of the AID's key and certificate takes the new ones."""
        self.peers.forget_peer(identity.aid)
        for (aid, _), entry in self.links.items():
            if aid == identity.aid:
                creds = entry.link.creds
                creds.private_key, creds.cert_pem = identity.private_key, identity.cert_pem
                creds.cert_fingerprint = identity.cert_fingerprint
        session = self.sessions.get(identity.aid)
        if session is not None:
            session.set_identity(identity, past)
        group_session = self.group_sessions.get(identity.aid)
        if group_session is not None:
            group_session.identity = identity

    async def _after_renewal(self, identity: Identity, rekey: bool) -> None:
        """On a ready link: the agent.md signed again (its signature names the certificate), and
        after a rekey a prekey signed by the new key. Failures are logged; the next connect retries."""
        entry = self.links.get((identity.aid, self.config.slot_id))
        if entry is None or entry.link.state != LinkState.READY:
            await trio.to_thread.run_sync(lambda: self.store.update_meta(identity.aid, agent_md_etag=""))
            return  # the next connect publishes (and, after a rekey, the E2EE session rotates)
        try:
            meta = await trio.to_thread.run_sync(self.store.load_meta, identity.aid)
            text = agent_md.sign(meta.get("agent_md") or agent_md.default_document(identity.aid),
                                 identity.private_key, identity.cert)
            async with self._agent_md_locks.setdefault(identity.aid, trio.Lock()):
                etag = await self._replace_agent_md(entry.link, identity.aid, text)
                await trio.to_thread.run_sync(lambda: self.store.update_meta(identity.aid, agent_md=text,
                                                                             agent_md_etag=etag))
            log.info("identity.agent_md_replaced", aid=identity.aid, etag=etag)
        except (AundError, agent_md.AgentMdError) as exc:
            log.warning("identity.agent_md_failed", aid=identity.aid, error=str(exc))
        if rekey:
            try:
                await entry.session.publish_prekey(entry.link, rotate=True)
            except AundError as exc:
                log.warning("identity.prekey_publish_failed", aid=identity.aid, error=str(exc))

    async def _renew_loop(self, aid: str) -> None:
        """The AID's renewal timer: renew once less than `cert_renew_fraction` of the certificate's
        validity is left; a failure is retried with backoff (the old certificate serves meanwhile)."""
        retry = RENEW_RETRY_SECONDS[0]
        while True:
            if aid in self.disabled:  # a disabled AID does not speak to its gateway, renewals included
                await trio.sleep(RENEW_RETRY_SECONDS[0])
                continue
            try:
                identity = await trio.to_thread.run_sync(self.store.load, aid)
            except (AundError, OSError) as exc:
                log.warning("identity.renew_check_failed", aid=aid, error=str(exc))
                await trio.sleep(RENEW_CHECK_SECONDS)
                continue
            due = renewal_due(identity.cert, self.config.cert_renew_fraction)
            wait = due - time.time()
            if wait > 0:
                await trio.sleep(min(wait, RENEW_CHECK_SECONDS))
                continue
            try:
                await self.renew_identity(None, aid)
                retry = RENEW_RETRY_SECONDS[0]
            except AundError as exc:
                log.warning("identity.renew_failed", aid=aid, error=str(exc), retry_in=retry)
                await trio.sleep(retry)
                retry = min(retry * 2, RENEW_RETRY_SECONDS[1])

    async def _watch_inbox(self) -> None:
        """Keep the inbox depth per AID fresh for `status` (which must answer without I/O)."""
        assert self.inbox is not None
        while True:
            self.inbox_depth = await self.inbox.depth()
            await trio.sleep(5.0)

    async def _reap_idle_links(self) -> None:
        """Close on-demand links nobody has held for `idle_link_seconds`."""
        while True:
            await trio.sleep(min(30.0, self.config.idle_link_seconds))
            now = trio.current_time()
            for key, entry in list(self.links.items()):
                if entry.pinned or entry.holders or entry.idle_since is None:
                    continue
                if now - entry.idle_since >= self.config.idle_link_seconds:
                    log.info("link.idle_close", aid=key[0], slot=key[1])
                    del self.links[key]
                    await entry.link.aclose()

    # --- events ----------------------------------------------------------------------------------
    def _on_link_event(self, link: Link, name: str, params: dict[str, Any]) -> None:
        """Every gateway event goes somewhere (aund/aun/events.py): message pushes to the peer sync
        (volatile ones to the event sink), group pushes to the group sync, durable events to the
        inbox through the event sink, the rest live to the subscribers."""
        entry = self.links.get((link.aid, link.config.slot_id))
        if name in gw_events.MESSAGE_PUSHES:
            if entry is not None and gw_events.is_volatile(params) and entry.events is not None:
                entry.events.on_event(name, params)
            elif entry is not None:
                entry.sync.on_event(name, params)
        elif name in GROUP_EVENTS:
            if entry is not None and entry.groups is not None:
                entry.groups.on_event(name, params)
        elif name in LINK_EVENT_KINDS:
            self._publish(link.aid, name, params)
        else:
            rule = gw_events.rule_for(name)
            if rule.durable:
                if entry is not None and entry.events is not None:
                    entry.events.on_event(name, params)
            elif rule.kind == gw_events.OTHER_KIND:
                self._publish(link.aid, rule.kind, {"event": name, "params": params})
            else:
                self._publish(link.aid, rule.kind, params)

    def _on_link_state(self, link: Link, state: LinkState, info: dict[str, Any]) -> None:
        self._publish(link.aid, "state_change", {"slot_id": link.config.slot_id, "state": state.value, **info})

    def _publish(self, aid: str, kind: str, data: dict[str, Any]) -> None:
        """A non-durable link event to the subscribers of `aid` (bounded: the oldest is dropped)."""
        for sub in self._subscribers.get(aid, ()):
            sub.offer(kind, data)

    def _wake_subscribers(self, aid: str) -> None:
        for sub in self._subscribers.get(aid, ()):
            sub.wake()

    # --- Backend (for the broker) ------------------------------------------------------------------
    def daemon_info(self) -> dict[str, Any]:
        return {"daemon_version": aund.__version__, "features": ["links", "link_events"]}

    def status(self, app: AppIdentity | None = None, *, links: int | None = None, offset: int = 0,
               aids: list[str] | None = None) -> dict[str, Any]:
        """Everything for None and for the owners (root, the daemon's uid); any other app sees the
        links, inbox depths and warnings of the AIDs its policy allows, and only its own uid's apps
        (daemon-wide counters and warnings that name no AID stay).

        `link_counts` (links by state; a disabled identity's as "disabled") and `links_total`
        cover every visible link; `links` lists
        at most `links` of them (default STATUS_LINKS, 0: none) from `offset` on, only those of
        `aids` if given, so that the reply fits a local frame with 10,000 links."""
        everything = app is None or self.sees_all(app)

        def visible(aid: str) -> bool:
            return everything or self.allowed(app, aid)  # type: ignore[arg-type]

        limit = STATUS_LINKS if links is None else max(0, links)
        wanted = None if aids is None else {_aid_key(a) for a in aids}
        counts: dict[str, int] = {}
        page: list[LinkEntry] = []
        seen = 0
        for (aid, _), e in self.links.items():
            if not visible(aid):
                continue
            state = "disabled" if e.parked else e.link.state.value
            counts[state] = counts.get(state, 0) + 1
            if wanted is not None and aid not in wanted:
                continue
            if offset <= seen < offset + limit:
                page.append(e)
            seen += 1
        listed = [vars(e.link.statistics()) | {"pinned": e.pinned, "holders": len(set(e.holders.values()) - {0}),
                                               "delivery_mode": e.options["delivery_mode"], "disabled": e.parked}
                  for e in page]
        budget, app_share = self.global_budget.statistics(), self.global_budget.app_statistics()
        out = {"daemon_version": aund.__version__, "started_at": self.started_at, "stopping": self.stopping,
               "identities": sum(map(visible, self._listed())), "links": listed,
               "link_counts": counts, "links_total": sum(counts.values()),
               "links_page": {"offset": offset, "limit": limit, "matching": seen,
                              "truncated": seen > len(listed)},
               "inbox": {aid: n for aid, n in self.inbox_depth.items() if visible(aid)},
               "inbox_written": {aid: n for aid, n in (self.inbox.events_written if self.inbox is not None
                                                       else {}).items() if visible(aid)},
               "budget": {"total": budget.total_tokens, "in_use": budget.borrowed_tokens,
                          "waiting": budget.tasks_waiting, "reserved_for_daemon": self.global_budget.reserve,
                          "app_calls": app_share.borrowed_tokens, "app_calls_waiting": app_share.tasks_waiting},
               "process": systemd.core_dump_state(),
               "renewals": {aid: r for aid, r in self.renewals.items() if visible(aid)},
               "disabled": {aid: d for aid, d in self.disabled.items() if visible(aid)},
               "warnings": [w for w in self.warnings() if "aid" not in w or visible(w["aid"])]}
        if app is not None:
            out["view"] = {"uid": app.uid, "all": everything}
        return out

    def _listed(self) -> list[str]:
        """The store's AIDs for status; a store that cannot be read is a warning there, not an error.
        Listing 10,000 AIDs takes ~0.1 s (a stat per AID), so the listing is kept while the AIDs
        directory is the same (inode, mtime) and changed longer than a second ago, at most
        STORE_LIST_TTL seconds (what changes inside an AID's own directory shows within that)."""
        try:
            st = os.stat(self.store.aids_dir)
            stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            stamp = None
        now = time.monotonic()
        cached = self._listing
        if cached is not None and stamp is not None and cached[0] == stamp and now - cached[1] < STORE_LIST_TTL \
                and time.time() - st.st_mtime > 1.0:
            return cached[2]
        try:
            aids = self.store.list()
        except StorageError as exc:
            self.store_list_error = exc.message
            self._listing = None
            return []
        self.store_list_error = ""
        self._listing = (stamp, now, aids) if stamp is not None else None
        return aids

    def sees_all(self, app: AppIdentity) -> bool:
        """Root and the daemon's uid (the policy's owners) see every AID and app in `status`."""
        if self.policy is None:
            return app.uid in (0, os.getuid())
        return bool(self.policy.sees_all(app.uid))

    def warnings(self) -> list[dict[str, str]]:
        out = [{"code": code, "severity": "error", "aid": aid, "text": f"{aid}: {text}"}
               for aid, (code, text) in self.identity_errors.items()]
        out += [{"code": "identity.unreadable", "severity": "error", "aid": aid, "text": f"{aid}: {text}"}
                for aid, text in sorted(self.store.unreadable.items())]
        for text in (self.inbox.write_error if self.inbox is not None else "", self.store_write_error,
                     self.store_list_error):
            if text:
                out.append({"code": "storage.error", "severity": "error", "text": text})
        for aid, count in sorted((self.inbox.quarantined if self.inbox is not None else {}).items()):
            out.append({"code": "inbox.quarantined", "severity": "warning", "aid": aid,
                        "text": f"{aid}: {count} inbox row(s) damaged and quarantined (skipped; see the "
                                "inbox.row_quarantined log events)"})
        for aid in sorted(set(self.disabled) & set(self.config.identities)):
            out.append({"code": "identity.disabled", "severity": "warning", "aid": aid,
                        "text": f"{aid} is configured but disabled (not connected): `aund aid enable {aid}` "
                                "connects it"})
        more = {"link.failed": 0, "link.not_ready": 0}
        for (aid, slot), e in self.links.items():
            if e.parked:
                continue
            state = e.link.state
            if state == LinkState.CONNECTION_FAILED:
                code, severity, text = "link.failed", "error", f"{aid}/{slot} stopped: {e.link.last_error}"
            elif state != LinkState.READY and e.pinned:
                code, severity, text = "link.not_ready", "warning", f"{aid}/{slot} is {state.value}: {e.link.last_error}"
            else:
                continue
            if more[code] < STATUS_LINK_WARNINGS:
                out.append({"code": code, "severity": severity, "aid": aid, "slot_id": slot, "text": text})
            more[code] += 1
        for code, count in more.items():
            if count > STATUS_LINK_WARNINGS:  # no "aid": seen by every app, naming no identity
                out.append({"code": code, "severity": "error" if code == "link.failed" else "warning",
                            "text": f"and {count - STATUS_LINK_WARNINGS} more links {code.split('.')[1]} "
                                    f"({count} in all; `aund status --json` counts them by state)"})
        return out

    def canonical_aid(self, aid: str) -> str:
        return _normalize_aid(aid)

    def allowed(self, app: AppIdentity, aid: str) -> bool:
        """May this app use `aid`? Asked about the normalised AID (False if it is none)."""
        try:
            aid = ids.normalize_aid(aid)
        except ValueError:
            return False
        if self.policy is None:
            return app.uid in (0, os.getuid())
        return bool(self.policy.allows(app.uid, app.gid, aid, app.groups))

    def _permitted(self, app: AppIdentity, aid: Any) -> str:
        """The normalised `aid`, if this app may use it (InvalidParams, PermissionDenied)."""
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}", data={"aid": aid})
        return aid

    @staticmethod
    def _hold(entry: LinkEntry, holder: object, conn_id: int) -> None:
        entry.holders[holder] = conn_id
        entry.idle_since = None

    @staticmethod
    def _let_go(entry: LinkEntry, holder: object) -> None:
        entry.holders.pop(holder, None)
        if not entry.holders:
            entry.idle_since = trio.current_time()

    async def open_session(self, app: AppIdentity, aid: str, slot_id: str,
                           options: dict[str, Any] | None = None) -> _Lease:
        aid = self._permitted(app, aid)
        entry = await self._open_link(aid, slot_id, pinned=False,
                                      options=None if options is None else connect_options(options))
        handle = _Lease(self, entry)
        self._hold(entry, handle, app.conn_id)
        return handle

    async def release_session(self, app: AppIdentity, handle: _Lease) -> None:
        self._let_go(handle.entry, handle)

    async def _hold_for_subscription(self, app: AppIdentity, aid: str, holder: object) -> LinkEntry | None:
        """A subscription holds its AID's link as a session does, so a subscribe-only app keeps
        receiving after the other apps let go: the running link of the configured slot (else of any
        slot), else one started on demand. None when the identity does not exist (yet)."""
        live = [e for (a, _), e in self.links.items() if a == aid and e.link.state != LinkState.CLOSED]
        entry = next((e for e in live if e.link.config.slot_id == self.config.slot_id), live[0] if live else None)
        if entry is None:
            if not self.store.exists(aid):
                return None
            try:
                entry = await self._open_link(aid, self.config.slot_id, pinned=False)
            except IdentityNotFound:
                return None
        self._hold(entry, holder, app.conn_id)
        return entry

    def check_kinds(self, kinds: tuple[str, ...]) -> None:
        unknown = sorted({k for k in kinds if k not in ALL_KINDS and not gw_events.is_known_kind(k)})
        if unknown:
            known = sorted(ALL_KINDS)
            raise InvalidParams(f"unknown event kind(s) {', '.join(map(repr, unknown))}; known kinds: "
                                f"{', '.join(known)} (and any app.*, org.* or credential.* name)",
                                data={"arg": "kinds", "unknown": unknown, "known": known})

    async def subscribe(self, app: AppIdentity, aid: str, kinds: tuple[str, ...], consumer: str,
                        start: str | int) -> AsyncIterator[InboxEvent]:
        """Durable events from the inbox (from `start`), interleaved with live ones (link events,
        live gateway events, volatile messages); holds the AID's link while it runs; InvalidParams
        for an unknown kind."""
        aid = self._permitted(app, aid)
        assert self.inbox is not None
        if start == "last_ack":
            cursor = await self.inbox.consumer_cursor(aid, consumer_key(app, consumer))
            if cursor == 0:  # a consumer of an older aund, not yet per uid: resume where it was
                cursor = await self.inbox.consumer_cursor(aid, consumer)
        elif start == "now":
            cursor = await self.inbox.head(aid)
        elif isinstance(start, int) and not isinstance(start, bool) and start >= 0:
            cursor = start
        else:
            raise InvalidParams("start must be 'last_ack', 'now' or a cursor (int >= 0)")
        self.check_kinds(kinds)
        self.check_enabled(aid)
        wanted = set(kinds) if kinds else set(ALL_KINDS)
        durable = tuple(sorted(wanted & DURABLE_KINDS))
        sub = _Subscriber(frozenset(wanted - DURABLE_KINDS) | (frozenset(wanted) & {"message.undecryptable"}))
        self._subscribers.setdefault(aid, set()).add(sub)
        held: LinkEntry | None = None
        try:
            held = await self._hold_for_subscription(app, aid, sub)
            while True:
                if sub.error is not None:  # the AID was disabled: the broker ends the subscription with it
                    raise sub.error
                rows = await self.inbox.read(aid, cursor, durable, 100) if durable else []
                for row in rows:
                    cursor = row.cursor
                    yield InboxEvent(row.cursor, row.kind, row.data)
                while sub.pending:
                    kind, data = sub.pending.popleft()
                    yield InboxEvent(None, kind, data)  # live, not durable: no cursor to ack
                if not rows:
                    await sub.wait()
        finally:
            if held is not None:
                self._let_go(held, sub)
            subs = self._subscribers.get(aid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[aid]

    async def ack(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> None:
        aid = self._permitted(app, aid)
        assert self.inbox is not None
        try:
            await self.inbox.ack(aid, consumer_key(app, consumer), cursor)
        except AckPastHead as exc:
            raise InvalidParams(f"cursor {cursor} is past the newest event of {aid} ({exc.head}): ack only "
                                "cursors of events you received", data={"cursor": cursor, "head": exc.head}) from None


def renewal_due(cert: Any, fraction: float) -> float:
    """The time (unix seconds) to renew `cert`: when `fraction` (capped at 0.9) of its validity is left."""
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return end - min(max(fraction, 0.0), 0.9) * max(end - start, 0.0)


def _cert_view(aid: str, cert: Any, gateway: str) -> dict[str, Any]:
    return {"aid": aid, "cert": pki.cert_pem(cert), "cert_fingerprint": pki.cert_fingerprint(cert),
            "public_key": pki.public_key_b64(cert.public_key()), "serial": format(cert.serial_number, "x"),
            "issuer": cert.issuer.rfc4514_string(), "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp(), "gateway": gateway, "verified": True}


def consumer_key(app: AppIdentity, consumer: str) -> str:
    """The inbox name of an app's durable consumer: per uid, so no other user's app can move it."""
    return f"uid{app.uid}/{consumer}"


class _Subscriber:
    """Wake-ups and a bounded queue of live events (link, gateway, volatile) for one subscription."""

    def __init__(self, live_kinds: frozenset[str]) -> None:
        self.live_kinds = live_kinds  # exact kinds and families ("app.*")
        self.error: AundError | None = None  # set (then woken) to end the subscription with it
        self.pending: deque[tuple[str, dict[str, Any]]] = deque(maxlen=64)
        self._event = trio.Event()

    def offer(self, kind: str, data: dict[str, Any]) -> None:
        if gw_events.kind_matches(self.live_kinds, kind):
            self.pending.append((kind, data))
            self.wake()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


def _aid_key(aid: str) -> str:
    """The AID as links are keyed, or (not an AID) as given, lower case: matches nothing."""
    try:
        return _normalize_aid(aid)
    except ClientError:
        return str(aid).strip().lower()


def _normalize_aid(aid: Any) -> str:
    try:
        return ids.normalize_aid(aid)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None


class Supervisor:
    """The running daemon, part by part: the Daemon (inbox, identities, links; started first),
    then the app socket (a BrokerServer on `listeners`, sharing the Daemon's call budget), each
    with `nursery.start`. Neither part refers to the other: the broker reaches identities and
    links only through its Backend (the Daemon) and adds its own statistics to `status` itself.
    `reload` hands a new config and policy to both; `stop` drains the socket (no new apps, the
    calls in flight get `grace` seconds), closes the Daemon, then everything else."""

    def __init__(self, config: Config, store: IdentityStore, trust: Any, *, policy: Any, limits: Any,
                 listeners: list[Any], configured_limits: frozenset[str] | set[str] = frozenset()) -> None:
        self.config, self.store, self.trust = config, store, trust
        self.policy, self.limits, self.listeners = policy, limits, listeners
        self.configured_limits = set(configured_limits)
        self.daemon: Daemon | None = None
        self.broker: Any = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus["Supervisor"] = trio.TASK_STATUS_IGNORED) -> None:
        from functools import partial

        from aund.broker import serve_broker

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.daemon = await nursery.start(Daemon(self.config, self.store, self.trust, policy=self.policy).run)
            budget = self.daemon.call_budget(self.limits, self.configured_limits)
            self.broker = await nursery.start(partial(serve_broker, self.daemon, listeners=self.listeners,
                                                      policy=self.policy, limits=self.limits, call_limiter=budget))
            task_status.started(self)

    def summary(self) -> str:
        return self.daemon.summary() if self.daemon is not None else "starting"

    def reload(self, config: Config, policy: Any) -> dict[str, Any]:
        """A new configuration for the Daemon and a new policy for both parts."""
        assert self.daemon is not None and self.broker is not None
        result = self.daemon.reload(config, policy)
        if policy is not None:
            self.broker.set_policy(policy)
            self.policy = policy
        self.config = config
        return result

    async def stop(self, grace: float) -> None:
        """Graceful stop: refuse new apps, let the calls in flight finish (at most `grace` s),
        close the Daemon (links, inbox), then cancel what is left."""
        if self.broker is not None:
            self.broker.stop_accepting()
            with trio.move_on_after(grace) as scope:
                await self.broker.calls_done()
            if scope.cancelled_caught:
                log.warning("daemon.drain_timeout", calls_in_flight=self.broker.statistics().calls_in_flight,
                            grace=grace)
        if self.daemon is not None:
            await self.daemon.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
