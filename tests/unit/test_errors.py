"""Unit tests of client_stub.errors: the one error tree and its wire table."""

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_stub import errors
from client_stub.errors import (
    ERROR_CLASSES,
    AundError,
    ClientError,
    DaemonUnavailable,
    GatewayError,
    ProtocolError,
    ServerError,
    error_from_wire,
    error_to_wire,
)

ALL = list(ERROR_CLASSES.values())


def test_table_lists_every_error_class_in_the_module():
    defined = {
        obj for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, AundError) and obj.__module__ == errors.__name__
    }
    assert defined == set(ALL)


def test_codes_are_unique_and_reverse_domain():
    codes = [cls.code for cls in ALL]
    assert len(set(codes)) == len(codes)
    assert all(c == "aund.Error" or c.startswith("aund.Error.") for c in codes)
    assert errors.LimitsExceeded.code == "aund.Error.LimitsExceeded"


def test_every_class_has_a_one_line_doc_and_a_branch():
    for cls in ALL:
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), cls
        if cls not in (AundError, ClientError, ServerError):
            assert issubclass(cls, (ClientError, ServerError)), cls


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_round_trip_every_class(cls):
    exc = cls("boom", data={"aid": "alice.aid.test", "n": 3})
    wire = error_to_wire(exc)
    assert set(wire) == {"code", "type", "message", "retryable", "data", "branch"}
    assert wire["type"] == cls.__name__ and wire["code"] == cls.code
    back = error_from_wire(wire)
    assert type(back) is cls
    assert back.code == exc.code and back.message == "boom"
    assert back.retryable == exc.retryable
    assert back.data == exc.data
    assert error_to_wire(back) == wire


def test_retryable_defaults():
    assert ServerError("x").retryable and errors.RpcTimeout().retryable
    assert not ClientError("x").retryable and not AundError().retryable
    assert not errors.ProtocolError(retryable=True).retryable  # ClientError never retries
    assert not errors.StorageError("disk full", retryable=False).retryable


def test_server_error_may_be_marked_not_retryable_on_the_wire():
    wire = error_to_wire(errors.StorageError("disk full", retryable=False))
    assert error_from_wire(wire).retryable is False
    client = error_to_wire(errors.InvalidParams("x")) | {"retryable": True}
    assert error_from_wire(client).retryable is False


def test_gateway_error_carries_remote_code():
    exc = GatewayError("no such method", remote_code=-32601)
    back = error_from_wire(error_to_wire(exc))
    assert isinstance(back, GatewayError) and back.remote_code == -32601
    assert GatewayError("x").remote_code is None


def test_daemon_unavailable_is_actionable():
    exc = DaemonUnavailable(socket_path="/run/aund/aund.sock")
    assert exc.socket_path == "/run/aund/aund.sock"
    assert "/run/aund/aund.sock" in str(exc)
    assert "systemctl status aund.service" in str(exc) and "aund run" in exc.hint
    back = error_from_wire(error_to_wire(exc))
    assert isinstance(back, DaemonUnavailable)
    assert back.socket_path == exc.socket_path and str(back) == str(exc)


def test_foreign_subclass_maps_to_nearest_known_class():
    class QuotaOfGroups(errors.LimitsExceeded):
        pass

    wire = error_to_wire(QuotaOfGroups("too many groups"))
    assert wire["type"] == "LimitsExceeded"
    assert type(error_from_wire(wire)) is errors.LimitsExceeded


def test_code_alone_is_enough():
    back = error_from_wire({"code": "aund.Error.NotReady", "message": "starting"})
    assert type(back) is errors.NotReady and back.retryable


@pytest.mark.parametrize(
    ("branch", "cls", "retryable"),
    [("client", ClientError, False), ("server", ServerError, True), ("root", AundError, False),
     (None, AundError, False), (7, AundError, False)],
)
def test_unknown_code_maps_to_branch_and_keeps_code(branch, cls, retryable):
    wire = {"code": "aund.Error.FromTheFuture", "type": "FromTheFuture", "message": "new",
            "retryable": retryable, "data": {}, "branch": branch}
    back = error_from_wire(wire)
    assert type(back) is cls
    assert back.code == "aund.Error.FromTheFuture" and back.retryable is retryable
    assert error_to_wire(back)["code"] == "aund.Error.FromTheFuture"


@pytest.mark.parametrize(
    ("garbage", "field"),
    [
        (None, "map"), (b"x", "map"), ([1, 2], "map"), ({}, "'type' or 'code'"),
        ({"type": 3}, "'type'"), ({"code": ["x"]}, "'code'"),
        ({"type": "InvalidParams", "message": 5}, "'message'"),
        ({"type": "InvalidParams", "retryable": "yes"}, "'retryable'"),
        ({"type": "InvalidParams", "data": [1]}, "'data'"),
        ({"type": "InvalidParams", "data": {1: 2}}, "'data'"),
    ],
)
def test_garbage_gives_protocol_error(garbage, field):
    back = error_from_wire(garbage)
    assert type(back) is ProtocolError and field in back.message
    assert not back.retryable


def test_missing_optional_fields_default():
    back = error_from_wire({"type": "UnknownOp", "data": None})
    assert type(back) is errors.UnknownOp and back.message == "" and back.data == {}


def test_to_wire_refuses_bugs():
    with pytest.raises(TypeError):
        error_to_wire(ValueError("a bug"))  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(_json, st.dictionaries(
    st.sampled_from(["code", "type", "message", "retryable", "data", "branch", "x"]),
    _json | st.sampled_from(list(ERROR_CLASSES)), max_size=6)))
def test_from_wire_never_raises(d):
    assert isinstance(error_from_wire(d), AundError)
