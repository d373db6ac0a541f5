"""AUN layer: agent.md cards on the gateway's name service, over HTTP (fetch, publish, replace).

The name service serves an AID's card at `/agent.md` of its gateway, addressed by the AID as the
HTTP host. Uploads carry the bearer token of the AID that publishes it: the AID itself, or for a
group's card the group's owner. A replacement is conditional (If-Match the ETag seen, or
If-None-Match: * when there is none) and retried when another writer won the race.
"""
from __future__ import annotations

import json
from typing import Any

from aund.aun.http import http_base, http_request
from aund.errors import AuthError, GatewayError, InvalidParams
from aund.identity import agent_md

REPLACE_TRIES = 3


async def request(method: str, gateway: str, aid: str, body: bytes = b"", *, token: str = "",
                  condition: tuple[str, str] | None = None,
                  extra: tuple[tuple[str, str], ...] = ()) -> tuple[int, dict[str, str], bytes]:
    """One request to the gateway's agent.md of `aid` (served by its host name, as the name service)."""
    headers = [("Host", aid), *extra]
    if token:
        headers += [("Authorization", f"Bearer {token}"), ("Content-Type", "text/markdown; charset=utf-8")]
    if condition is not None:
        headers.append(condition)
    return await http_request(method, http_base(gateway) + "/agent.md", headers=headers, body=body)


async def replace(gateway: str, aid: str, text: str, *, token: str, signature_format: str = "") -> str:
    """PUT `text` over whatever is published (If-Match its ETag, If-None-Match: * if none; a
    concurrent change is retried twice); returns the new ETag. Errors: InvalidParams naming the
    field when the name service refuses the card, AuthError for a refused token, GatewayError."""
    extra = (("X-AUN-Signature-Format", signature_format),) if signature_format else ()
    for _ in range(REPLACE_TRIES):
        status, headers, _ = await request("HEAD", gateway, aid)
        if status not in (200, 404):
            raise GatewayError(f"HEAD agent.md of {aid}: HTTP {status}", retryable=status >= 500)
        condition = ("If-Match", headers["etag"]) if status == 200 and headers.get("etag") else ("If-None-Match", "*")
        status, headers, body = await request("PUT", gateway, aid, text.encode("utf-8"), token=token,
                                              condition=condition, extra=extra)
        if status == 200:
            etag = headers.get("etag") or json_field(body, "etag")
            if not etag:
                raise GatewayError(f"PUT agent.md of {aid}: no ETag in the answer", retryable=False)
            return etag
        if status in (400, 413):  # the name service disagrees with our own check: say why
            reason = json_field(body, "message") or body.decode("utf-8", "replace")[:300]
            raise bad_card(f"the gateway refused it: {reason}", json_field(body, "field"),
                           json_field(body, "error") or agent_md.INVALID)
        if status in (401, 403):
            raise AuthError(f"PUT agent.md of {aid}: HTTP {status} (the gateway refused the token)",
                            data={"aid": aid})
        if status != 412:
            raise GatewayError(f"PUT agent.md of {aid}: HTTP {status}", retryable=status >= 500 or status == 429)
    raise GatewayError(f"PUT agent.md of {aid}: it kept changing under us (412)", retryable=True)


def bad_card(message: str, field: Any, code: Any) -> InvalidParams:
    return InvalidParams(f"agent.md: {message}", data={"arg": "content", "field": str(field or ""),
                                                       "reason": str(code or agent_md.INVALID)})


def json_field(body: bytes, name: str) -> str:
    try:
        value = json.loads(body.decode("utf-8")).get(name)
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
