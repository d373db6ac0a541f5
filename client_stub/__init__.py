"""client_stub: what an app imports to talk to aund (msgpack and the stdlib only).

    from client_stub import Client
    with Client() as aund:
        s = aund.session("alice.aid.test")
        s.wait_ready(timeout=10)
        s.call("message.send", {"to": "bob.aid.test", "payload": {"text": "hi"}})

``AsyncClient`` is the asyncio twin; errors are the classes of ``client_stub.errors``.
"""
from client_stub.client import (
    AsyncClient, AsyncEventStream, AsyncSession, Client, Event, EventStream, Session, default_socket_path,
)
from client_stub.errors import (
    AundError, AuthError, ClientError, DaemonUnavailable, E2EEError, GatewayError, GatewayUnavailable,
    InvalidParams, LimitsExceeded, NotReady, PermissionDenied, ProtocolError, ResourceAlreadyExistError,
    ResourceNotExistError, RpcTimeout, ServerError, StorageError, UnknownOp,
)

__all__ = [
    "Client", "AsyncClient", "Session", "AsyncSession", "EventStream", "AsyncEventStream", "Event",
    "default_socket_path",
    "AundError", "ClientError", "ServerError", "ProtocolError", "InvalidParams", "UnknownOp",
    "PermissionDenied", "LimitsExceeded", "ResourceNotExistError", "ResourceAlreadyExistError",
    "AuthError", "E2EEError", "NotReady", "RpcTimeout", "GatewayError", "GatewayUnavailable",
    "DaemonUnavailable", "StorageError",
]
