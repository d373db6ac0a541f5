"""Shared API error tree of aund and its apps (layer: client_stub; imports the stdlib only).

Two kinds of failure exist (dbus-broker's rule): *API errors* are the classes below, raised on
purpose, each with a stable reverse-domain ``code``, and crossing the local socket as an ``err``
frame; *everything else is a bug*, is never an ``AundError``, and is never put on the wire.

``ClientError``: the request is wrong; retrying the same request will not help.
``ServerError``: something transient went wrong; retryable unless an instance says otherwise.
Retries with backoff belong to callers, and only for idempotent calls.

Wire shape (see ``error_to_wire``)::

    {"code": "aund.Error.LimitsExceeded", "type": "LimitsExceeded", "message": str,
     "retryable": bool, "data": {str: ...}, "branch": "client" | "server" | "root"}

``branch`` is an extra hint that lets an older peer map a code it does not know yet to the
nearest branch instead of the root.
"""

from __future__ import annotations

from collections.abc import Mapping
TYPE_CHECKING = False  # typing is for checkers only: apps should not pay for importing it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AundError", "ClientError", "ServerError",
    "ProtocolError", "InvalidParams", "UnknownOp", "PermissionDenied", "LimitsExceeded",
    "ResourceNotExistError", "ResourceAlreadyExistError", "AuthError", "E2EEError",
    "NotReady", "RpcTimeout", "GatewayError", "GatewayUnavailable", "DaemonUnavailable",
    "StorageError", "ERROR_CLASSES", "error_to_wire", "error_from_wire",
]


class AundError(Exception):
    """Root of every deliberate aund failure; ``code`` is its stable wire name."""

    code: str = "aund.Error"
    branch: str = "root"
    default_retryable: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        data: Mapping[str, Any] | None = None,
        retryable: bool | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = dict(data) if data else {}
        self.retryable = self.default_retryable if retryable is None else bool(retryable)
        if code is not None:  # only set for codes this peer does not know (see error_from_wire)
            self.code = code

    def __str__(self) -> str:
        return self.message or self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, data={self.data!r})"


class ClientError(AundError):
    """The request is wrong (bad params, unknown AID, denied, missing, duplicate); never retryable."""

    code = "aund.Error.Client"
    branch = "client"

    def __init__(self, message: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retryable = False


class ServerError(AundError):
    """A transient failure (gateway down, timeout, storage busy); retryable by default."""

    code = "aund.Error.Server"
    branch = "server"
    default_retryable = True


class ProtocolError(ClientError):
    """A local-protocol violation (bad frame, oversize, wrong kind); the connection is closed."""

    code = "aund.Error.Protocol"


class InvalidParams(ClientError):
    """An op's arguments are missing, ill-typed or out of range; the connection stays open."""

    code = "aund.Error.InvalidParams"


class UnknownOp(ClientError):
    """The daemon has no op of that name (check the ``ops`` list of the hello reply)."""

    code = "aund.Error.UnknownOp"


class PermissionDenied(ClientError):
    """The peer credentials or policy do not allow this op on this AID."""

    code = "aund.Error.PermissionDenied"


class LimitsExceeded(ClientError):
    """The app went over one of its own quotas (in-flight RPCs, subscriptions, bytes, frame size)."""

    code = "aund.Error.LimitsExceeded"


class ResourceNotExistError(ClientError):
    """The named AID, message, group, cursor or subscription does not exist."""

    code = "aund.Error.ResourceNotExist"


class ResourceAlreadyExistError(ClientError):
    """The thing to create (AID, group, consumer name) already exists."""

    code = "aund.Error.ResourceAlreadyExist"


class AuthError(ClientError):
    """Registration, login or token refresh was refused by the gateway's auth service."""

    code = "aund.Error.Auth"


class E2EEError(ClientError):
    """End-to-end encryption failed (bad signature, no usable prekey, undecryptable payload)."""

    code = "aund.Error.E2EE"


class NotReady(ServerError):
    """The daemon or this AID's gateway link is still starting or reconnecting."""

    code = "aund.Error.NotReady"


class RpcTimeout(ServerError):
    """A gateway RPC or its wait for an RPC budget slot ran out of time."""

    code = "aund.Error.RpcTimeout"


class GatewayError(ServerError):
    """The gateway answered with a JSON-RPC error; ``remote_code`` holds its numeric code."""

    code = "aund.Error.Gateway"

    def __init__(self, message: str = "", *, remote_code: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        if remote_code is not None:
            self.data["remote_code"] = remote_code

    @property
    def remote_code(self) -> int | None:
        """The gateway's JSON-RPC error code, or None if it was not given."""
        code = self.data.get("remote_code")
        return code if isinstance(code, int) and not isinstance(code, bool) else None


class GatewayUnavailable(ServerError):
    """The gateway cannot be reached or the link for this AID is down."""

    code = "aund.Error.GatewayUnavailable"


DAEMON_HINT = "is aund running? try: systemctl status aund.service / aund run"


class DaemonUnavailable(ServerError):
    """The app cannot reach aund's socket; ``socket_path`` and ``hint`` say where and what to try."""

    code = "aund.Error.DaemonUnavailable"

    def __init__(
        self, message: str = "", *, socket_path: str | None = None, hint: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        if socket_path is not None:
            self.data["socket_path"] = str(socket_path)
        self.data.setdefault("hint", DAEMON_HINT if hint is None else hint)
        if not message:
            where = self.data.get("socket_path", "its socket")
            self.message = f"cannot connect to aund at {where}; {self.data['hint']}"

    @property
    def socket_path(self) -> str | None:
        """The socket path that could not be reached, if known."""
        return self.data.get("socket_path")

    @property
    def hint(self) -> str:
        """An actionable next step for a human."""
        return str(self.data.get("hint", DAEMON_HINT))


class StorageError(ServerError):
    """The durable inbox or identity store failed to read or commit."""

    code = "aund.Error.Storage"


# The ONE table: wire ``type`` (class name) -> class. Codes are derived from it.
ERROR_CLASSES: dict[str, type[AundError]] = {
    cls.__name__: cls
    for cls in (
        AundError, ClientError, ServerError, ProtocolError, InvalidParams, UnknownOp,
        PermissionDenied, LimitsExceeded, ResourceNotExistError, ResourceAlreadyExistError,
        AuthError, E2EEError, NotReady, RpcTimeout, GatewayError, GatewayUnavailable,
        DaemonUnavailable, StorageError,
    )
}
_BY_CODE: dict[str, type[AundError]] = {cls.code: cls for cls in ERROR_CLASSES.values()}
_BY_BRANCH: dict[str, type[AundError]] = {"client": ClientError, "server": ServerError}
assert len(_BY_CODE) == len(ERROR_CLASSES), "duplicate error code"


def error_to_wire(exc: AundError) -> dict[str, Any]:
    """Return the wire dict ``{code, type, message, retryable, data, branch}`` for ``exc``.

    ``type`` is the name of the nearest class in ``ERROR_CLASSES`` (so subclasses defined
    elsewhere still map back to a known class); ``data`` is shallow-copied.

    Errors: ``TypeError`` if ``exc`` is not an ``AundError`` (a bug must not reach the wire).
    """
    if not isinstance(exc, AundError):
        raise TypeError(f"only AundError goes on the wire, not {type(exc).__name__}")
    known = next(c for c in type(exc).__mro__ if ERROR_CLASSES.get(c.__name__) is c)
    return {
        "code": exc.code,
        "type": known.__name__,
        "message": exc.message,
        "retryable": exc.retryable,
        "data": dict(exc.data),
        "branch": exc.branch,
    }


def _garbage(what: str) -> ProtocolError:
    return ProtocolError(f"malformed error object from peer: {what}")


def error_from_wire(d: object) -> AundError:
    """Rebuild the exception described by a wire error dict; never raises.

    Lookup order: ``type`` in ``ERROR_CLASSES``, then ``code``, then the ``branch`` hint
    (``ClientError`` / ``ServerError``), else ``AundError``. An unknown code is kept on the
    instance. ``retryable`` from the wire is honoured except that a ``ClientError`` is never
    retryable.

    Errors: none raised; input that is not a well-formed error dict is *returned* as a generic
    ``ProtocolError`` whose message names the bad field.
    """
    if not isinstance(d, Mapping):
        return _garbage(f"expected a map, got {type(d).__name__}")
    type_, code = d.get("type"), d.get("code")
    message, retryable, data = d.get("message", ""), d.get("retryable"), d.get("data", {})
    if type_ is not None and not isinstance(type_, str):
        return _garbage("field 'type' must be a string")
    if code is not None and not isinstance(code, str):
        return _garbage("field 'code' must be a string")
    if type_ is None and code is None:
        return _garbage("needs field 'type' or 'code'")
    if not isinstance(message, str):
        return _garbage("field 'message' must be a string")
    if retryable is not None and not isinstance(retryable, bool):
        return _garbage("field 'retryable' must be a bool")
    if data is None:
        data = {}
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        return _garbage("field 'data' must be a map with string keys")
    cls = ERROR_CLASSES.get(type_) if type_ is not None else None
    cls = cls or (_BY_CODE.get(code) if code is not None else None)
    keep_code = None
    if cls is None:
        branch = d.get("branch")
        cls = _BY_BRANCH.get(branch, AundError) if isinstance(branch, str) else AundError
        keep_code = code
    exc = cls.__new__(cls)
    AundError.__init__(exc, message, data=data, retryable=retryable, code=keep_code)
    if isinstance(exc, ClientError):
        exc.retryable = False
    return exc
