"""AUN layer: the RPC concurrency budget of one gateway link and the pull gate.

`RpcBudget`: at most `total` (16) RPCs in flight per link, at most `background` (8) of them
background, and a queued foreground caller always goes before a queued background one. A freed
place is handed directly to the next waiter (no barging), so waiting is FIFO within each class.
`PullGate`: one pull in flight per namespace, at most `max_namespaces` (4) namespaces pulling at
once, and identical pulls (same key) coalesced into one request whose result all callers share.
Cancelling a waiter releases its place at once. Plain trio primitives; no I/O.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncIterator, TypeVar

import trio

T = TypeVar("T")

#: The daemon-wide call budget (one `trio.CapacityLimiter`, shared by the app socket and every
#: link) whose token the current task already holds: an app's call takes one token at the
#: broker, and the gateway RPCs it makes in that task (a group.create is several) take no second
#: one. Work the call spawns into other tasks does not inherit it and takes its own.
_HELD: ContextVar[object | None] = ContextVar("aund_call_budget_held", default=None)


@contextmanager
def holding(limiter: object) -> Iterator[None]:
    """Mark, for this task, that a token of `limiter` is held (by the caller, who releases it)."""
    token = _HELD.set(limiter)
    try:
        yield
    finally:
        _HELD.reset(token)


def holds(limiter: object) -> bool:
    """Whether this task already holds a token of `limiter` (see `holding`)."""
    return limiter is not None and _HELD.get() is limiter


class CallBudget:
    """The daemon-wide budget of gateway calls in flight: one object for the app socket and
    every link (it quacks like the `trio.CapacityLimiter` the broker takes).

    An app's call takes one token at the socket (`acquire_on_behalf_of`, the broker's borrower)
    and keeps it until its answer; the RPCs it makes upstream in its own task take none (see
    `holding`). The daemon's own RPCs (sync, acks, proposals, ...) take a token per RPC in flight
    (`acquire_for_daemon`). Apps may hold at most `total - reserve` tokens: an app call can wait
    for a lock that daemon work holds while that work waits for a token, and the reserve means
    such work always finds one (no deadlock at saturation)."""

    def __init__(self, total: int, reserve: int | None = None) -> None:
        self._all = trio.CapacityLimiter(1)
        self._apps = trio.CapacityLimiter(1)
        self.reserve = 0
        self.resize(total, reserve)

    def resize(self, total: int, reserve: int | None = None) -> None:
        """`total` tokens, `reserve` of them for the daemon's own work (default: an eighth, 1..16)."""
        if total < 2:
            raise ValueError("the call budget needs at least 2 tokens (one is kept for the daemon's own work)")
        self.reserve = max(1, min(16, total // 8)) if reserve is None else reserve
        if not 0 < self.reserve < total:
            raise ValueError("need 0 < reserve < total")
        self._all.total_tokens = total
        self._apps.total_tokens = total - self.reserve

    @property
    def total_tokens(self) -> int:
        return int(self._all.total_tokens)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        """An app's call: a place among the apps' share, then a token."""
        await self._apps.acquire_on_behalf_of(borrower)
        try:
            await self._all.acquire_on_behalf_of(borrower)
        except BaseException:
            self._apps.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self._all.release_on_behalf_of(borrower)
        self._apps.release_on_behalf_of(borrower)

    async def acquire_for_daemon(self, owner: object) -> None:
        """One RPC of the daemon's own (or one not made inside an app call's task)."""
        await self._all.acquire_on_behalf_of(owner)

    def release_for_daemon(self, owner: object) -> None:
        self._all.release_on_behalf_of(owner)

    def statistics(self) -> Any:
        """The token statistics (total, borrowed, waiting, borrowers) of the whole budget."""
        return self._all.statistics()

    def app_statistics(self) -> Any:
        return self._apps.statistics()


@dataclass(frozen=True)
class BudgetStatistics:
    total: int
    in_flight: int
    background_in_flight: int
    queued_foreground: int
    queued_background: int
    max_in_flight: int
    max_background_in_flight: int
    granted: int = 0  # places handed out since start (one per RPC)


class RpcBudget:
    def __init__(self, total: int = 16, background: int = 8) -> None:
        if not 0 < background <= total:
            raise ValueError("need 0 < background <= total")
        self.total, self.background = total, background
        self._in_flight = 0
        self._bg_in_flight = 0
        self._fg_lot = trio.lowlevel.ParkingLot()
        self._bg_lot = trio.lowlevel.ParkingLot()
        self._max = 0
        self._max_bg = 0
        self._granted = 0

    def _grant(self, background: bool) -> None:
        self._in_flight += 1
        self._bg_in_flight += background
        self._granted += 1
        self._max = max(self._max, self._in_flight)
        self._max_bg = max(self._max_bg, self._bg_in_flight)

    def _can_take(self, background: bool) -> bool:
        if self._in_flight >= self.total:
            return False
        if background:
            return self._bg_in_flight < self.background and not self._fg_lot
        return True

    async def acquire(self, background: bool = False) -> None:
        """Wait for a place (checkpoint even when one is free); raises trio.Cancelled if cancelled while queued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._can_take(background) and not (self._fg_lot if not background else self._bg_lot):
            self._grant(background)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await (self._bg_lot if background else self._fg_lot).park()
        # a releaser granted us the place before unparking us (see _hand_over)

    def release(self, background: bool = False) -> None:
        self._in_flight -= 1
        self._bg_in_flight -= background
        if self._in_flight < 0 or self._bg_in_flight < 0:
            raise RuntimeError("RpcBudget released more than acquired")
        self._hand_over()

    def _hand_over(self) -> None:
        while self._in_flight < self.total:
            if self._fg_lot:
                self._grant(False)
                self._fg_lot.unpark()
            elif self._bg_lot and self._bg_in_flight < self.background:
                self._grant(True)
                self._bg_lot.unpark()
            else:
                return

    @asynccontextmanager
    async def slot(self, background: bool = False) -> AsyncIterator[None]:
        await self.acquire(background)
        try:
            yield
        finally:
            self.release(background)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.total, self._in_flight, self._bg_in_flight,
                                len(self._fg_lot), len(self._bg_lot), self._max, self._max_bg, self._granted)


class _Shared:
    """One in-flight pull that identical callers wait on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.waiters = 1


@dataclass(frozen=True)
class PullGateStatistics:
    namespaces_pulling: int
    namespaces_queued: int
    coalesced: int
    executed: int


class PullGate:
    def __init__(self, max_namespaces: int = 4) -> None:
        self._namespaces = trio.CapacityLimiter(max_namespaces)
        self._ns_locks: dict[str, tuple[trio.Lock, int]] = {}
        self._inflight: dict[str, _Shared] = {}
        self.coalesced = 0
        self.executed = 0

    async def run(self, namespace: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as the pull `key` in `namespace`, or share the result of an identical one in flight."""
        while True:
            shared = self._inflight.get(key)
            if shared is None:
                break
            shared.waiters += 1
            self.coalesced += 1
            try:
                await shared.done.wait()
            finally:
                shared.waiters -= 1
            if shared.abandoned:
                continue  # the leader was cancelled before finishing: try to lead ourselves
            if shared.error is not None:
                raise shared.error
            return shared.result
        shared = _Shared()
        self._inflight[key] = shared
        try:
            async with self._namespace_lock(namespace), self._namespaces:
                self.executed += 1
                shared.result = await fn()
            return shared.result
        except trio.Cancelled:
            shared.abandoned = True
            raise
        except Exception as exc:
            shared.error = exc
            raise
        finally:
            del self._inflight[key]
            shared.done.set()

    @asynccontextmanager
    async def _namespace_lock(self, namespace: str) -> AsyncIterator[None]:
        lock, users = self._ns_locks.get(namespace, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._ns_locks[namespace] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._ns_locks[namespace]
            if users == 1:
                del self._ns_locks[namespace]
            else:
                self._ns_locks[namespace] = (lock, users - 1)

    def statistics(self) -> PullGateStatistics:
        pulling = self._namespaces.borrowed_tokens
        return PullGateStatistics(pulling, max(0, len(self._ns_locks) - pulling), self.coalesced, self.executed)
