"""devnet: the limits of the gateway and how its handlers read their params (one family:
aund.params; a refusal is a JSON-RPC -32602 `RpcError`)."""
from __future__ import annotations

from typing import Any

from aund import params as params_mod
from aund.aun import ids
from aund.aun import jsonrpc as rpc
from aund.aun.messaging import history_window as checked_history_window
from aund.errors import InvalidParams

MAX_SHORT_PER_SLOT = 10
MAX_INFLIGHT_PER_CONN = 64
MAX_PAYLOAD_BYTES = 1_000_000
MAX_ROW_WRAPPING = 8  # levels a stored payload gains inside push and pull frames
PULL_PAGE_BYTES = 512 * 1024  # a pull page stops adding rows past this size (always at least one row)
OUTBOX_FRAMES = 512
HISTORY_MAX_LIMIT = 200  # message.history (group.history: 50, as production)
QUEUE_SCAN_ROWS = 1000  # a queue-mode pull looks at this many rows of the sender at most
PROTOCOL_VERSION = "1.0"
SERVER_CAPABILITIES = {"namespaces": ["auth", "message", "meta", "group"], "p2p_peer_pull_v1": True,
                       "inline_realtime_payload_v1": True, "e2ee": True, "group_e2ee": True,
                       "max_message_size": MAX_PAYLOAD_BYTES}
#: Signed methods the gateway also takes unsigned, on the connection's identity (see
#: `Conn.connection_identity_suffices`).
UNSIGNED_OK_METHODS = frozenset({"message.send", "group.send"})
# calls production admits without an agent.md (the recovery paths of group identities)
AGENT_MD_EXEMPT = frozenset({"group.create", "group.bind_group_aid", "group.renew_group_aid"})
PRE_AUTH_METHODS = {"auth.create_aid", "auth.aid_login1", "auth.aid_login2", "auth.refresh_token", "auth.connect",
                    "auth.renew_cert", "auth.rekey"}
NOTIFY_MAX_BYTES = 64 * 1024  # a notification's params, as the SDK bounds them
NOTIFY_MAX_TTL_MS = 60_000

from aund.aun.codes import (  # noqa: E402,F401  (close codes: the SDK never reconnects after most 40xx)
    CLOSE_AUTH_FAILED, CLOSE_AUTH_TIMEOUT, CLOSE_REPLACED, CLOSE_SHORT_TTL,
)
KICK_GRACE_SECONDS = 0.25  # between event/gateway.disconnect and the close, so the client reads the event



class RpcError(Exception):
    """Answer the current request with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def validate_aid(aid: Any, issuer: str | None = None) -> str:
    try:
        aid = ids.normalize_aid(aid)
    except ValueError as exc:
        raise RpcError(rpc.INVALID_PARAMS, f"invalid aid: {exc}") from None
    if issuer is not None and aid.partition(".")[2] != issuer:
        raise RpcError(rpc.PERMISSION_DENIED, f"this devnet issues only *.{issuer} identities")
    return aid


def bad_param(exc: params_mod.ParamError) -> RpcError:
    return RpcError(rpc.INVALID_PARAMS, str(exc))


def str_param(params: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    with params_mod.fail_as(bad_param):
        return params_mod.string(params, key, params_mod.MISSING if required else default, what="param")


def int_param(params: dict[str, Any], key: str, default: int, *, lo: int = 0, hi: int = rpc.MAX_SAFE_INT) -> int:
    with params_mod.fail_as(bad_param):
        return params_mod.integer(params, key, default, minimum=lo, maximum=hi, clamp=True, what="param")


def history_window(params: dict[str, Any], max_limit: int) -> tuple[int, int]:
    """(before_seq, limit) of a history call (the client side's checks, answered as -32602)."""
    try:
        return checked_history_window(params, max_limit)
    except InvalidParams as exc:
        raise RpcError(rpc.INVALID_PARAMS, str(exc)) from None
