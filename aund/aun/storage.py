"""AUN layer: Storage uploads and downloads as the SDK does them, done inside the daemon.

The control plane goes through the link (`call`, which signs the storage writes as the SDK does);
the data plane is plain HTTP (aund.aun.http, h11) to the presigned URLs the gateway hands out.
A private object's download needs the AID's access token as a bearer: it is added here, only for
URLs on the gateway's own HTTP host, so the token never leaves the daemon and never goes to a
third party an upload or download URL might name.

upload: `storage.check_upload` says inline or not (the gateway's inline limit); inline ->
`storage.put_object` (base64), else `storage.create_upload_session`, HTTP PUT of the body to its
`upload_url`, `storage.complete_upload` with size and SHA-256 (the gateway checks both).
download: `storage.create_download_ticket`, HTTP GET of its URL, the body's SHA-256 checked
against the ticket's.
"""
from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aund.aun import http
from aund.errors import GatewayError, GatewayUnavailable, InvalidParams, ResourceAlreadyExistError

MAX_OBJECT_BYTES = 16 << 20  # what aund holds in memory for one transfer (AUN's default object limit: 10 MB)
DATA_PLANE_TIMEOUT = 300.0

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


def target_params(object_key: str, owner: str | None, bucket: str | None) -> dict[str, Any]:
    """The addressing of an object as the SDK sends it (owner_aid only when given)."""
    params: dict[str, Any] = {"object_key": object_key, "bucket": bucket or "default"}
    if owner:
        params["owner_aid"] = owner
    return params


def object_key(path: str) -> str:
    """A remote path (`/a/b.txt` or `a/b.txt`) as an object key; InvalidParams for an empty one."""
    key = "/".join(part for part in str(path).replace("\\", "/").split("/") if part)
    if not key:
        raise InvalidParams("a storage path names an object, not the root", data={"arg": "path"})
    return key


def _auth_headers(url: str, gateway_url: str, token: str) -> list[tuple[str, str]]:
    """The bearer token, only for the gateway's own HTTP host (scheme, host and port alike)."""
    ours = urllib.parse.urlsplit(http.http_base(gateway_url))
    theirs = urllib.parse.urlsplit(url)
    same = (theirs.scheme, theirs.hostname, theirs.port) == (ours.scheme, ours.hostname, ours.port)
    return [("Authorization", f"Bearer {token}")] if same and token else []


async def _http(method: str, url: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    if not isinstance(url, str) or not url:
        raise GatewayError(f"storage: the gateway gave no {method} URL", retryable=False)
    status, _, data = await http.http_request(method, url, headers=headers, body=body, timeout=DATA_PLANE_TIMEOUT,
                                              max_body=MAX_OBJECT_BYTES)
    if not 200 <= status < 300:
        where = urllib.parse.urlsplit(url)
        raise GatewayError(f"storage: HTTP {method} {where.netloc}{where.path} answered {status}: "
                           f"{data[:200].decode('utf-8', 'replace')}", remote_code=status,
                           retryable=status >= 500, data={"status": status})
    return data


async def upload(call: Call, data: bytes, params: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
    """Store `data` at `params` (target_params plus content_type / is_private / metadata); the
    gateway's object view. ResourceAlreadyExistError when the object exists and not `overwrite`."""
    sha = hashlib.sha256(data).hexdigest()
    where = {k: params[k] for k in ("object_key", "bucket", "owner_aid") if k in params}
    check = await call("storage.check_upload", dict(where, size_bytes=len(data), sha256=sha))
    check = check if isinstance(check, dict) else {}
    if check.get("within_limit") is False:
        raise InvalidParams(f"storage: {len(data)} bytes is above the gateway's object limit "
                            f"({check.get('max_file_size_bytes')} bytes)", data={"arg": "size"})
    if check.get("target_exists") and not overwrite:
        raise ResourceAlreadyExistError(f"storage: {params['object_key']} exists (pass overwrite=True)",
                                        data={"path": params["object_key"]})
    write = dict(params, overwrite=overwrite)
    if check.get("inline") is True:
        return await call("storage.put_object", dict(write, content=base64.b64encode(data).decode("ascii")))
    session = await call("storage.create_upload_session", dict(
        where, size_bytes=len(data), content_type=params.get("content_type") or "application/octet-stream",
        overwrite=overwrite))
    session = session if isinstance(session, dict) else {}
    headers = [(str(k), str(v)) for k, v in (session.get("headers") or {}).items()
               if v is not None and str(k).lower() != "content-type"]
    headers.append(("Content-Type", params.get("content_type") or "application/octet-stream"))
    await _http("PUT", session.get("upload_url") or "", headers, data)
    done = dict(write, size_bytes=len(data), sha256=sha)
    if session.get("session_id"):
        done["session_id"] = session["session_id"]
    return await call("storage.complete_upload", done)


async def download(call: Call, params: dict[str, Any], *, gateway_url: str, token: str) -> tuple[dict[str, Any], bytes]:
    """(the ticket's object view, the body), the body's SHA-256 checked against the ticket's."""
    ticket = await call("storage.create_download_ticket", params)
    ticket = ticket if isinstance(ticket, dict) else {}
    url = str(ticket.get("download_url") or ticket.get("logical_url") or ticket.get("url") or "")
    try:
        data = await _http("GET", url, _auth_headers(url, gateway_url, token))
    except GatewayUnavailable as exc:
        raise GatewayUnavailable(str(exc).replace(urllib.parse.urlsplit(url).query, "…"), retryable=True) from None
    expected = str(ticket.get("sha256") or "").lower()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise GatewayError(f"storage: the body of {params.get('object_key')} does not match its sha256",
                           retryable=True, data={"path": params.get("object_key")})
    view = {k: v for k, v in ticket.items() if k not in ("download_url", "logical_url", "url")}
    return view, data
