"""One cursor state machine for an inbound stream, per key (a sender, a group), with no I/O.

Events go in (a push arrived, a page arrived, the inbox committed, the gateway refused, the link
reconnected); actions come out (`Pull`, `Commit`, `AckUpstream`, `Skip`, `Drop`). The caller does
the I/O an action names and reports its outcome back. The rule the machine keeps for every key:
rows and the new cursor are committed together, and only a committed cursor is acked upstream.

State per key: the durable ack (what the inbox committed, loaded by the caller with `load`), the
head the gateway last named, the seqs of our own sends (nothing to receive there), the pull and
the commit in flight (at most one of each, never both), whether another pull is wanted once the
current step is done, and whether the key is blocked (refused).

Three streams use it, told apart by `Stream`: P2P messages per sender (sparse seqs: a push is
contiguous when its `prev` is our cursor), group messages per group (dense up to holes and our
own sends; a page continues only while it brings rows) and group events per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pull:
    key: str
    after: int
    limit: int


@dataclass(frozen=True)
class Commit:
    """Commit `rows` (seq order, each past the old cursor) with the cursor `new_cursor`, in one transaction."""

    key: str
    rows: tuple[Any, ...]
    new_cursor: int


@dataclass(frozen=True)
class AckUpstream:
    key: str
    up_to: int


@dataclass(frozen=True)
class Skip:
    """Record `seq` (the row after the cursor `after`) as skipped (`reason`) and commit the cursor
    `new_cursor` past it."""

    key: str
    seq: int
    reason: str
    new_cursor: int
    after: int


@dataclass(frozen=True)
class Drop:
    """A push that needs nothing: `duplicate` (already held), `blocked` (refused key) or `busy` (a
    step is in flight; a pull follows it)."""

    key: str
    seq: int
    reason: str


Action = Pull | Commit | AckUpstream | Skip | Drop


@dataclass(frozen=True)
class Stream:
    """What tells the streams apart.

    sparse: seqs are sparse per key (P2P): a push follows on the cursor when its `prev` names the
        cursor; otherwise (groups) when its seq is the cursor plus one.
    rows_to_continue: a page leads to the next pull only if it brought rows (groups: holes inside
        a page are rows for other devices, and an empty page is the end).
    head_continues: a head past the covered seq means more pages (groups), besides `has_more`.
    block_on_refusal: a refused key stays stopped until `resume` or `reconnected` (group messages).
    """

    name: str
    page_rows: int
    sparse: bool = False
    rows_to_continue: bool = False
    head_continues: bool = False
    block_on_refusal: bool = False


@dataclass
class _Key:
    ack: int | None = None                 # durable: what the inbox committed (None until loaded)
    head: int | None = None                # the newest seq the gateway named
    own: set[int] = field(default_factory=set)   # our own sends past `past`
    past: int = 0                          # the durable ack stepped past our own sends that followed on it
    pulling: int | None = None             # `after` of the pull in flight
    committing: int | None = None          # `new_cursor` of the commit in flight
    continue_after: bool = False           # pull the next page once the commit is in
    wanted: bool = False                   # a push or request came while busy: pull once idle
    blocked: bool = False
    upstream: int = 0                      # the highest ack the gateway confirmed
    hint: tuple[int, int] | None = None    # (cursor, seq of the row after it) as the gateway named


class SyncCore:
    """The per-key cursor machine of one stream on one link (see the module doc)."""

    def __init__(self, stream: Stream, limit: Callable[[str, int | None], int] | None = None) -> None:
        self.stream = stream
        # limit(key, rows left below the head or None) -> rows to ask for (a PageSizer, or the page size)
        # (a head at or below the cursor is stale and bounds nothing, as in PageSizer.rows)
        self._limit = limit or (lambda _key, left: stream.page_rows if left is None or left <= 0
                                else min(stream.page_rows, left))
        self._keys: dict[str, _Key] = {}

    # --- queries ------------------------------------------------------------------------------------------
    def _k(self, key: str) -> _Key:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        return state

    def loaded(self, key: str) -> bool:
        return self._k(key).ack is not None

    def ack(self, key: str) -> int:
        """The durable ack (what the inbox committed); 0 before `load`."""
        return self._k(key).ack or 0

    def cursor(self, key: str) -> int:
        """The durable ack moved past our own sends that follow on it: where the next row is (the own
        sends so passed are forgotten; `past` remembers the step)."""
        state = self._k(key)
        cursor = self.advance(key, max(state.ack or 0, state.past))
        if cursor > state.past:
            state.past = cursor
            state.own.difference_update([s for s in state.own if s <= cursor])
        return cursor

    def advance(self, key: str, seq: int) -> int:
        """`seq` stepped past our own sends that follow on it."""
        own = self._k(key).own
        while seq + 1 in own:
            seq += 1
        return seq

    def head(self, key: str) -> int | None:
        return self._k(key).head

    def own(self, key: str) -> set[int]:
        return self._k(key).own

    def blocked(self, key: str) -> bool:
        return self._k(key).blocked

    def busy(self, key: str) -> bool:
        return self._busy(self._k(key))

    @staticmethod
    def _busy(state: _Key) -> bool:
        return state.pulling is not None or state.committing is not None

    def behind(self, key: str) -> bool:
        """Does the head the gateway named lie past our cursor (or is it unknown)?"""
        head = self._k(key).head
        return head is None or head > self.cursor(key)

    def known(self) -> list[str]:
        return list(self._keys)

    # --- inputs ----------------------------------------------------------------------------------------------
    def load(self, key: str, ack: int) -> None:
        """The inbox's committed cursor for `key` (read once by the caller)."""
        state = self._k(key)
        state.ack = max(state.ack or 0, ack)
        self._trim(state)

    def own_sent(self, key: str, seq: int) -> None:
        """Our own send got `seq`: there is nothing to receive there."""
        state = self._k(key)
        if seq > max(state.ack or 0, state.past):
            state.own.add(seq)

    def head_seen(self, key: str, seq: int | None, *, exact: bool = False) -> None:
        """The gateway named `seq` as the key's head (`exact`: as it is now, else at least; an exact
        None: not known, so no bound on the next page)."""
        state = self._k(key)
        if exact or state.head is None:
            state.head = seq
        elif seq is not None:
            state.head = max(state.head, seq)

    def hint(self, key: str, after: int, seq: int) -> None:
        """The gateway said the row after cursor `after` has `seq` (P2P `next_pending_seq`)."""
        if seq > after:
            self._k(key).hint = (after, seq)

    def sync(self, key: str) -> list[Action]:
        """Pull whatever lies past the cursor (a catch-up, a poll, a push without a usable row)."""
        state = self._k(key)
        if state.blocked:
            return []
        if self.busy(key):
            state.wanted = True
            return []
        return [self._pull(key)]

    def pushed(self, key: str, seq: int, row: Any = None, prev: int | None = None) -> list[Action]:
        """A live push of `seq` (with its row inline if the caller found it usable; `prev` for sparse
        streams). A push that follows on the cursor is committed as it is; a gap becomes a pull."""
        state = self._k(key)
        if state.blocked:
            return [Drop(key, seq, "blocked")]
        self.head_seen(key, seq)
        cursor = self.cursor(key)
        if seq <= cursor:
            return [Drop(key, seq, "duplicate")]
        follows = prev == cursor if self.stream.sparse else seq == cursor + 1
        if follows and self.stream.sparse:
            state.hint = (cursor, seq)
        if state.committing is not None and seq <= state.committing:
            return [Drop(key, seq, "duplicate")]  # in the commit in flight
        if self.busy(key):
            state.wanted = True
            return [Drop(key, seq, "busy")]
        if follows and row is not None:
            state.committing = self.advance(key, seq)
            state.continue_after = False
            return [Commit(key, (row,), state.committing)]
        return [self._pull(key)]

    def page(self, key: str, after: int, rows: Mapping[int, Any] | Iterable[tuple[int, Any]], covered: int,
             has_more: bool, head: int | None = None, server_ack: int | None = None,
             unstored: bool = False) -> list[Action]:
        """The page answering `Pull(key, after, ...)`: `rows` by seq, proven (or taken) to cover every
        row up to `covered`; `unstored`: it also brought rows that are not stored (P2P volatile rows,
        handed on live), which are acked upstream even when the cursor does not move. A page no pull
        of ours is waiting for is ignored."""
        state = self._k(key)
        if state.pulling != after:
            return []
        state.pulling = None
        if head is not None:
            self.head_seen(key, head, exact=True)
        found: dict[int, Any] = {}
        for seq, row in (rows.items() if isinstance(rows, Mapping) else rows):
            if seq > after:
                found.setdefault(seq, row)
        new = self.advance(key, max([after, covered, *found]))
        if new > after or found or unstored:
            more = has_more or (self.stream.head_continues and (head or 0) > new)
            state.continue_after = more and new > after and (bool(found) or not self.stream.rows_to_continue)
            state.committing = new
            return [Commit(key, tuple(found[s] for s in sorted(found)), new)]
        actions: list[Action] = []
        if server_ack is not None and server_ack < new:  # the gateway lags what we hold: tell it again
            actions.append(AckUpstream(key, new))
        return actions + self._idle(key)

    def committed(self, key: str, up_to: int) -> list[Action]:
        """The inbox committed the cursor `up_to` (a `Commit` or a `Skip`): ack it upstream, go on."""
        state = self._k(key)
        state.ack = max(state.ack or 0, up_to)
        self._trim(state)
        going_on = state.committing is not None and state.continue_after
        state.committing, state.continue_after = None, False
        actions: list[Action] = [AckUpstream(key, up_to)]
        if going_on and not state.blocked:
            return actions + [self._pull(key)]
        return actions + self._idle(key)

    def skipped(self, key: str, up_to: int) -> list[Action]:
        """The inbox committed a `Skip` up to `up_to`. Not acked here: the link closed (1009), and
        the next sync acks past the row; a pull wanted meanwhile starts."""
        state = self._k(key)
        state.ack = max(state.ack or 0, up_to)
        self._trim(state)
        if state.committing == up_to:
            state.committing, state.continue_after = None, False
        return self._idle(key)

    def acked_upstream(self, key: str, up_to: int) -> None:
        """The gateway confirmed (or reported) its cursor at `up_to`."""
        state = self._k(key)
        state.upstream = max(state.upstream, up_to)

    def reack(self, key: str, server_ack: int) -> list[Action]:
        """The gateway reports its cursor at `server_ack`: ack again if it lags what we committed."""
        self.acked_upstream(key, server_ack)
        ack = self.ack(key)
        return [AckUpstream(key, ack)] if server_ack < ack else []

    def too_big(self, key: str, after: int) -> list[Action]:
        """No page after `after` fits in a frame: skip the row after it (the hinted seq, else `after + 1`)."""
        state = self._k(key)
        if state.pulling != after:
            return []
        state.pulling = None
        hint = state.hint
        seq = hint[1] if self.stream.sparse and hint is not None and hint[0] == after else after + 1
        state.committing = self.advance(key, seq)
        state.continue_after = False
        return [Skip(key, seq, "too_large", state.committing, after)]

    def pull_failed(self, key: str, after: int) -> list[Action]:
        """`Pull(key, after, ...)` brought no page (the link failed): that pull is over."""
        state = self._k(key)
        if state.pulling == after:
            state.pulling = None
        return []

    def commit_failed(self, key: str, new_cursor: int) -> list[Action]:
        """The inbox could not commit up to `new_cursor`: nothing moved; that step is over."""
        state = self._k(key)
        if state.committing == new_cursor:
            state.committing, state.continue_after = None, False
        return []

    def refused(self, key: str, after: int) -> list[Action]:
        """The gateway refused `Pull(key, after, ...)`: a blocking stream stops until resumed."""
        state = self._k(key)
        if state.pulling != after:
            return []  # an answer to a pull of an older session
        state.pulling, state.wanted = None, False
        if self.stream.block_on_refusal:
            state.blocked = True
        return []

    def block(self, key: str) -> bool:
        """Stop `key` (removed, dissolved, blocked); True if it was running."""
        state = self._k(key)
        was, state.blocked = state.blocked, True
        return not was

    def resume(self, key: str) -> bool:
        """Let `key` sync again; True if it was blocked."""
        state = self._k(key)
        was, state.blocked = state.blocked, False
        return was

    def reconnected(self, *, abandon_pulls: bool = True) -> None:
        """A new session: a blocking stream forgets the refusals of the old one. With `abandon_pulls`
        (a driver that never hears of pulls of the old session again), those are over and a late
        answer to one is ignored; a commit in flight is local and goes on either way."""
        for state in self._keys.values():
            if abandon_pulls:
                state.pulling = None
            if not self._busy(state):
                state.wanted = False
            if self.stream.block_on_refusal:
                state.blocked = False

    # --- helpers ---------------------------------------------------------------------------------------------
    def _pull(self, key: str) -> Pull:
        state = self._k(key)
        after = self.cursor(key)
        state.pulling, state.wanted = after, False
        return Pull(key, after, self._limit(key, None if state.head is None else state.head - after))

    def _idle(self, key: str) -> list[Action]:
        state = self._k(key)
        if state.wanted and not state.blocked and not self.busy(key):
            return [self._pull(key)]
        return []

    @staticmethod
    def _trim(state: _Key) -> None:
        ack = state.ack or 0
        state.own.difference_update([s for s in state.own if s <= ack])
