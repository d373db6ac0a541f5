"""The supervisor: owns the long-lived nursery, the identity store, every gateway link and the
daemon-wide RPC budget; starts components in order and stops them gracefully.

Pure core: it reads no environment and no config file (the CLI does, and passes a Config in).
It implements the broker's `Backend` protocol (aund.broker.backend), so the app socket server
reaches identities and links only through it.
"""
from __future__ import annotations

import itertools
import json
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
from aund.aun import auth, events as gw_events, ids
from aund.aun.link import Link, LinkConfig, LinkState
from aund.aun.groups import GROUP_CHANGED_KIND, GROUP_EVENTS, GROUP_MESSAGE_KIND, GROUP_METHODS, GroupSession, GroupSync
from aund.aun.messaging import E2EESession, PeerSync
from aund.aun.http import http_base, http_request
from aund.aun.peers import PeerDirectory
from aund.aun.trust import TrustRoots
from aund.broker.backend import AppIdentity, InboxEvent
from aund.config import Config
from aund.errors import (
    AundError, AuthError, ClientError, GatewayError, GatewayUnavailable, InvalidParams, NotReady, PermissionDenied,
    ResourceNotExistError, StorageError,
)
from aund.identity import agent_md
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
SYNC_METHODS = frozenset({"message.pull", "message.v2.pull", "message.ack", "message.v2.ack", "message.peers",
                          "group.pull", "group.v2.pull", "group.ack_messages", "group.v2.ack", "group.pull_events",
                          "group.ack_events"})
RESYNC_BUDGET_SECONDS = 10.0


class StoreCredentials:
    """Adapts one stored identity to what a Link needs; file I/O runs in worker threads."""

    def __init__(self, store: IdentityStore, identity: Identity) -> None:
        self.store = store
        self.aid = identity.aid
        self.private_key = identity.private_key
        self.cert_pem = identity.cert_pem
        self.cert_fingerprint = identity.cert_fingerprint

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
    session: E2EESession
    pinned: bool
    holders: set[int] = field(default_factory=set)
    groups: GroupSync | None = None
    events: gw_events.GatewayEvents | None = None
    idle_since: float | None = None
    trust_epoch: int = 0  # the trust roots it was started with (a failed link is retried after they change)


class _Handle:
    """What the broker holds for an app's (AID, slot): a view of the shared link."""

    def __init__(self, daemon: "Daemon", entry: LinkEntry) -> None:
        self.daemon, self.entry = daemon, entry
        self.aid, self.slot_id = entry.link.aid, entry.link.config.slot_id

    def state(self) -> str:
        return self.entry.link.state.value

    async def wait_ready(self) -> None:
        await self.entry.link.wait_ready()

    async def call(self, method: str, params: dict[str, Any], *, timeout: float | None, background: bool,
                   app: AppIdentity) -> dict[str, Any]:
        if method in SYNC_METHODS:
            raise InvalidParams(f"{method}: aund pulls and acks messages itself; subscribe to "
                                "message.received events instead")
        if method in ("message.send", "message.thought.put"):
            headers = self.daemon.protected_headers.get((app.conn_id, self.aid))
            put = self.entry.session.send if method == "message.send" else self.entry.session.thought_put
            return await put(self.entry.link, params, headers, timeout=timeout)
        if method == "message.thought.get":
            result = await self.entry.link.call(method, params, timeout=timeout, background=background, on_behalf_of=app)
            return await self.entry.session.decrypt_thoughts(self.entry.link.gateway, result)
        if method in GROUP_METHODS and self.entry.groups is not None:
            headers = self.daemon.protected_headers.get((app.conn_id, self.aid))
            return await self.entry.groups.call(method, params, headers, timeout=timeout)
        return await self.entry.link.call(method, params, timeout=timeout, background=background, on_behalf_of=app)

    def set_protected_headers(self, app: AppIdentity, headers: dict[str, str]) -> None:
        self.daemon.protected_headers[(app.conn_id, self.aid)] = dict(headers)

    def invalidate_prekey_cache(self, peer_aid: str) -> None:
        self.entry.session.invalidate(peer_aid)


class Daemon:
    def __init__(self, config: Config, store: IdentityStore, trust: auth.GatewayTrust, *,
                 policy: Any = None, rng=random.random) -> None:
        self.config, self.store, self.trust = config, store, trust
        self.peers = PeerDirectory(trust, discovery_port=config.discovery_port or None)
        self.trust_epoch = 0
        self.policy = policy
        self.rng = rng
        self.global_budget = trio.CapacityLimiter(config.global_in_flight)
        self.links: dict[tuple[str, str], LinkEntry] = {}
        self.protected_headers: dict[tuple[int, str], dict[str, str]] = {}
        self.sessions: dict[str, E2EESession] = {}
        self.group_sessions: dict[str, GroupSession] = {}
        self.inbox: Inbox | None = None
        self._subscribers: dict[str, set["_Subscriber"]] = {}
        self.started_at = time.time()
        self.stopping = False
        self.broker: Any = None  # the app socket server, for status
        self.inbox_depth: dict[str, int] = {}
        self.identity_errors: dict[str, tuple[str, str]] = {}
        self.store_write_error = ""  # the identity store's last failed write, "" once one succeeds
        self._nursery: trio.Nursery | None = None
        self._identity_locks: dict[str, trio.Lock] = {}
        self._link_locks: dict[tuple[str, str], trio.Lock] = {}
        self._event_listeners: set[trio.MemorySendChannel] = set()
        self._agent_md_locks: dict[str, trio.Lock] = {}
        self._holds = itertools.count(1)  # daemon-side holders of a link (negative, unlike app conn ids)

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus["Daemon"] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the configured identities' links, then serve until cancelled."""
        key = await trio.to_thread.run_sync(self.store.derive_key, "inbox")
        self.inbox = await trio.to_thread.run_sync(Inbox, self.config.state_dir / "inbox.sqlite3", key)
        self.inbox.on_commit = self._wake_subscribers
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply a new configuration: trust roots (bundled + root_ca + the state dir's trust-roots.pem,
        re-read; caches of chains, revocation answers and peer certificates are dropped when they
        change) and the identity list (start links for added AIDs, unpin removed ones: they close
        once idle). Other links are not touched. Returns what changed."""
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
        log.info("daemon.reloaded", added=added, removed=removed)
        return {"added": added, "removed": removed}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        ready = sum(e.link.state == LinkState.READY for e in self.links.values())
        return f"{ready}/{len(self.links)} links ready; {len(self.config.identities)} configured identities"

    async def _keep_configured(self, aid: str) -> None:
        """Make sure a configured identity exists and its link runs; retry registration with backoff."""
        delay = 1.0
        while True:
            try:
                await self.ensure_identity(aid)
                await self._open_link(aid, self.config.slot_id, pinned=True)
                self.identity_errors.pop(aid, None)
                return
            except (GatewayUnavailable, trio.TooSlowError) as exc:
                log.warning("identity.ensure_failed", aid=aid, error=str(exc), retry_in=round(delay, 1))
                self.identity_errors[aid] = ("identity.unavailable", str(exc))
            except (StorageError, ClientError) as exc:
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
        aid = _normalize_aid(aid)
        lock = self._identity_locks.setdefault(aid, trio.Lock())
        async with lock:
            gateways = await self._gateways(aid)

            async def register(aid_: str, public_key) -> str:
                await self.trust.check_anchor(gateways[0])  # never claim a name where login would fail
                return await auth.create_aid(gateways[0], aid_, public_key)

            try:
                identity = await self.store.ensure(aid, register, meta={"gateway_urls": list(gateways)})
            except StorageError as exc:
                if not isinstance(exc, CorruptIdentity):  # a failed write (full disk, ...): for health
                    self.store_write_error = exc.message
                raise
            self.store_write_error = ""
        return {"aid": identity.aid, "cert_fingerprint": identity.cert_fingerprint,
                "device_id": identity.device_id}

    def list_identities(self) -> list[dict[str, Any]]:
        out = []
        for aid in self.store.list():
            links = [e.link.statistics() for (a, _), e in self.links.items() if a == aid]
            out.append({"aid": aid, "links": [{"slot_id": s.slot_id, "state": s.state} for s in links]})
        return out

    async def _open_link(self, aid: str, slot_id: str, *, pinned: bool) -> LinkEntry:
        """The running link for (aid, slot), started once even when asked for concurrently."""
        key = (aid, slot_id)
        lock = self._link_locks.setdefault(key, trio.Lock())
        async with lock:
            return await self._open_link_locked(aid, slot_id, pinned=pinned)

    async def _open_link_locked(self, aid: str, slot_id: str, *, pinned: bool) -> LinkEntry:
        key = (aid, slot_id)
        entry = self.links.get(key)
        stale = entry is not None and entry.link.state == LinkState.CONNECTION_FAILED \
            and entry.trust_epoch != self.trust_epoch  # it failed under other trust roots: start anew
        if entry is not None and entry.link.state not in (LinkState.CLOSED,) and not stale:
            entry.pinned = entry.pinned or pinned
            return entry
        try:
            identity = await trio.to_thread.run_sync(self.store.load, aid)
        except IdentityNotFound:
            raise IdentityNotFound(f"unknown identity {aid}: run identity.ensure first") from None
        session = self.sessions.get(aid)
        if session is None:
            session = E2EESession(identity, self.store, self.peers)
            await session.load()
            self.sessions[aid] = session
        group_session = self.group_sessions.get(aid)
        if group_session is None:
            group_session = GroupSession(session)
            await group_session.load()
            self.group_sessions[aid] = group_session
        config = LinkConfig(gateways=await self._gateways(aid), device_id=identity.device_id, slot_id=slot_id,
                            call_timeout=self.config.call_timeout)
        link = Link(StoreCredentials(self.store, identity), config, self.trust, global_budget=self.global_budget,
                    on_event=self._on_link_event, on_state=self._on_link_state, on_connected=self._on_connected,
                    on_admission_refused=lambda link: self._publish_agent_md(link, identity, force=True),
                    rng=self.rng)
        assert self.inbox is not None
        sync = PeerSync(link, session, self.inbox, on_notice=self._publish, poll_seconds=self.config.sync_poll_seconds)
        entry = LinkEntry(link, sync, session, pinned,
                          groups=GroupSync(link, group_session, self.inbox, poll_seconds=self.config.sync_poll_seconds),
                          trust_epoch=self.trust_epoch,
                          events=gw_events.GatewayEvents(link, session, self.inbox, self._publish))
        sync.on_volatile = lambda row: entry.events.on_event("message.received", {"inline_message": row})
        self.links[key] = entry
        assert self._nursery is not None
        await self._nursery.start(self._run_link, entry)
        return entry

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
            status, headers, _ = await _agent_md_http("HEAD", link.gateway, identity.aid)
            if status == 404:
                text = agent_md.sign(meta.get("agent_md") or agent_md.default_document(identity.aid),
                                     identity.private_key, identity.cert)
                status, headers, _ = await _agent_md_http("PUT", link.gateway, identity.aid, text.encode("utf-8"),
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
        status, headers, body = await _agent_md_http("GET", gateway, aid)
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
            raise _bad_agent_md(str(exc), exc.field, exc.code) from None
        entry = await self._open_link(aid, self.config.slot_id, pinned=False)
        hold = -next(self._holds)  # keeps the link from being reaped while it uploads (not an app)
        entry.holders.add(hold)
        entry.idle_since = None
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
            entry.holders.discard(hold)
            if not entry.holders:
                entry.idle_since = trio.current_time()
        log.info("identity.agent_md_replaced", aid=aid, etag=etag)
        return {"aid": aid, "etag": etag, "content": text}

    async def _replace_agent_md(self, link: Link, aid: str, text: str) -> str:
        """PUT `text` over whatever is published (If-Match its ETag, If-None-Match: * if none; a
        concurrent change is retried twice); returns the new ETag."""
        for _ in range(3):
            status, headers, _ = await _agent_md_http("HEAD", link.gateway, aid)
            if status not in (200, 404):
                raise GatewayError(f"HEAD agent.md of {aid}: HTTP {status}", retryable=status >= 500)
            condition = ("If-Match", headers["etag"]) if status == 200 and headers.get("etag") else ("If-None-Match", "*")
            status, headers, body = await _agent_md_http("PUT", link.gateway, aid, text.encode("utf-8"),
                                                         token=link.access_token, condition=condition)
            if status == 200:
                etag = headers.get("etag") or _json_field(body, "etag")
                if not etag:
                    raise GatewayError(f"PUT agent.md of {aid}: no ETag in the answer", retryable=False)
                return etag
            if status in (400, 413):  # the name service disagrees with our own check: say why
                reason = _json_field(body, "message") or body.decode("utf-8", "replace")[:300]
                raise _bad_agent_md(f"the gateway refused it: {reason}", _json_field(body, "field"),
                                    _json_field(body, "error") or agent_md.INVALID)
            if status in (401, 403):
                raise AuthError(f"PUT agent.md of {aid}: HTTP {status} (the gateway refused the token)",
                                data={"aid": aid})
            if status != 412:
                raise GatewayError(f"PUT agent.md of {aid}: HTTP {status}", retryable=status >= 500 or status == 429)
        raise GatewayError(f"PUT agent.md of {aid}: it kept changing under us (412)", retryable=True)

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

    def status(self) -> dict[str, Any]:
        links = [vars(e.link.statistics()) | {"pinned": e.pinned, "holders": len(e.holders)}
                 for e in self.links.values()]
        budget = self.global_budget.statistics()
        apps = self.broker.statistics().as_dict() if self.broker is not None else {}
        return {"daemon_version": aund.__version__, "started_at": self.started_at, "stopping": self.stopping,
                "identities": len(self.store.list()), "links": links, "broker": apps, "inbox": self.inbox_depth,
                "budget": {"total": budget.total_tokens, "in_use": budget.borrowed_tokens,
                           "waiting": budget.tasks_waiting},
                "process": systemd.core_dump_state(),
                "warnings": self.warnings()}

    def warnings(self) -> list[dict[str, str]]:
        out = [{"code": code, "severity": "error", "aid": aid, "text": f"{aid}: {text}"}
               for aid, (code, text) in self.identity_errors.items()]
        out += [{"code": "identity.unreadable", "severity": "error", "aid": aid, "text": f"{aid}: {text}"}
                for aid, text in sorted(self.store.unreadable.items())]
        for text in (self.inbox.write_error if self.inbox is not None else "", self.store_write_error):
            if text:
                out.append({"code": "storage.error", "severity": "error", "text": text})
        for aid, count in sorted((self.inbox.quarantined if self.inbox is not None else {}).items()):
            out.append({"code": "inbox.quarantined", "severity": "warning", "aid": aid,
                        "text": f"{aid}: {count} inbox row(s) damaged and quarantined (skipped; see the "
                                "inbox.row_quarantined log events)"})
        for (aid, slot), e in self.links.items():
            state = e.link.state
            if state == LinkState.CONNECTION_FAILED:
                out.append({"code": "link.failed", "severity": "error", "aid": aid, "slot_id": slot,
                            "text": f"{aid}/{slot} stopped: {e.link.last_error}"})
            elif state != LinkState.READY and e.pinned:
                out.append({"code": "link.not_ready", "severity": "warning", "aid": aid, "slot_id": slot,
                            "text": f"{aid}/{slot} is {state.value}: {e.link.last_error}"})
        return out

    def allowed(self, app: AppIdentity, aid: str) -> bool:
        if self.policy is None:
            return app.uid in (0, os.getuid())
        return bool(self.policy.allows(app.uid, app.gid, aid))

    async def open_session(self, app: AppIdentity, aid: str, slot_id: str) -> _Handle:
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}")
        entry = await self._open_link(aid, slot_id, pinned=False)
        entry.holders.add(app.conn_id)
        entry.idle_since = None
        return _Handle(self, entry)

    async def release_session(self, app: AppIdentity, handle: _Handle) -> None:
        entry = handle.entry
        entry.holders.discard(app.conn_id)
        self.protected_headers.pop((app.conn_id, handle.aid), None)
        if not entry.holders:
            entry.idle_since = trio.current_time()

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
        live gateway events, volatile messages); InvalidParams for an unknown kind."""
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}")
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
        wanted = set(kinds) if kinds else set(ALL_KINDS)
        durable = tuple(sorted(wanted & DURABLE_KINDS))
        sub = _Subscriber(frozenset(wanted - DURABLE_KINDS) | (frozenset(wanted) & {"message.undecryptable"}))
        self._subscribers.setdefault(aid, set()).add(sub)
        try:
            while True:
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
            subs = self._subscribers.get(aid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[aid]

    async def ack(self, app: AppIdentity, aid: str, consumer: str, cursor: int) -> None:
        aid = _normalize_aid(aid)
        if not self.allowed(app, aid):
            raise PermissionDenied(f"uid {app.uid} may not use {aid}")
        assert self.inbox is not None
        try:
            await self.inbox.ack(aid, consumer_key(app, consumer), cursor)
        except AckPastHead as exc:
            raise InvalidParams(f"cursor {cursor} is past the newest event of {aid} ({exc.head}): ack only "
                                "cursors of events you received", data={"cursor": cursor, "head": exc.head}) from None


def consumer_key(app: AppIdentity, consumer: str) -> str:
    """The inbox name of an app's durable consumer: per uid, so no other user's app can move it."""
    return f"uid{app.uid}/{consumer}"


class _Subscriber:
    """Wake-ups and a bounded queue of live events (link, gateway, volatile) for one subscription."""

    def __init__(self, live_kinds: frozenset[str]) -> None:
        self.live_kinds = live_kinds  # exact kinds and families ("app.*")
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


async def _agent_md_http(method: str, gateway: str, aid: str, body: bytes = b"", *, token: str = "",
                         condition: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to the gateway's agent.md of `aid` (served by its host name, as the name service)."""
    headers = [("Host", aid)]
    if token:
        headers += [("Authorization", f"Bearer {token}"), ("Content-Type", "text/markdown; charset=utf-8")]
    if condition is not None:
        headers.append(condition)
    return await http_request(method, http_base(gateway) + "/agent.md", headers=headers, body=body)


def _bad_agent_md(message: str, field: Any, code: Any) -> InvalidParams:
    return InvalidParams(f"agent.md: {message}", data={"arg": "content", "field": str(field or ""),
                                                       "reason": str(code or agent_md.INVALID)})


def _json_field(body: bytes, name: str) -> str:
    try:
        value = json.loads(body.decode("utf-8")).get(name)
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _normalize_aid(aid: Any) -> str:
    try:
        return ids.normalize_aid(aid)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None
