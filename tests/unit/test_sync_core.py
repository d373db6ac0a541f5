"""The sans-IO cursor machine of aund's inbound streams (aund.sync.core), driven by hypothesis
through random interleavings of pushes (duplicates, gaps, out of order), pages, failures, refusals,
1009 skips and reconnects against a model gateway and a model inbox. The invariants: every row is
delivered exactly once and in seq order per key; the cursor never passes a row not committed;
nothing is acked upstream past what was committed; and a quiet catch-up never pulls the same cursor
twice (no pull loop without progress)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from aund.sync import AckUpstream, Commit, Drop, Pull, Skip, Stream, SyncCore

P2P = Stream("p2p", page_rows=3, sparse=True)
GROUP = Stream("group", page_rows=3, rows_to_continue=True, head_continues=True, block_on_refusal=True)
EVENTS = Stream("events", page_rows=3)
STREAMS = {"p2p": P2P, "group": GROUP, "events": EVENTS}
KEYS = ("k1", "k2")


@dataclass
class Feed:
    """What the gateway holds for one key: rows for us (by seq), our own sends, holes (other devices)."""

    rows: list[int]
    own: set[int] = field(default_factory=set)

    @property
    def head(self) -> int:
        return max([0, *self.rows, *self.own])

    def prev(self, seq: int) -> int:
        return max([0, *[s for s in self.rows if s < seq]])


@st.composite
def feeds(draw, stream: Stream) -> dict[str, Feed]:
    out = {}
    for key in KEYS:
        seqs = sorted(draw(st.sets(st.integers(1, 20), max_size=9)))
        if stream is GROUP:  # some of them are our own sends (never pushed or paged to us)
            own = {s for s in seqs if draw(st.booleans()) and draw(st.booleans())}
            out[key] = Feed([s for s in seqs if s not in own], own)
        else:
            out[key] = Feed(seqs)
    return out


class World:
    """A model gateway and inbox around one SyncCore; actions wait in `pending` until a step runs them."""

    def __init__(self, stream: Stream, feed: dict[str, Feed]) -> None:
        self.stream, self.feed = stream, feed
        self.core = SyncCore(stream)
        self.inbox = {key: 0 for key in KEYS}            # the durable cursor per key
        self.delivered = {key: [] for key in KEYS}       # seqs committed (rows and skips), in order
        self.upstream = {key: 0 for key in KEYS}
        self.pending: list = []
        self.pulls: list[tuple[str, int]] = []
        for key in KEYS:
            self.core.load(key, 0)
            for seq in feed[key].own if stream is GROUP else ():
                self.core.own_sent(key, seq)

    def take(self, actions) -> None:
        for action in actions:
            if isinstance(action, AckUpstream):  # checked when issued: only ever past committed rows
                self.check_ack(action.key, action.up_to)
            if isinstance(action, Pull):
                assert action.after == self.core.cursor(action.key) and action.limit >= 1
                self.pulls.append((action.key, action.after))
            if not isinstance(action, Drop):
                self.pending.append(action)

    def check_ack(self, key: str, up_to: int) -> None:
        held = set(self.delivered[key])
        assert all(s in held for s in self.feed[key].rows if s <= up_to), (key, up_to, self.delivered[key])
        assert up_to <= self.core.cursor(key)

    def push(self, key: str, seq: int, inline: bool) -> None:
        feed = self.feed[key]
        prev = feed.prev(seq) if self.stream.sparse else None
        self.take(self.core.pushed(key, seq, ("row", seq) if inline else None, prev))

    def page_for(self, pull: Pull):
        feed = self.feed[pull.key]
        later = [s for s in feed.rows if s > pull.after]
        rows = later[:pull.limit]
        more = len(later) > len(rows)
        if self.stream.sparse:  # the coverage proof: up to the last row, or to the head when complete
            covered = rows[-1] if more else max(pull.after, feed.head)
        else:
            covered = 0  # no proof for groups: the machine takes what the rows cover
        return {s: ("row", s) for s in rows}, covered, more, feed.head

    def commit(self, key: str, seqs: list[int], new_cursor: int) -> None:
        old = self.inbox[key]
        assert seqs == sorted(set(seqs)) and all(s > old for s in seqs), (old, seqs)
        assert all(s <= new_cursor for s in seqs) and new_cursor >= old
        self.delivered[key].extend(seqs)
        missing = [s for s in self.feed[key].rows if s <= new_cursor and s not in self.delivered[key]]
        assert not missing, f"cursor {new_cursor} passed rows never committed: {missing}"
        self.inbox[key] = new_cursor

    def run(self, index: int, fault: str) -> None:
        action = self.pending.pop(index % len(self.pending))
        if fault == "again" and isinstance(action, Pull):
            self.pending.append(action)  # answered twice (a pull shared, a page delivered late)
        key, core = action.key, self.core
        if isinstance(action, Pull):
            if fault == "fail":
                self.take(core.pull_failed(key, action.after))
            elif fault == "refuse":
                self.take(core.refused(key, action.after))
            elif fault == "too_big" and action.limit == 1:
                self.take(core.too_big(key, action.after))
            else:
                rows, covered, more, head = self.page_for(action)
                self.take(core.page(key, action.after, rows, covered, more, head=head))
        elif isinstance(action, Commit):
            if fault == "fail":
                self.take(core.commit_failed(key, action.new_cursor))
                return
            self.commit(key, [row[1] for row in action.rows], action.new_cursor)
            self.take(core.committed(key, action.new_cursor))
        elif isinstance(action, Skip):
            assert action.seq > self.inbox[key] and action.reason == "too_large"
            self.commit(key, [action.seq], action.new_cursor)
            self.take(core.skipped(key, action.new_cursor))
        elif isinstance(action, AckUpstream) and fault != "fail":  # else the ack is lost on the way
            self.upstream[key] = max(self.upstream[key], action.up_to)
            core.acked_upstream(key, action.up_to)

    def quiesce(self) -> None:
        """A fresh session with no faults: everything left is pulled, and no cursor is pulled twice."""
        self.core.reconnected()
        self.pending = [a for a in self.pending if not isinstance(a, Pull)]
        for key in KEYS:
            self.core.resume(key)
        start = len(self.pulls)
        for key in KEYS:
            self.take(self.core.sync(key))
        rounds = 0
        while self.pending:
            rounds += 1
            assert rounds < 500, "the catch-up does not end"
            self.run(0, "")
        quiet = self.pulls[start:]
        assert len(quiet) == len(set(quiet)), f"a cursor pulled twice without progress: {quiet}"


steps = st.lists(st.tuples(st.sampled_from(["push", "run", "run", "run", "run", "reconnect", "sync", "reack"]),
                           st.sampled_from(KEYS), st.integers(0, 30), st.booleans(),
                           st.sampled_from(["", "", "", "fail", "refuse", "too_big", "again"])), max_size=80)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(STREAMS)).flatmap(lambda name: st.tuples(st.just(name), feeds(STREAMS[name]))), steps)
def test_random_interleavings_deliver_every_row_once_in_order(stream_and_feed, script):
    name, feed = stream_and_feed
    world = World(STREAMS[name], feed)
    for kind, key, number, flag, fault in script:
        if kind == "push" and feed[key].rows:
            world.push(key, feed[key].rows[number % len(feed[key].rows)], flag)
        elif kind == "run" and world.pending:
            world.run(number, fault)
        elif kind == "reconnect":
            world.core.reconnected()
        elif kind == "sync":
            world.take(world.core.sync(key))
        elif kind == "reack":  # the gateway reports its cursor (message.peers): acked again if it lags
            world.take(world.core.reack(key, world.upstream[key]))
        for k in KEYS:  # never a pull and a commit of one key at once
            assert not (world.core._k(k).pulling is not None and world.core._k(k).committing is not None)
    world.quiesce()
    for key in KEYS:
        rows = feed[key].rows
        got = world.delivered[key]
        assert got == sorted(got) and len(got) == len(set(got)), got
        assert [s for s in got if s in rows] == rows  # skips may add a hole's seq, never lose a row
        assert world.inbox[key] >= max([0, *rows])
        assert world.upstream[key] <= world.core.cursor(key)


def test_a_push_that_follows_is_committed_inline_and_then_acked():
    core = SyncCore(GROUP)
    core.load("g", 4)
    assert core.pushed("g", 5, "row5") == [Commit("g", ("row5",), 5)]
    assert core.pushed("g", 5, "row5") == [Drop("g", 5, "duplicate")]  # in the commit in flight
    assert core.pushed("g", 6, "row6") == [Drop("g", 6, "busy")]  # pulled once the commit is in
    assert core.committed("g", 5) == [AckUpstream("g", 5), Pull("g", 5, 1)]
    assert core.page("g", 5, {6: "row6"}, 0, has_more=False, head=6) == [Commit("g", ("row6",), 6)]
    assert core.committed("g", 6) == [AckUpstream("g", 6)]
    assert core.pushed("g", 5, "row5") == [Drop("g", 5, "duplicate")]
    assert core.pushed("g", 8, "row8") == [Pull("g", 6, 2)]  # a gap: pull at most the head's rows


def test_own_sends_are_stepped_over_and_a_group_page_goes_on_while_the_head_is_ahead():
    core = SyncCore(GROUP)
    core.load("g", 0)
    core.own_sent("g", 1)
    assert core.cursor("g") == 1 and core.ack("g") == 0
    assert core.sync("g") == [Pull("g", 1, 3)]
    assert core.page("g", 1, {3: "r3", 2: "r2"}, 0, has_more=False, head=9) == [Commit("g", ("r2", "r3"), 3)]
    assert core.committed("g", 3) == [AckUpstream("g", 3), Pull("g", 3, 3)]  # head 9 > 3: on
    assert core.page("g", 3, {}, 0, has_more=False, head=9, server_ack=1) == [AckUpstream("g", 3)]
    assert not core.busy("g")  # an empty page ends the round: no loop


def test_a_refused_group_stops_until_resumed_or_reconnected_and_stale_answers_are_ignored():
    core = SyncCore(GROUP)
    core.load("g", 0)
    assert core.sync("g") == [Pull("g", 0, 3)]
    assert core.refused("g", 0) == [] and core.blocked("g")
    assert core.pushed("g", 1, "r1") == [Drop("g", 1, "blocked")] and core.sync("g") == []
    core.reconnected()
    assert not core.blocked("g")
    assert core.sync("g") == [Pull("g", 0, 3)]
    core.reconnected()  # the pull of the old session is never answered now
    assert core.page("g", 0, {1: "r1"}, 0, has_more=False) == []
    events = SyncCore(EVENTS)
    events.load("g", 0)
    assert events.sync("g") == [Pull("g", 0, 3)]
    assert events.refused("g", 0) == [] and not events.blocked("g")  # events: that round ends, no block


def test_p2p_skip_uses_the_hinted_seq_and_the_proof_moves_the_cursor_without_rows():
    core = SyncCore(P2P)
    core.load("s", 10)
    assert core.pushed("s", 40, None, prev=10) == [Pull("s", 10, 3)]  # follows, but no row inline
    assert core.too_big("s", 10) == [Skip("s", 40, "too_large", 40, 10)]
    assert core.skipped("s", 40) == [] and core.cursor("s") == 40
    assert core.sync("s") == [Pull("s", 40, 3)]
    assert core.page("s", 40, {}, 55, has_more=True, head=60) == [Commit("s", (), 55)]
    assert core.committed("s", 55) == [AckUpstream("s", 55), Pull("s", 55, 3)]
    assert core.reack("s", 50) == [AckUpstream("s", 55)] and core.reack("s", 55) == []
    assert core.page("s", 55, {}, 55, has_more=False, head=60, unstored=True) == [Commit("s", (), 55)]
    assert core.committed("s", 55) == [AckUpstream("s", 55)]  # volatile rows only: acked, no further pull
