"""AUN layer: every numeric code of the AUN wire, in one place (the SDK's error table, protocol
section 8, and the gateway's WebSocket close codes). aund's error mapping (aund.errors), its links,
its group and message code and the devnet all take their numbers from here.

Names only; what each code *means for aund* (retried or not, which error class) is decided where
it is used: `aund.errors.map_remote_error`, `aund.aun.link`, `aund.aun.messaging`."""
from __future__ import annotations

# --- JSON-RPC 2.0 --------------------------------------------------------------------------------
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# --- AUN gateway (-320xx) ------------------------------------------------------------------------
VERSION_MISMATCH = -32000
UNAUTHORIZED = -32001
CERT_INVALID = -32002       # expired, revoked or malformed certificate (protocol doc 01)
AGENT_MD_REQUIRED = -32003  # production's identity admission: the AID has no valid agent.md
FORBIDDEN = -32004          # "timeout" in its message: the gateway's RPC timeout
NOT_FOUND = -32008
ALREADY_EXISTS = -32009
SESSION_REQUIRED = -32013
CLIENT_SIGNATURE_INVALID = -32051

# --- E2EE and groups (-33xxx) --------------------------------------------------------------------
GROUP_NOT_FOUND = -33001
GROUP_STATE_INVALID = -33002
GROUP_SUSPENDED = -33003     # protocol doc 10.15; the SDK maps -33002/-33003 to GroupStateError
ALREADY_MEMBER = -33005
NOT_MEMBER = -33006
ROLE_INSUFFICIENT = -33007
INVITE_INVALID = -33008
JOIN_REJECTED = -33009
GROUP_REFUSALS = range(JOIN_REJECTED, GROUP_NOT_FOUND + 1)  # -33009..-33001: a refusal, not a fault
E2EE_PREKEY_INVALID = -33011
STATE_CONFLICT = -33012     # a state proposal / confirmation lost a race or is stale
RECIPIENTS_STALE = -33050   # the wrap set does not match the members: re-bootstrap and retry
EPOCH_STALE = -33052        # the SDK drops its bootstrap cache and re-encrypts once
NO_TARGETS = -33054         # the bootstrap named no device to wrap for
#: the gateway's answers after which a sender refetches the peer's devices and prekeys once
PREKEY_RETRY = frozenset({E2EE_PREKEY_INVALID, STATE_CONFLICT, RECIPIENTS_STALE, EPOCH_STALE, NO_TARGETS})

# --- HTTP-like (4xxx / 5xxx) ---------------------------------------------------------------------
MISSING_PARAMS = 4000
AUTH_FAILED = 4001
BAD_NONCE = 4010
PERMISSION_DENIED = 4030
NOT_FOUND_4040 = 4040
CONFLICT = 4090
RATE_LIMITED = 4290
BACKEND_ERROR = 4500

# --- WebSocket close codes -----------------------------------------------------------------------
CLOSE_MESSAGE_TOO_BIG = 1009  # a frame above the receiver's limit (ours: the next page is smaller)
CLOSE_AUTH_FAILED = 4001
CLOSE_AUTH_TIMEOUT = 4008
CLOSE_SHUTDOWN = 4012         # the gateway is going away: the one retryable 40xx
CLOSE_SHORT_TTL = 4014
CLOSE_REPLACED = 4015         # another connection took the slot
#: close codes after which the official SDK never reconnects
NO_RECONNECT = frozenset({4001, 4003, CLOSE_AUTH_TIMEOUT, 4009, BAD_NONCE, 4011, 4013, CLOSE_SHORT_TTL,
                          CLOSE_REPLACED})
