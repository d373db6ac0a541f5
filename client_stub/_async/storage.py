"""``session.storage``, written once (layer: client_stub): ``AsyncStorage`` in
``client_stub/_async/storage.py`` is the source, ``Storage`` in ``client_stub/_sync/storage.py`` is
generated from it by ``scripts/unasync.py`` (edit the source, never the generated copy). What the
operations do is in ``client_stub.storage``'s docstring.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from client_stub._core import _call_args
from client_stub.errors import GatewayError, InvalidParams, ResourceAlreadyExistError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Progress = Callable[[int, int], Any] | None

CHUNK_WAIT = 60.0  # seconds for one chunk's reply (the daemon answers chunks from memory)
GATEWAY_WAIT = 150.0  # begin/finish talk to the gateway and its data plane (timeout + margin if given)
READ_SIZE = 1 << 20


def _key(path: str) -> str:
    return "/".join(p for p in str(path).replace("\\", "/").split("/") if p)


def _where(args: dict[str, Any], owner: str | None, bucket: str | None) -> dict[str, Any]:
    if owner:
        args["owner"] = owner
    if bucket:
        args["bucket"] = bucket
    return args


def _wait(timeout: float | None) -> float:
    return GATEWAY_WAIT if timeout is None else timeout + 5.0


async def _cancel(conn: Any, tid: int | None) -> None:
    if tid is not None:
        try:
            await conn.request("storage.cancel", {"transfer": tid}, CHUNK_WAIT)
        except Exception:  # noqa: BLE001, S110 (best effort: the daemon drops it with the connection anyway)
            pass


class AsyncStorage:
    """The AID's AUN Storage: ``Session.storage`` is a ``Storage`` (blocking),
    ``AsyncSession.storage`` an ``AsyncStorage`` (the same methods, as coroutines)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    async def _gateway(self, method: str, params: dict[str, Any], timeout: float | None = None) -> Any:
        conn, sid = await self._session._open()
        args, wait = _call_args(sid, method, {k: v for k, v in params.items() if v is not None}, timeout, False)
        return await conn.request("call", args, wait)

    async def _call(self, method: str, params: dict[str, Any], owner: str | None, bucket: str | None,
                    timeout: float | None = None) -> Any:
        params = dict(params, bucket=bucket or "default")
        if owner:
            params["owner_aid"] = owner
        return await self._gateway(method, params, timeout)

    async def upload(self, source: Any, path: str, *, content_type: str | None = None, public: bool = False,
                     overwrite: bool = False, owner: str | None = None, bucket: str | None = None,
                     metadata: dict[str, Any] | None = None, progress: Progress = None,
                     timeout: float | None = None) -> Any:
        """Store ``source`` (bytes, or a local file's path) at ``path``; the object view
        ``{object_key, size_bytes, sha256, version, ...}``. ``progress(sent, total)`` after each chunk."""
        conn, sid = await self._session._open()
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, handle = memoryview(source).cast("B"), None
            size, sha = len(data), hashlib.sha256(data).hexdigest()
        elif isinstance(source, (str, os.PathLike)):
            data, handle = None, open(source, "rb")  # noqa: SIM115 (closed below, across the awaits)
            digest, size = hashlib.sha256(), 0
            for block in iter(lambda: handle.read(READ_SIZE), b""):
                digest.update(block)
                size += len(block)
            sha = digest.hexdigest()
            handle.seek(0)
        else:
            raise InvalidParams("upload takes bytes or a local file path", data={"arg": "source"})
        tid = None
        try:
            args = _where({"session": sid, "path": path, "size": size, "sha256": sha, "public": public,
                           "overwrite": overwrite}, owner, bucket)
            if content_type:
                args["content_type"] = content_type
            if metadata is not None:
                args["metadata"] = dict(metadata)
            begin = await conn.request("storage.upload.begin", args, CHUNK_WAIT)
            tid, chunk = begin["transfer"], begin["chunk_size"]
            if progress:
                progress(0, size)
            offset = 0
            while offset < size:
                piece = bytes(data[offset:offset + chunk]) if data is not None else handle.read(chunk)
                if not piece:
                    raise InvalidParams(f"{source} got shorter while it was uploaded", data={"arg": "source"})
                got = await conn.request("storage.upload.chunk", {"transfer": tid, "offset": offset, "data": piece},
                                         CHUNK_WAIT)
                offset = got["received"]
                if progress:
                    progress(offset, size)
            finish = {"transfer": tid} if timeout is None else {"transfer": tid, "timeout": timeout}
            tid = None  # the finish consumes the transfer, whatever its outcome
            return await conn.request("storage.upload.finish", finish, _wait(timeout))
        except BaseException:
            await _cancel(conn, tid)
            raise
        finally:
            if handle is not None:
                handle.close()

    async def download(self, path: str, dest: str | os.PathLike[str] | None = None, *, owner: str | None = None,
                       bucket: str | None = None, overwrite: bool = False, progress: Progress = None,
                       timeout: float | None = None) -> Any:
        """The object at ``path`` (of ``owner``, default this AID): its bytes, or with ``dest`` a
        local file written whole or not at all, ``{path, local_path, size, sha256, object}``."""
        conn, sid = await self._session._open()
        target = Path(dest) if dest is not None else None
        if target is not None and target.exists() and not overwrite:
            raise ResourceAlreadyExistError(f"{target} exists (pass overwrite=True)", data={"path": str(target)})
        args = _where({"session": sid, "path": path}, owner, bucket)
        if timeout is not None:
            args["timeout"] = timeout
        begin = await conn.request("storage.download.begin", args, _wait(timeout))
        tid, size, want = begin["transfer"], begin["size"], begin["sha256"]
        tmp = target.with_name(f".{target.name}.aund-{os.getpid()}.part") if target is not None else None
        out = open(tmp, "wb") if tmp is not None else None  # noqa: SIM115 (closed below)
        parts: list[bytes] = []
        digest, offset = hashlib.sha256(), 0
        try:
            if progress:
                progress(0, size)
            done = size == 0
            while not done:
                got = await conn.request("storage.download.chunk", {"transfer": tid, "offset": offset}, CHUNK_WAIT)
                piece, done = got["data"], got["done"]
                digest.update(piece)
                out.write(piece) if out is not None else parts.append(piece)
                offset += len(piece)
                if progress:
                    progress(offset, size)
            if size == 0:
                await _cancel(conn, tid)
            tid = None
            if offset != size or digest.hexdigest() != want:
                raise GatewayError(f"storage: {path} arrived with {offset} bytes and another sha256 than announced",
                                   retryable=True, data={"path": path})
            if out is None:
                return b"".join(parts)
            out.close()
            os.replace(tmp, target)
            tmp = None
            return {"path": "/" + _key(path), "local_path": str(target), "size": size, "sha256": want,
                    "object": begin.get("object", {})}
        except BaseException:
            await _cancel(conn, tid)
            raise
        finally:
            if out is not None and not out.closed:
                out.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()

    async def list(self, path: str = "/", *, owner: str | None = None, bucket: str | None = None, page: int = 1,
                   size: int = 100) -> Any:
        """``storage.fs.list``: ``{nodes: [{type, path, name, size, ...}], ...}``."""
        return await self._call("storage.fs.list", {"path": _key(path), "page": page, "size": size}, owner, bucket)

    async def stat(self, path: str, *, owner: str | None = None, bucket: str | None = None) -> Any:
        return await self._call("storage.fs.stat", {"path": _key(path)}, owner, bucket)

    async def mkdir(self, path: str, *, parents: bool = False, owner: str | None = None,
                    bucket: str | None = None) -> Any:
        return await self._call("storage.fs.mkdir", {"path": _key(path), "parents": parents}, owner, bucket)

    async def remove(self, path: str, *, recursive: bool = False, owner: str | None = None,
                     bucket: str | None = None) -> Any:
        return await self._call("storage.fs.remove", {"path": _key(path), "recursive": recursive}, owner, bucket)

    async def set_acl(self, path: str, grantee: str, perms: str = "r", *, bucket: str | None = None) -> Any:
        """Grant ``grantee`` ``perms`` (``r``, ``w``, ``rw``, ``rwx``) on ``path`` and below."""
        return await self._call("storage.set_acl", {"path": _key(path), "grantee_aid": grantee, "perms": perms},
                                None, bucket)

    async def remove_acl(self, path: str, grantee: str, *, bucket: str | None = None) -> Any:
        return await self._call("storage.remove_acl", {"path": _key(path), "grantee_aid": grantee}, None, bucket)

    async def list_acl(self, path: str, *, bucket: str | None = None) -> Any:
        return await self._call("storage.list_acl", {"path": _key(path)}, None, bucket)

    async def share(self, path: str, *, allowed_aids: list[str] | None = None, expire_in_seconds: int | None = None,
                    max_uses: int | None = None, bucket: str | None = None) -> Any:
        """A share link of the object: ``{share_id, ...}``; another AID reads it with ``get_shared``."""
        return await self._call("storage.create_share_link", {"object_key": _key(path), "allowed_aids": allowed_aids,
                                                              "expire_in_seconds": expire_in_seconds,
                                                              "max_uses": max_uses}, None, bucket)

    async def revoke_share(self, share_id: str) -> Any:
        return await self._gateway("storage.revoke_share_link", {"share_id": share_id})

    async def get_shared(self, share_id: str) -> Any:
        """``storage.get_by_share``: the object view, with ``content`` (base64) for a small object."""
        return await self._gateway("storage.get_by_share", {"share_id": share_id})
