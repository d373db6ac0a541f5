"""What one app may not do to another through aund, against a real
`aund run` and a real devnet:

- protected headers given per call (`message.send` params) are held to the bounds of
  `set_protected_headers`, and no app may set the names aund or the protocol set (`from`, ...);
- an ack past the newest event is refused (it would skip events not written yet);
- durable consumers are per uid: another user's app with the same consumer name resumes from its
  own cursor, not from ours (uid 65534 is a real process that drops privileges; run as root).
"""
from __future__ import annotations


import pytest

from client_stub import Client, InvalidParams
from tests.system.harness import aid, finish, spawn_app, start_aund

pytestmark = pytest.mark.timeout(90)
NOBODY, NOGROUP = 65534, 65534


@pytest.fixture
def two_aids(devnet, tmp_path, nogroup_socket_dir):
    """A daemon holding alice and bob (bob also granted to uid 65534), both ready; and an owner app."""
    alice, bob = aid("hdra"), aid("hdrb")
    daemon = start_aund(tmp_path, devnet, [alice, bob], socket=nogroup_socket_dir / "aund.sock",
                        policy={bob: {"uids": [NOBODY]}})
    try:
        with Client(daemon.socket, app="owner") as app:
            for a in (alice, bob):
                app.ensure_identity(a)
                app.session(a).wait_ready(30)
            yield daemon, app, alice, bob
    finally:
        daemon.stop()


def _first(app, aid: str, consumer: str):
    with app.session(aid).events(consumer) as events:
        event = events.get(timeout=30)
    assert event is not None
    return event


def test_call_headers_have_the_bounds_of_set_protected_headers(two_aids):
    _, app, alice, bob = two_aids
    s = app.session(alice)
    refused = {
        "10,000 headers": {f"h{i}": "v" for i in range(10_000)},
        "an 800 KB value": {"big": "x" * 800_000},
        "a nested value": {"nested": {"a": {"b": 1}}},
        "a forged sender": {"from": "someone-else.aid.test"},
    }
    for what, headers in refused.items():
        with pytest.raises(InvalidParams) as info:
            s.call("message.send", {"to": bob, "payload": {"type": "text", "text": what}, "protected_headers": headers})
        assert "protected_headers" in str(info.value), what
    with pytest.raises(InvalidParams) as info:
        s.set_protected_headers({"From": "someone-else.aid.test"})
    assert info.value.data == {"arg": "headers", "header": "From"}
    sent = s.call("message.send", {"to": bob, "payload": {"type": "text", "text": "ok"},
                                   "protected_headers": {"trace": "t-1"}})
    assert sent["status"] == "delivered"
    event = _first(app, bob, "reader")
    assert event.data["payload"]["text"] == "ok"  # nothing refused got out
    assert event.data["protected_headers"]["trace"] == "t-1"


def test_an_ack_past_the_newest_event_is_refused(two_aids):
    _, app, alice, bob = two_aids
    app.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": "one"}})
    event = _first(app, bob, "reader")
    with pytest.raises(InvalidParams) as info:  # it would skip events not written yet
        app.request("ack", {"aid": bob, "consumer": "reader", "cursor": event.cursor + 1000})
    assert info.value.data["head"] == event.cursor
    event.ack()  # the newest itself is fine


def test_another_users_consumer_of_the_same_name_is_its_own(two_aids, tmp_path):
    daemon, app, alice, bob = two_aids
    app.session(alice).call("message.send", {"to": bob, "payload": {"type": "text", "text": "one"}})
    event = _first(app, bob, "reader")
    event.ack()  # our "reader" is past it now
    log = tmp_path / "probe.log"
    got = finish(spawn_app("consumer-probe", {"socket": str(daemon.socket), "uid": NOBODY, "gid": NOGROUP,
                                              "aid": bob, "consumer": "reader"}, log), 40, log)
    assert got["first_cursor"] == event.cursor  # uid 65534's "reader" starts from the beginning
