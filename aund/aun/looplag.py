"""AUN layer: how late the trio loop itself runs (scheduler lag), for the links' heartbeat.

With thousands of links starting together the one trio thread may be busy for seconds: a pong
that arrived is then read late, and a heartbeat timeout says nothing about the gateway. A
`LoopLag` task sleeps `tick` seconds over and over and notes when it woke more than `threshold`
late; `late_since(t)` tells a heartbeat whether the loop was late after trio time `t`.

Imports trio only; no I/O.
"""
from __future__ import annotations

import math

import trio


class LoopLag:
    def __init__(self, tick: float = 0.25, threshold: float = 0.5) -> None:
        self.tick, self.threshold = tick, threshold
        self.late_at = -math.inf   # trio time of the last late wake-up
        self.last_lag = 0.0        # seconds it was late then
        self.max_lag = 0.0         # the worst since start
        self.late_count = 0

    def note(self, lag: float, now: float) -> None:
        """One wake-up `lag` seconds after it was due, at trio time `now`."""
        self.max_lag = max(self.max_lag, lag)
        if lag > self.threshold:
            self.late_at, self.last_lag = now, lag
            self.late_count += 1

    def late_since(self, t: float) -> bool:
        return self.late_at >= t

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            due = trio.current_time() + self.tick
            await trio.sleep_until(due)
            now = trio.current_time()
            self.note(now - due, now)
