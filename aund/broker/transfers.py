"""Broker ops: storage uploads and downloads streamed through the app socket in bounded chunks.

The app never sees a presigned URL's use nor the access token: the daemon does the data plane
(aund.aun.storage) and the app moves the bytes over its socket, one chunk per request, each at
most `chunk_size` bytes (TRANSFER_CHUNK, lowered to fit the connection's negotiated frame), so
one frame never carries a whole object and the app can show progress after each chunk.

    storage.upload.begin   {session, path, size, sha256, content_type?, public?, overwrite?,
                            owner?, bucket?, metadata?}          -> {transfer, chunk_size}
    storage.upload.chunk   {transfer, offset, data}              -> {received, size}
    storage.upload.finish  {transfer, timeout?}                  -> the gateway's object view
    storage.download.begin {session, path, owner?, bucket?, timeout?}
                                                 -> {transfer, chunk_size, size, sha256, object}
    storage.download.chunk {transfer, offset}                    -> {data, offset, done}
    storage.cancel         {transfer}                            -> {cancelled}

Chunks come in order (`offset` is checked). An upload's bytes must add up to `size` and hash to
`sha256` before anything goes to the gateway (InvalidParams otherwise). A download's body was
checked against the ticket's SHA-256 by the daemon; the stub checks it again. A transfer lives on
its connection: at most TRANSFERS_PER_APP at once, each at most MAX_OBJECT_BYTES, dropped when
it completes, fails, is cancelled, or the connection closes.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aund.aun import storage
from aund.broker import session as s
from client_stub.errors import InvalidParams, LimitsExceeded, ResourceNotExistError

if TYPE_CHECKING:
    from aund.broker.backend import LinkLease
    from aund.broker.session import AppConnection

TRANSFER_CHUNK = 256 * 1024
TRANSFERS_PER_APP = 4
FRAME_SLACK = 1024  # room in a frame for the request or reply around a chunk


@dataclass
class Transfer:
    kind: str  # "upload" or "download"
    handle: LinkLease
    params: dict[str, Any]
    size: int
    sha256: str = ""
    overwrite: bool = False
    data: bytearray = field(default_factory=bytearray)
    view: dict[str, Any] = field(default_factory=dict)


def _transfers(app: AppConnection) -> dict[int, Transfer]:
    found = getattr(app, "transfers", None)
    if found is None:
        found = app.transfers = {}
    return found


def _chunk_size(app: AppConnection) -> int:
    return max(1024, min(TRANSFER_CHUNK, app.max_frame - FRAME_SLACK))


def _new(app: AppConnection, transfer: Transfer) -> int:
    mine = _transfers(app)
    if len(mine) >= TRANSFERS_PER_APP:
        raise LimitsExceeded(f"at most {TRANSFERS_PER_APP} storage transfers at once per connection",
                             data={"limit": "transfers", "max": TRANSFERS_PER_APP})
    tid = next(app._ids)
    mine[tid] = transfer
    return tid


def _get(app: AppConnection, args: dict[str, Any], kind: str) -> tuple[int, Transfer]:
    tid = s._int(args, "transfer", minimum=1)
    transfer = _transfers(app).get(tid)
    if transfer is None or transfer.kind != kind:
        raise ResourceNotExistError(f"no {kind} {tid} on this connection", data={"transfer": tid})
    if not app.backend.allowed(app.app, transfer.handle.aid):  # a policy reload took the AID away
        del _transfers(app)[tid]
        raise app._denied(transfer.handle.aid)
    return tid, transfer


def _target(args: dict[str, Any]) -> dict[str, Any]:
    key = storage.object_key(s._str(args, "path", max_len=1024))
    bucket = s._opt_str(args, "bucket", max_len=64)
    return storage.target_params(key, s._opt_str(args, "owner"), bucket)


async def op_upload_begin(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    handle = app._session(args)
    params = _target(args)
    size = s._int(args, "size")
    if size > storage.MAX_OBJECT_BYTES:
        raise InvalidParams(f"an object is at most {storage.MAX_OBJECT_BYTES} bytes through aund", data={"arg": "size"})
    sha = s._str(args, "sha256", max_len=64).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise InvalidParams("argument 'sha256' must be 64 hex digits", data={"arg": "sha256"})
    content_type = s._opt_str(args, "content_type", max_len=256)
    params.update(content_type=content_type or "application/octet-stream",
                  is_private=not s._bool(args, "public", False))
    if args.get("metadata") is not None:
        params["metadata"] = s._map(args, "metadata")
    with app._guard(handle.aid):
        tid = _new(app, Transfer("upload", handle, params, size, sha, s._bool(args, "overwrite", False)))
    return {"transfer": tid, "chunk_size": _chunk_size(app)}


def op_upload_chunk(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    tid, transfer = _get(app, args, "upload")
    offset = s._int(args, "offset")
    data = s._bytes(args, "data", max_len=_chunk_size(app))
    if offset != len(transfer.data) or offset + len(data) > transfer.size:
        del _transfers(app)[tid]
        raise InvalidParams(f"upload {tid}: a chunk at {offset} of {len(data)} bytes does not follow the "
                            f"{len(transfer.data)} received of {transfer.size} (the upload is dropped)",
                            data={"arg": "offset"})
    transfer.data += data
    return {"received": len(transfer.data), "size": transfer.size}


async def op_upload_finish(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    tid, transfer = _get(app, args, "upload")
    timeout = s._timeout(args, "timeout", app.limits.max_call_timeout)
    del _transfers(app)[tid]
    data = bytes(transfer.data)
    if len(data) != transfer.size or hashlib.sha256(data).hexdigest() != transfer.sha256:
        raise InvalidParams(f"upload {tid}: {len(data)} bytes received with sha256 "
                            f"{hashlib.sha256(data).hexdigest()}, declared {transfer.size} bytes {transfer.sha256}",
                            data={"arg": "sha256"})
    with app._guard(transfer.handle.aid):
        return await transfer.handle.storage_upload(data, transfer.params, overwrite=transfer.overwrite,
                                                    app=app.app, timeout=timeout)


async def op_download_begin(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    handle = app._session(args)
    params = _target(args)
    timeout = s._timeout(args, "timeout", app.limits.max_call_timeout)
    if len(_transfers(app)) >= TRANSFERS_PER_APP:
        _new(app, Transfer("download", handle, params, 0))  # raises LimitsExceeded
    with app._guard(handle.aid):
        view, data = await handle.storage_download(params, app=app.app, timeout=timeout)
    sha = hashlib.sha256(data).hexdigest()
    tid = _new(app, Transfer("download", handle, params, len(data), sha, data=bytearray(data), view=view))
    return {"transfer": tid, "chunk_size": _chunk_size(app), "size": len(data), "sha256": sha, "object": view}


def op_download_chunk(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    tid, transfer = _get(app, args, "download")
    offset = s._int(args, "offset")
    if offset > transfer.size:
        raise InvalidParams(f"download {tid}: offset {offset} is past its {transfer.size} bytes",
                            data={"arg": "offset"})
    data = bytes(transfer.data[offset:offset + _chunk_size(app)])
    done = offset + len(data) >= transfer.size
    if done:
        del _transfers(app)[tid]
    return {"data": data, "offset": offset, "done": done}


def op_cancel(app: AppConnection, args: dict[str, Any]) -> dict[str, Any]:
    tid = s._int(args, "transfer", minimum=1)
    return {"cancelled": _transfers(app).pop(tid, None) is not None}


OPS = {
    "storage.upload.begin": op_upload_begin,
    "storage.upload.chunk": op_upload_chunk,
    "storage.upload.finish": op_upload_finish,
    "storage.download.begin": op_download_begin,
    "storage.download.chunk": op_download_chunk,
    "storage.cancel": op_cancel,
}
