"""AUN layer: the strict peer-mode coverage proof of a `message.v2.pull` page (pure, no I/O).

In peer mode a page says which slice of one sender's (sparse) seq space it covers: every
persistent row of that sender with `scan_after_seq < seq <= covered_through_seq` is in the page,
and the client advances its cursor to `next_after_seq` (= covered). A gateway that lies about
coverage makes a client skip messages for good, so aund checks every page the way fastaun
0.5.25 does (`_client/delivery.py::_peer_pull_proof`) and rejects the page otherwise:

- `cursor_scope == "peer"`, `sender_aid` echoed, `device_id` / slot isolation key echoed when
  both sides name them, `messages` a list of objects;
- forward mode: `persistent_has_more`, `volatile_has_more`, `has_more` strict JSON bools and
  `has_more == persistent_has_more or volatile_has_more`;
- seqs JSON ints (not bools) in [0, 2^53-1]: `covered_through_seq` and `head_seq` always,
  `scan_after_seq`, `next_after_seq` and `retention_floor_seq` (default 0) in forward mode;
- forward: `max(after, floor) <= scan_after <= max(after, floor, ack)` (ack = the client's local
  durable ACK, 0 for a `force` pull), `scan_after <= covered <= head`, `covered < head` only with
  `persistent_has_more`, `next_after_seq == covered`;
- tail (`window_mode: "tail"`): `window_start_seq` present, `covered == head`,
  `window_start <= head`, no volatile rows; with `head <= after` an empty window at head, else
  `window_start > after`; rows then lie in `window_start - 1 < seq <= covered`;
- every persistent row (`storage != "volatile"`): a JSON int seq with `lower < seq <= covered`,
  strictly ascending (hence unique); at most `limit` rows in all; each row's `from_aid` /
  `sender_aid` / `from`, where present (not null or ""), equal to `sender_aid`, and at least one
  of them present.

aund is stricter than the SDK in two places: a row seq must be a JSON int (the SDK also takes a
digit string), and every non-empty sender field must match (the SDK looks only at the first).
"""
from __future__ import annotations

from typing import Any

from aund.aun import ids

MAX_SAFE_SEQ = 2**53 - 1
SENDER_FIELDS = ("from_aid", "sender_aid", "from")
FLAG_FIELDS = ("persistent_has_more", "volatile_has_more", "has_more")


class CoverageProofError(ValueError):
    """A pull page does not prove what it covers; `reason` names the broken rule."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _seq(value: Any) -> int | None:
    """A JSON int in [0, 2^53-1]; None for anything else (bools, floats, strings, out of range)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAFE_SEQ:
        return None
    return value


def _request_int(request: dict[str, Any], key: str, default: int | None = None) -> int:
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pull request {key} must be an int, got {value!r}")
    return value


def verify_peer_page(request: dict[str, Any], page: dict[str, Any], *, local_ack: int) -> None:
    """Raise CoverageProofError unless `page` (a `message.v2.pull` result) proves its coverage.

    `request` is the peer-mode pull as sent (`sender_aid`, `after_seq`, `limit`, optional
    `force`, `window_mode`, `device_id`, `slot_id`); `local_ack` is the client's durable ACK for
    that sender. A malformed `request` is a caller bug and raises ValueError.
    """
    sender = request.get("sender_aid")
    if not isinstance(sender, str) or not sender:
        raise ValueError("pull request sender_aid must be a non-empty string")
    after = _request_int(request, "after_seq")
    limit = _request_int(request, "limit")
    tail = request.get("window_mode") == "tail"
    ack = 0 if request.get("force") is True else local_ack

    if not isinstance(page, dict):
        raise CoverageProofError("not_an_object", type(page).__name__)
    if page.get("cursor_scope") != "peer":
        raise CoverageProofError("cursor_scope", repr(page.get("cursor_scope")))
    if page.get("sender_aid") != sender:
        raise CoverageProofError("sender_aid", f"{page.get('sender_aid')!r} != {sender!r}")
    if "device_id" in page and "device_id" in request and page["device_id"] != request["device_id"]:
        raise CoverageProofError("device_id", f"{page['device_id']!r} != {request['device_id']!r}")
    if "slot_id" in page and isinstance(request.get("slot_id"), str) and (
            not isinstance(page["slot_id"], str) or ids.slot_isolation_key(page["slot_id"]) != ids.slot_isolation_key(request["slot_id"])):
        raise CoverageProofError("slot_id", f"{page['slot_id']!r} vs {request['slot_id']!r}")
    messages = page.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CoverageProofError("messages", "messages must be a list of objects")
    for m in messages:
        named = [m[f] for f in SENDER_FIELDS if m.get(f) not in (None, "")]
        if not named or any(n != sender for n in named):
            raise CoverageProofError("row_sender", f"row seq={m.get('seq')!r} names {named!r}, want {sender!r}")

    if not tail:
        if any(not isinstance(page.get(f), bool) for f in FLAG_FIELDS):
            raise CoverageProofError("flags_type", "the *_has_more flags must be JSON booleans")
        if page["has_more"] != (page["persistent_has_more"] or page["volatile_has_more"]):
            raise CoverageProofError("has_more", "has_more != persistent_has_more or volatile_has_more")

    def seq_field(field: str, default: Any = None) -> int:
        value = _seq(page.get(field, default))
        if value is None:
            raise CoverageProofError("seq_type", f"{field} = {page.get(field, default)!r} is not a JSON int seq")
        return value

    covered, head = seq_field("covered_through_seq"), seq_field("head_seq")
    persistent = [m for m in messages if str(m.get("storage") or "") != "volatile"]

    if tail:  # the SDK reads no scan_after / next_after / floor in tail mode
        window_start = _seq(page.get("window_start_seq"))
        if window_start is None:
            raise CoverageProofError("window_start", "tail page without a JSON int window_start_seq")
        if "volatile_has_more" in page and not isinstance(page["volatile_has_more"], bool):
            raise CoverageProofError("flags_type", "volatile_has_more must be a JSON boolean")
        if covered != head or window_start > head:
            raise CoverageProofError("tail_window", f"window {window_start}..{covered} vs head {head}")
        if len(persistent) != len(messages):
            raise CoverageProofError("tail_window", "a tail page carries no volatile rows")
        if head <= after and (window_start != head or persistent):
            raise CoverageProofError("tail_window", "nothing after after_seq: the window must be empty at head")
        if head > after and window_start <= after:
            raise CoverageProofError("tail_window", "window_start_seq must lie after after_seq")
        lower = window_start - 1
    else:
        scan_after, next_after = seq_field("scan_after_seq"), seq_field("next_after_seq")
        floor = seq_field("retention_floor_seq", 0)
        if not max(after, floor) <= scan_after <= max(after, floor, ack):
            raise CoverageProofError(
                "scan_after", f"scan_after_seq {scan_after} outside [max(after {after}, floor {floor}), "
                              f"max(after, floor, ack {ack})]")
        if not scan_after <= covered <= head:
            raise CoverageProofError("covered_range", f"need scan_after {scan_after} <= covered {covered} <= head {head}")
        if covered < head and not page["persistent_has_more"]:
            raise CoverageProofError("covered_below_head", f"covered {covered} < head {head} without persistent_has_more")
        if next_after != covered:
            raise CoverageProofError("next_after_seq", f"next_after_seq {next_after} != covered {covered}")
        lower = scan_after

    if len(messages) > limit:
        raise CoverageProofError("row_count", f"{len(messages)} rows > limit {limit}")
    previous = lower
    for m in persistent:
        seq = _seq(m.get("seq"))
        if seq is None or seq == 0:
            raise CoverageProofError("row_seq_type", f"row seq {m.get('seq')!r} is not a positive JSON int")
        if not lower < seq <= covered:
            raise CoverageProofError("row_seq_range", f"row seq {seq} outside ({lower}, {covered}]")
        if seq <= previous:
            raise CoverageProofError("row_order", f"row seq {seq} after {previous}: not strictly ascending")
        previous = seq
