"""AUN layer: notifications (JSON-RPC without id) as the SDK's `notify()` frames them.

Three shapes, and nothing else goes out:
- to an AID (`to`, optionally `device_id`, `slot_id` with it): `notification/route` carrying
  `{target: {type: "aid", aid, device_id?, slot_id?}, deliver: {method, params}, ttl_ms?}`;
- to a group's online members (`group_id`): `notification/group.route` `{group_id, deliver, ttl_ms?}`;
- to the gateway itself (neither): the method as given, which must start with `notification/`.
Routed methods must be `event/app.*` (an app may not forge a gateway event such as
`event/message.received`); params are at most 64 KiB of JSON; `ttl_ms` is 0..60000.
Delivery is best effort: online long connections only, never stored, never acked.
"""
from __future__ import annotations

import json
from typing import Any

from aund.aun import ids
from aund.errors import InvalidParams

MAX_PARAMS_BYTES = 64 * 1024
MAX_TTL_MS = 60_000
APP_EVENT_PREFIX = "event/app."
DIRECT_PREFIX = "notification/"


def frame(method: str, params: dict[str, Any] | None = None, *, to: str | None = None,
          group_id: str | None = None, device_id: str | None = None, slot_id: str | None = None,
          ttl_ms: int | None = None) -> tuple[str, dict[str, Any]]:
    """(wire method, wire params) of one notification; InvalidParams (``data.arg``) when the SDK
    would refuse it."""
    if params is not None and not isinstance(params, dict):
        raise InvalidParams("notify params must be a map", data={"arg": "params"})
    body = dict(params or {})
    try:
        size = len(json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise InvalidParams(f"notify params are not JSON: {exc}", data={"arg": "params"}) from None
    if size > MAX_PARAMS_BYTES:
        raise InvalidParams(f"notify params are {size} bytes of JSON, more than {MAX_PARAMS_BYTES}",
                            data={"arg": "params"})
    if ttl_ms is not None and (isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int)
                               or not 0 <= ttl_ms <= MAX_TTL_MS):
        raise InvalidParams(f"ttl_ms must be an integer in 0..{MAX_TTL_MS}", data={"arg": "ttl_ms"})
    to, group_id = (to or "").strip(), (group_id or "").strip()
    device_id, slot_id = (device_id or "").strip(), (slot_id or "").strip()
    if to and group_id:
        raise InvalidParams("notify takes `to` or `group_id`, not both", data={"arg": "group_id"})
    if slot_id and not device_id:
        raise InvalidParams("slot_id needs device_id", data={"arg": "slot_id"})
    if (device_id or slot_id) and not to:
        raise InvalidParams("device_id and slot_id need `to`", data={"arg": "device_id"})
    method = (method or "").strip() if isinstance(method, str) else ""
    if not to and not group_id:
        if not method.startswith(DIRECT_PREFIX) or method == DIRECT_PREFIX:
            raise InvalidParams("a notification to the gateway must be named notification/...; "
                                "give `to` or `group_id` to reach apps (event/app.*)", data={"arg": "method"})
        return method, body
    if not method.startswith(APP_EVENT_PREFIX) or method == APP_EVENT_PREFIX:
        raise InvalidParams("a routed notification must be named event/app.* (gateway events cannot be forged)",
                            data={"arg": "method"})
    deliver = {"method": method, "params": body}
    ttl = {} if ttl_ms is None else {"ttl_ms": ttl_ms}
    if group_id:
        return "notification/group.route", {"group_id": group_id, "deliver": deliver, **ttl}
    try:
        target: dict[str, Any] = {"type": "aid", "aid": ids.normalize_aid(to)}
    except ValueError as exc:
        raise InvalidParams(f"notify `to`: {exc}", data={"arg": "to"}) from None
    if device_id:
        target["device_id"] = device_id
    if slot_id:
        target["slot_id"] = slot_id
    return "notification/route", {"target": target, "deliver": deliver, **ttl}
