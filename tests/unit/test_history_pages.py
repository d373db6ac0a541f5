"""History pages (message.history / group.history): the checks aund makes of a gateway's page
before decrypting it, and what an app gets for a row that does not open."""
from __future__ import annotations

import pytest

from aund.aun.messaging import history_entry, history_rows, history_window
from aund.errors import GatewayError, InvalidParams
from aund.inbox import NewEvent


def _row(seq: int, sender: str = "bob.aid.test", **extra) -> dict:
    return {"seq": seq, "message_id": f"m-{seq}", "from_aid": sender, **extra}


def _sender(row: dict) -> str:
    return row.get("from_aid", "")


def test_rows_come_back_oldest_first_with_duplicates_folded():
    page = {"messages": [_row(7), _row(3), _row(7)], "window_start_seq": 3, "next_before_seq": 3, "has_older": True}
    assert [r["seq"] for r in history_rows(page, 10, sender_of=_sender, expected_sender="bob.aid.test")] == [3, 7]


@pytest.mark.parametrize("page, why", [
    ({"messages": [_row(10)], "has_older": False}, "below before_seq"),
    ({"messages": [_row(0)], "has_older": False}, "below before_seq"),
    ({"messages": [{"seq": True}], "has_older": False}, "below before_seq"),
    ({"messages": [_row(3), _row(3, payload={"x": 1})], "has_older": False}, "two different rows"),
    ({"messages": [_row(3, sender="eve.aid.test")], "has_older": False}, "another sender"),
    ({"messages": [_row(3)], "window_start_seq": 2, "has_older": False}, "window_start_seq"),
    ({"messages": {}, "has_older": False}, "not a list"),
    ({"messages": [], "has_older": "no"}, "not a boolean"),
])
def test_a_page_that_breaks_the_rules_is_refused(page, why):
    with pytest.raises(GatewayError, match=why) as refused:
        history_rows(page, 10, sender_of=_sender, expected_sender="bob.aid.test")
    assert refused.value.retryable is False


@pytest.mark.parametrize("params, arg", [({}, "before_seq"), ({"before_seq": 0}, "before_seq"),
                                         ({"before_seq": "9"}, "before_seq"), ({"before_seq": 9, "limit": 0}, "limit"),
                                         ({"before_seq": 9, "limit": 51}, "limit"),
                                         ({"before_seq": 9, "limit": True}, "limit")])
def test_bad_window_params_name_the_argument(params, arg):
    with pytest.raises(InvalidParams) as refused:
        history_window(params, 50)
    assert refused.value.data["arg"] == arg
    assert history_window({"before_seq": 9}, 50) == (9, 50)


def test_an_undecryptable_row_has_no_payload_and_says_why():
    event = NewEvent("message.undecryptable", "bob.aid.test", "m-3", 3,
                     {"from": "bob.aid.test", "seq": 3, "message_id": "m-3", "encrypted": True,
                      "reason": "aead_failed", "detail": "tag mismatch"})
    entry = history_entry(event)
    assert entry["payload"] is None and entry["encrypted"] is True
    assert entry["history_error"] == {"code": "decrypt_failed", "reason": "aead_failed", "message": "tag mismatch"}
    assert "reason" not in entry and "detail" not in entry
    ok = NewEvent("message.received", "bob.aid.test", "m-4", 4, {"seq": 4, "payload": {"text": "hi"}})
    assert history_entry(ok) == {"seq": 4, "payload": {"text": "hi"}}
