"""AUN layer: how many rows one link's catch-up pages ask for, learnt from pages that did not fit.

A gateway may bound its pull pages by rows only (the devnet's `unbounded_pages` fault): a page of
many large rows is then one WebSocket message larger than aund's frame limit, and aund closes the
link with 1009 ("message too big"). The close does not say which message it was, so every pull
in flight when it happens is told (`GatewayUnavailable` with `close_code` 1009, see
`Link._reader`), and each asks for fewer rows next time.

`PageSizer` (one per sync and link, living as long as the link): the row limit starts at the
sync's maximum, is halved (down to 1) on every 1009 that hits a pull of it, and doubles again
(up to the maximum) after `GROW_AFTER` pages in a row arrived at the full limit. A request never
asks for more rows than the cursor can still have (`remaining`, from the head the gateway
reported), so halving starts from what was really asked.

A row that does not fit even in a page of one (a gateway whose message limit is above aund's
frame limit) would block its sender or group forever. After `SKIP_STRIKES` 1009s in a row on a
one-row page at the same cursor (one could have been another message's), `too_big` answers
True: the caller records a `message.undecryptable` event with reason `too_large` in the inbox,
moves its cursor past that row, and sync goes on behind it.
"""
from __future__ import annotations

from typing import Any

import structlog

from aund.aun import transport
from aund.errors import GatewayUnavailable
from aund.inbox import NewEvent

log = structlog.get_logger("aund.sync")

GROW_AFTER = 8
SKIP_STRIKES = 2
TOO_LARGE = "too_large"


def frame_too_big(exc: BaseException) -> bool:
    """The call failed because the link closed with 1009 (a message above our frame limit)."""
    return isinstance(exc, GatewayUnavailable) and exc.data.get("close_code") == transport.MESSAGE_TOO_BIG


class PageSizer:
    def __init__(self, maximum: int, aid: str, *, grow_after: int = GROW_AFTER,
                 skip_strikes: int = SKIP_STRIKES) -> None:
        if maximum < 1:
            raise ValueError("a page holds at least one row")
        self.maximum, self.aid = maximum, aid
        self.limit = maximum
        self.grow_after, self.skip_strikes = grow_after, skip_strikes
        self._fitted = 0
        self._strikes: dict[str, tuple[int, int]] = {}   # namespace -> (cursor, 1009s on one-row pages there)
        self._last_error: BaseException | None = None    # a coalesced pull hands one error to several callers
        self.shrinks = 0
        self.skipped = 0

    def rows(self, remaining: int | None = None) -> int:
        """The limit to ask for now; at most `remaining` (rows the cursor can still have) when known."""
        if remaining is not None and remaining > 0:
            return min(self.limit, remaining)
        return self.limit

    def fitted(self, namespace: str, asked: int) -> None:
        """A page of `asked` rows arrived: the namespace's strikes end, and full pages grow the limit."""
        self._strikes.pop(namespace, None)
        if asked < self.limit:
            return
        self._fitted += 1
        if self._fitted >= self.grow_after and self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit * 2)
            self._fitted = 0

    def too_big(self, exc: BaseException, namespace: str, cursor: int, asked: int) -> bool:
        """Learn from a failed pull of `asked` rows after `cursor`. True: the row after `cursor`
        cannot be received at all and must be skipped (the strikes are then cleared)."""
        if not frame_too_big(exc) or exc is self._last_error:
            return False
        self._last_error = exc
        self._fitted = 0
        new = max(1, min(self.limit, asked // 2))
        if new < self.limit:
            self.shrinks += 1
            log.info("sync.page_shrunk", aid=self.aid, namespace=namespace, asked=asked, rows=new)
            self.limit = new
        if asked > 1:
            return False
        at, strikes = self._strikes.get(namespace, (cursor, 0))
        strikes = strikes + 1 if at == cursor else 1
        if strikes < self.skip_strikes:
            self._strikes[namespace] = (cursor, strikes)
            return False
        self._strikes.pop(namespace, None)
        self.skipped += 1
        return True


def skipped_row(*, aid: str, sender: str, seq: int, after: int, max_frame: int, dedupe_key: str,
                **extra: Any) -> NewEvent:
    """The inbox event for a row that could not be received (`message.undecryptable`, reason
    `too_large`); `seq` is the seq moved past, `after` the cursor the row followed."""
    detail = (f"the next row after seq {after} is larger than aund's frame limit ({max_frame} bytes, "
              "gateway_max_frame) even alone in a page; it was skipped so the messages behind it arrive")
    log.warning("sync.row_skipped", aid=aid, sender=sender, seq=seq, after=after, reason=TOO_LARGE,
                max_frame=max_frame, **extra)
    data = {"from": sender, "to": aid, "seq": seq, "message_id": "", "reason": TOO_LARGE, "detail": detail,
            "skipped": True, **extra}
    return NewEvent("message.undecryptable", sender, dedupe_key, seq, data)
