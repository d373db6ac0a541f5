"""The daemon's error tree: the same classes as `client_stub.errors` (one tree, both sides), plus
the mapping of a gateway's JSON-RPC error into that tree.

ClientError: the request is wrong; never retried. ServerError: transient; retried with
exponential backoff only where the call is idempotent.
"""
from __future__ import annotations

from typing import Any

from aund.aun import codes

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
    if code == codes.FORBIDDEN and "timeout" in lowered:
        return RpcTimeout(text, data=extra)
    if code in (codes.AUTH_FAILED, codes.BAD_NONCE, codes.UNAUTHORIZED, codes.AGENT_MD_REQUIRED):
        return AuthError(text, data=extra)
    if code in (codes.PERMISSION_DENIED, 403, codes.FORBIDDEN):
        return PermissionDenied(text, data=extra)
    if code in (codes.NOT_FOUND, codes.NOT_FOUND_4040, 404):
        return ResourceNotExistError(text, data=extra)
    if code in (codes.CONFLICT, codes.ALREADY_EXISTS):
        return ResourceAlreadyExistError(text, data=extra)
    if code in (codes.INVALID_REQUEST, codes.METHOD_NOT_FOUND, codes.INVALID_PARAMS, codes.MISSING_PARAMS):
        return InvalidParams(text, data=extra)
    retryable = code in (codes.RATE_LIMITED, 429, -32029, -32429) or 5000 <= code <= 5999 \
        or any(t in lowered for t in _RETRYABLE_TEXT)
    if retry_override is not None:
        retryable = retry_override
    return GatewayError(text, remote_code=code, retryable=retryable, data={"method": method})
