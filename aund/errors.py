"""The daemon's error tree: the same classes as `client_stub.errors` (one tree, both sides), plus
the mapping of a gateway's JSON-RPC error into that tree.

ClientError: the request is wrong; never retried. ServerError: transient; retried with
exponential backoff only where the call is idempotent.
"""
from __future__ import annotations

from typing import Any

from client_stub.errors import (  # noqa: F401  (re-exported)
    AundError, AuthError, ClientError, DaemonUnavailable, E2EEError, GatewayError, GatewayUnavailable,
    InvalidParams, LimitsExceeded, NotReady, PermissionDenied, ProtocolError, ResourceAlreadyExistError,
    ResourceNotExistError, RpcTimeout, ServerError, StorageError, UnknownOp,
)

_RETRYABLE_TEXT = ("gateway service degraded", "certificate not loaded", "long_connection_already_exists",
                   "long connection already exists")


def map_remote_error(method: str, error: Any) -> AundError:
    """Turn a gateway's `{code, message, data}` into an aund error (the SDK's table, protocol section 8)."""
    if not isinstance(error, dict):
        return GatewayError(f"{method}: malformed error from gateway", retryable=False)
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else 0
    message = str(error.get("message") or "gateway error")[:500]
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    text = f"{method}: {message}"
    extra = {"remote_code": code, "method": method}
    retry_override = data.get("retryable") if isinstance(data.get("retryable"), bool) else None
    lowered = message.lower()
    if code == -32004 and "timeout" in lowered:
        return RpcTimeout(text, data=extra)
    if code in (4001, 4010, -32001, -32003):
        return AuthError(text, data=extra)
    if code in (4030, 403, -32004):
        return PermissionDenied(text, data=extra)
    if code in (-32008, 4040, 404):
        return ResourceNotExistError(text, data=extra)
    if code in (4090, -32009):
        return ResourceAlreadyExistError(text, data=extra)
    if code in (-32600, -32601, -32602, 4000):
        return InvalidParams(text, data=extra)
    retryable = code in (4290, 429, -32029, -32429) or 5000 <= code <= 5999 \
        or any(t in lowered for t in _RETRYABLE_TEXT)
    if retry_override is not None:
        retryable = retry_override
    return GatewayError(text, remote_code=code, retryable=retryable, data={"method": method})
