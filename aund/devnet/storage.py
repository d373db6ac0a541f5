"""devnet: the Storage service (`storage.*`), objects on disk, and its HTTP data plane.

Enough of AUN Storage (protocol doc 11) for the SDK's storage facade and for aund's storage ops:
inline objects (`put_object` / `get_object`, at most INLINE_MAX_BYTES), upload sessions (a
presigned PUT URL, then `complete_upload`, which checks size and SHA-256), download tickets (a
presigned GET URL), head / delete / list, the `fs.*` layer (list, stat, mkdir, remove), ACL
grants (`set_acl` / `remove_acl` / `list_acl`: a grantee with `r` may read a private object)
and share links (`create_share_link` / `get_by_share` / `list_share_links` / `revoke_share_link`).

Layout under `<state dir>/storage/`: `blobs/<sha256>` (content addressed), `uploads/<session>`
(a session's body until it completes) and `index.json` (objects, folders, ACL, shares), rewritten
atomically after each change, so objects survive a devnet restart.

Data plane on the devnet's HTTP port: `PUT /storage/v1/upload/<session>` and
`GET /storage/v1/object/<owner>/<bucket>/<key>` (by ticket) and `GET /storage/v1/shared/<share>`
(by share link), each with `exp` (Unix seconds) and `sig`
(HMAC-SHA256 over method, path and exp with a key kept in the state dir). A private object's GET
also needs `Authorization: Bearer <access token>` of the owner or of an AID the owner granted
`r`, as production asks for it: that token is why apps never download private objects themselves
through aund. A download by share link is authorised by the share and needs no token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from aund.aun import jsonrpc as rpc
from aund.devnet import gateway as gw
from aund.devnet.gateway import RpcError, validate_aid

if TYPE_CHECKING:
    from aund.devnet.gateway import Conn, Devnet

INLINE_MAX_BYTES = 64 * 1024
MAX_OBJECT_BYTES = 10 * 1024 * 1024
URL_TTL = 3600
LIST_MAX = 200
VERSION_CONFLICT = -32009
_KEY_RE = re.compile(r"[A-Za-z0-9._\-/]+")
_PERMS = {"r", "w", "rw", "rwx"}


class Storage:
    """The storage state of one devnet (made on first use, kept on the Devnet object)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "uploads").mkdir(exist_ok=True)
        key_file = root / "url.key"
        if not key_file.exists():
            key_file.write_bytes(secrets.token_bytes(32))
            key_file.chmod(0o600)
        self.url_key = key_file.read_bytes()
        index = root / "index.json"
        state = json.loads(index.read_text()) if index.exists() else {}
        # "owner|bucket|key" -> object meta; "owner|bucket|path" -> folder; owner|bucket|path -> {grantee: perms}
        self.objects: dict[str, dict[str, Any]] = state.get("objects", {})
        self.folders: dict[str, dict[str, Any]] = state.get("folders", {})
        self.acl: dict[str, dict[str, str]] = state.get("acl", {})
        self.shares: dict[str, dict[str, Any]] = state.get("shares", {})
        self.sessions: dict[str, dict[str, Any]] = {}  # upload session id -> its target (memory only)

    def save(self) -> None:
        tmp = self.root / "index.json.tmp"
        tmp.write_text(json.dumps({"objects": self.objects, "folders": self.folders, "acl": self.acl,
                                   "shares": self.shares}))
        os.replace(tmp, self.root / "index.json")

    def blob(self, sha: str) -> Path:
        return self.root / "blobs" / sha

    def sign(self, method: str, path: str, exp: int) -> str:
        return hmac.new(self.url_key, f"{method}\n{path}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def url(self, net: Devnet, method: str, path: str) -> tuple[str, int]:
        exp = int(time.time()) + URL_TTL
        base = net.public_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).removesuffix("/aun")
        return f"{base}{path}?exp={exp}&sig={self.sign(method, path, exp)}", exp


def _storage(net: Devnet) -> Storage:
    st = net.services.get("storage")
    if st is None:
        st = net.services["storage"] = Storage(net.store.path.parent / "storage")
    return st


def _key(params: dict[str, Any], name: str = "object_key", *, allow_root: bool = False) -> str:
    raw = params.get(name)
    if raw is None and name == "object_key":
        raw = params.get("path")
    if raw is None and allow_root:
        raw = ""
    if not isinstance(raw, str):
        raise RpcError(rpc.INVALID_PARAMS, f"missing param: {name}")
    key = raw.strip("/")
    if not key and allow_root:
        return ""
    if not key or len(key.encode()) > 1024 or not _KEY_RE.fullmatch(key) or "//" in key \
            or any(part in (".", "..") for part in key.split("/")):
        raise RpcError(rpc.INVALID_PARAMS, f"invalid object key {raw!r}: letters, digits, . _ - and single / "
                                           "only, no . or .. segment, at most 1024 bytes")
    return key


def _where(conn: Conn, params: dict[str, Any]) -> tuple[str, str]:
    owner = validate_aid(params.get("owner_aid") or conn.aid)
    bucket = gw.str_param(params, "bucket", required=False, default="default") or "default"
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", bucket):
        raise RpcError(rpc.INVALID_PARAMS, f"invalid bucket {bucket!r}")
    return owner, bucket


def _id(owner: str, bucket: str, key: str) -> str:
    return f"{owner}|{bucket}|{key}"


def _may(st: Storage, reader: str, owner: str, bucket: str, key: str, perm: str) -> bool:
    """The owner may do anything; others by the nearest ACL grant on the key or an ancestor folder."""
    if reader == owner:
        return True
    parts = key.split("/")
    for n in range(len(parts), -1, -1):
        grants = st.acl.get(_id(owner, bucket, "/".join(parts[:n])))
        if grants and reader in grants:
            return perm in grants[reader]
    return False


def _owner_only(conn: Conn, owner: str) -> None:
    if conn.aid != owner:
        raise RpcError(rpc.PERMISSION_DENIED, "only the owner may do this")


def _view(owner: str, bucket: str, key: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"owner_aid": owner, "bucket": bucket, "object_key": key, "path": "/" + key, "type": "file",
            "name": key.rsplit("/", 1)[-1], "size_bytes": meta["size_bytes"], "size": meta["size_bytes"],
            "content_type": meta["content_type"], "sha256": meta["sha256"], "version": meta["version"],
            "etag": meta["sha256"][:32], "is_private": meta["is_private"], "metadata": meta.get("metadata", {}),
            "created_at": meta["created_at"], "updated_at": meta["updated_at"],
            "mtime": meta["updated_at"] // 1000}


def _readable(conn: Conn, params: dict[str, Any]) -> tuple[Storage, str, str, str, dict[str, Any]]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    key = _key(params)
    meta = st.objects.get(_id(owner, bucket, key))
    if meta is None:
        raise RpcError(rpc.NOT_FOUND, f"object not found: {key}")
    if meta["is_private"] and not _may(st, conn.aid, owner, bucket, key, "r"):
        raise RpcError(rpc.PERMISSION_DENIED, f"{key} is private")
    return st, owner, bucket, key, meta


def _check_version(meta: dict[str, Any] | None, params: dict[str, Any], key: str) -> None:
    expected = params.get("expected_version")
    if expected is None:
        if meta is not None and params.get("overwrite") is False:
            raise RpcError(VERSION_CONFLICT, f"object already exists: {key}")
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise RpcError(rpc.INVALID_PARAMS, "expected_version must be a non-negative integer")
    if (meta["version"] if meta else 0) != expected:
        raise RpcError(VERSION_CONFLICT, f"version conflict on {key}: expected {expected}, "
                                         f"current {meta['version'] if meta else 0}")


def _publish(conn: Conn, owner: str, bucket: str, key: str, data_file: Path | bytes, params: dict[str, Any],
             sha: str, size: int) -> dict[str, Any]:
    st = _storage(conn.net)
    oid = _id(owner, bucket, key)
    old = st.objects.get(oid)
    _check_version(old, params, key)
    target = st.blob(sha)
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        if isinstance(data_file, bytes):
            tmp.write_bytes(data_file)
        else:
            os.replace(data_file, tmp)
        os.replace(tmp, target)
    elif isinstance(data_file, Path):
        data_file.unlink(missing_ok=True)
    now = int(time.time() * 1000)
    meta = {"size_bytes": size, "sha256": sha, "version": (old["version"] if old else 0) + 1,
            "content_type": gw.str_param(params, "content_type", required=False) or "application/octet-stream",
            "is_private": params.get("is_private") is not False, "created_at": old["created_at"] if old else now,
            "updated_at": now, "metadata": params.get("metadata") if isinstance(params.get("metadata"), dict) else {}}
    st.objects[oid] = meta
    st.save()
    _changed(conn, owner, bucket, key, "put")
    return _view(owner, bucket, key, meta)


def _changed(conn: Conn, owner: str, bucket: str, key: str, action: str) -> None:
    event = rpc.notification("event/storage.object_changed", {"module_id": "storage", "action": action,
                                                              "owner_aid": owner, "bucket": bucket,
                                                              "object_key": key})
    for other in conn.net.live(owner):
        other.push(event)


# --- control plane ----------------------------------------------------------------------------
def rpc_check_upload(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    key = _key(params)
    size = gw.int_param(params, "size_bytes", 0)
    meta = st.objects.get(_id(owner, bucket, key))
    return {"owner_aid": owner, "bucket": bucket, "object_key": key, "size_bytes": size,
            "within_limit": size <= MAX_OBJECT_BYTES, "max_file_size_bytes": MAX_OBJECT_BYTES,
            "inline": size <= INLINE_MAX_BYTES, "inline_max_bytes": INLINE_MAX_BYTES,
            "target_exists": meta is not None, "target": _view(owner, bucket, key, meta) if meta else None,
            "dedup_hit": False}


def rpc_put_object(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    owner, bucket = _where(conn, params)
    _owner_only(conn, owner)
    key = _key(params)
    try:
        data = base64.b64decode(gw.str_param(params, "content"), validate=True)
    except ValueError:
        raise RpcError(rpc.INVALID_PARAMS, "content must be base64") from None
    if len(data) > INLINE_MAX_BYTES:
        raise RpcError(rpc.INVALID_PARAMS, f"inline content is at most {INLINE_MAX_BYTES} bytes; "
                                           "use create_upload_session")
    return _publish(conn, owner, bucket, key, data, params, hashlib.sha256(data).hexdigest(), len(data))


def rpc_get_object(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket, key, meta = _readable(conn, params)
    if meta["size_bytes"] > INLINE_MAX_BYTES:
        raise RpcError(rpc.INVALID_PARAMS, f"{key} exceeds the inline limit ({INLINE_MAX_BYTES} bytes): "
                                           "use storage.create_download_ticket")
    data = st.blob(meta["sha256"]).read_bytes()
    offset, limit = gw.int_param(params, "offset", 0), params.get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool):
        data = data[offset:offset + max(0, limit)]
    elif offset:
        data = data[offset:]
    return dict(_view(owner, bucket, key, meta), content=base64.b64encode(data).decode())


def rpc_head_object(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    _, owner, bucket, key, meta = _readable(conn, params)
    return _view(owner, bucket, key, meta)


def rpc_delete_object(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    key = _key(params)
    if not _may(st, conn.aid, owner, bucket, key, "w"):
        raise RpcError(rpc.PERMISSION_DENIED, "only the owner or a grantee with w may delete")
    meta = st.objects.get(_id(owner, bucket, key))
    if params.get("expected_version") is not None:
        _check_version(meta, params, key)
    if meta is None:
        return {"deleted": False, "owner_aid": owner, "object_key": key}
    del st.objects[_id(owner, bucket, key)]
    st.save()
    _changed(conn, owner, bucket, key, "delete")
    return {"deleted": True, "owner_aid": owner, "object_key": key}


def _children(st: Storage, owner: str, bucket: str, prefix: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Objects directly under `prefix` (a key without trailing /, "" for the root) and its sub folders."""
    head = f"{owner}|{bucket}|"
    lead = prefix + "/" if prefix else ""
    files, dirs = [], set()
    for oid, meta in st.objects.items():
        if not oid.startswith(head + lead):
            continue
        rest = oid[len(head + lead):]
        if "/" in rest:
            dirs.add(lead + rest.split("/", 1)[0])
        else:
            files.append(_view(owner, bucket, lead + rest, meta))
    for fid in st.folders:
        if fid.startswith(head + lead) and fid != head + prefix:
            dirs.add(lead + fid[len(head + lead):].split("/", 1)[0])
    return sorted(files, key=lambda v: v["object_key"]), sorted(dirs)


def _dir_view(owner: str, bucket: str, key: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    now = (meta or {}).get("created_at", 0)
    return {"type": "dir", "owner_aid": owner, "bucket": bucket, "path": "/" + key, "name": key.rsplit("/", 1)[-1],
            "mtime": now // 1000, "updated_at": now}


def _is_dir(st: Storage, owner: str, bucket: str, key: str) -> bool:
    if not key or _id(owner, bucket, key) in st.folders:
        return True
    head = _id(owner, bucket, key) + "/"
    return any(oid.startswith(head) for oid in st.objects) or any(f.startswith(head) for f in st.folders)


def _owner_lists(conn: Conn, params: dict[str, Any]) -> tuple[Storage, str, str]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    _owner_only(conn, owner)
    return st, owner, bucket


def rpc_list_objects(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    prefix = gw.str_param(params, "prefix", required=False)
    size, page = gw.int_param(params, "size", 50, lo=1, hi=LIST_MAX), gw.int_param(params, "page", 1, lo=1)
    head = f"{owner}|{bucket}|"
    items = sorted((_view(owner, bucket, oid[len(head):], m) for oid, m in st.objects.items()
                    if oid.startswith(head + prefix)), key=lambda v: v["object_key"])
    window = items[(page - 1) * size:page * size]
    return {"items": window, "total": len(items), "page": page, "size": size}


def rpc_list_prefixes(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    prefix = gw.str_param(params, "prefix", required=False).strip("/")
    _, dirs = _children(st, owner, bucket, prefix)
    size = gw.int_param(params, "size", 50, lo=1, hi=LIST_MAX)
    return {"prefixes": [d + "/" for d in dirs[:size]], "count": min(size, len(dirs)), "size": size}


def rpc_fs_list(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path", allow_root=True)
    if _id(owner, bucket, key) in st.objects:
        raise RpcError(rpc.INVALID_PARAMS, f"not a directory: /{key}")
    if not _is_dir(st, owner, bucket, key):
        raise RpcError(rpc.NOT_FOUND, f"no such directory: /{key}")
    files, dirs = _children(st, owner, bucket, key)
    nodes = [_dir_view(owner, bucket, d, st.folders.get(_id(owner, bucket, d))) for d in dirs] + files
    return {"nodes": nodes, "total": len(nodes)}


def rpc_fs_stat(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    key = _key(params, "path", allow_root=True)
    if key and _id(owner, bucket, key) in st.objects:
        return rpc_head_object(conn, dict(params, object_key=key))
    _owner_only(conn, owner)
    if _is_dir(st, owner, bucket, key):
        return _dir_view(owner, bucket, key, st.folders.get(_id(owner, bucket, key)))
    raise RpcError(rpc.NOT_FOUND, f"no such file or directory: /{key}")


def rpc_fs_mkdir(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path")
    parts = key.split("/")
    for n in range(1, len(parts) + 1):
        sub = "/".join(parts[:n])
        if _id(owner, bucket, sub) in st.objects:
            raise RpcError(rpc.INVALID_PARAMS, f"not a directory: /{sub}")
        if n < len(parts) and not _is_dir(st, owner, bucket, sub) and params.get("parents") is not True:
            raise RpcError(rpc.NOT_FOUND, f"parent directory not found: /{sub} (pass parents)")
    if _is_dir(st, owner, bucket, key) and params.get("parents") is not True:
        raise RpcError(rpc.INVALID_PARAMS, f"directory already exists: /{key}")
    now = int(time.time() * 1000)
    for n in range(1, len(parts) + 1):
        st.folders.setdefault(_id(owner, bucket, "/".join(parts[:n])), {"created_at": now})
    st.save()
    return {"node": _dir_view(owner, bucket, key, st.folders[_id(owner, bucket, key)])}


def rpc_fs_remove(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path")
    oid = _id(owner, bucket, key)
    if oid in st.objects:
        del st.objects[oid]
        st.save()
        _changed(conn, owner, bucket, key, "delete")
        return {"removed_count": 1, "path": "/" + key}
    if not _is_dir(st, owner, bucket, key):
        raise RpcError(rpc.NOT_FOUND, f"no such file or directory: /{key}")
    inside = [o for o in st.objects if o.startswith(oid + "/")]
    if inside and params.get("recursive") is not True:
        raise RpcError(rpc.INVALID_PARAMS, f"directory not empty: /{key} (pass recursive)")
    for o in inside:
        del st.objects[o]
        _changed(conn, owner, bucket, o.split("|", 2)[2], "delete")
    for f in [f for f in st.folders if f == oid or f.startswith(oid + "/")]:
        del st.folders[f]
    st.save()
    return {"removed_count": len(inside) + 1, "path": "/" + key}


def rpc_get_quota(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, _ = _owner_lists(conn, params)
    mine = [m for oid, m in st.objects.items() if oid.startswith(f"{owner}|")]
    return {"owner_aid": owner, "used_bytes": sum(m["size_bytes"] for m in mine), "object_count": len(mine),
            "quota_bytes": 1 << 30}


# --- data plane: sessions and tickets ---------------------------------------------------------
def rpc_create_upload_session(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    _owner_only(conn, owner)
    key = _key(params)
    _check_version(st.objects.get(_id(owner, bucket, key)), params, key)
    session_id = "us-" + secrets.token_hex(12)
    url, exp = st.url(conn.net, "PUT", f"/storage/v1/upload/{session_id}")
    st.sessions[session_id] = {"owner": owner, "bucket": bucket, "key": key, "exp": exp, "received": False}
    return {"session_id": session_id, "upload_url": url, "blob_key": session_id, "expire_at": exp, "headers": {},
            "owner_aid": owner, "bucket": bucket, "object_key": key,
            "content_type": gw.str_param(params, "content_type", required=False) or "application/octet-stream",
            "size_bytes": gw.int_param(params, "size_bytes", 0)}


def rpc_complete_upload(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    owner, bucket = _where(conn, params)
    _owner_only(conn, owner)
    key = _key(params)
    session_id = gw.str_param(params, "session_id", required=False)
    if not session_id:  # the SDK may complete without the id: the newest received session of the key
        session_id = next((sid for sid, s in reversed(st.sessions.items())
                           if (s["owner"], s["bucket"], s["key"]) == (owner, bucket, key) and s["received"]), "")
    session = st.sessions.get(session_id)
    if session is None or (session["owner"], session["bucket"], session["key"]) != (owner, bucket, key):
        raise RpcError(rpc.NOT_FOUND, f"no upload session for {key}")
    body = st.root / "uploads" / session_id
    if not session["received"] or not body.exists():
        raise RpcError(rpc.INVALID_PARAMS, f"nothing was uploaded to the session of {key}")
    size = body.stat().st_size
    digest = hashlib.sha256()
    with body.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    want_size, want_sha = params.get("size_bytes"), params.get("sha256")
    if isinstance(want_size, int) and want_size != size:
        raise RpcError(rpc.INVALID_PARAMS, f"size mismatch: uploaded {size} bytes, expected {want_size}")
    if isinstance(want_sha, str) and want_sha and want_sha.lower() != sha:
        raise RpcError(rpc.INVALID_PARAMS, f"sha256 mismatch: uploaded {sha}, expected {want_sha.lower()}")
    del st.sessions[session_id]
    return _publish(conn, owner, bucket, key, body, params, sha, size)


def _object_path(owner: str, bucket: str, key: str) -> str:
    return f"/storage/v1/object/{quote(owner)}/{quote(bucket)}/{quote(key)}"


def rpc_create_download_ticket(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket, key, meta = _readable(conn, params)
    url, exp = st.url(conn.net, "GET", _object_path(owner, bucket, key))
    return dict(_view(owner, bucket, key, meta), download_url=url, expire_at=exp, file_name=key.rsplit("/", 1)[-1],
                auth_required=meta["is_private"])


# --- ACL and share links ----------------------------------------------------------------------
def rpc_set_acl(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path", allow_root=True)
    grantee = validate_aid(params.get("grantee_aid"))
    perms = gw.str_param(params, "perms")
    if perms not in _PERMS:
        raise RpcError(rpc.INVALID_PARAMS, f"perms must be one of {sorted(_PERMS)}")
    st.acl.setdefault(_id(owner, bucket, key), {})[grantee] = perms
    st.save()
    return {"path": "/" + key, "grantee_aid": grantee, "perms": perms, "owner_aid": owner}


def rpc_remove_acl(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path", allow_root=True)
    grantee = validate_aid(params.get("grantee_aid"))
    removed = st.acl.get(_id(owner, bucket, key), {}).pop(grantee, None) is not None
    st.save()
    return {"path": "/" + key, "grantee_aid": grantee, "removed": removed}


def rpc_list_acl(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params, "path", allow_root=True)
    grants = st.acl.get(_id(owner, bucket, key), {})
    return {"path": "/" + key, "items": [{"grantee_aid": g, "perms": p} for g, p in sorted(grants.items())]}


def rpc_create_share_link(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = _key(params)
    if _id(owner, bucket, key) not in st.objects:
        raise RpcError(rpc.NOT_FOUND, f"object not found: {key}")
    allowed = params.get("allowed_aids")
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed)):
        raise RpcError(rpc.INVALID_PARAMS, "allowed_aids must be a list of AIDs")
    ttl = gw.int_param(params, "expire_in_seconds", 0)
    share_id = "sh-" + secrets.token_hex(12)
    share = {"share_id": share_id, "owner_aid": owner, "bucket": bucket, "object_key": key,
             "allowed_aids": [validate_aid(a) for a in allowed or []], "uses": 0,
             "max_uses": gw.int_param(params, "max_uses", 0), "expire_at": int(time.time()) + ttl if ttl else 0,
             "created_at": int(time.time() * 1000)}
    st.shares[share_id] = share
    st.save()
    return dict(share)


def rpc_list_share_links(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st, owner, bucket = _owner_lists(conn, params)
    key = params.get("object_key")
    items = [dict(s) for s in st.shares.values() if s["owner_aid"] == owner and s["bucket"] == bucket
             and (key is None or s["object_key"] == str(key).strip("/"))]
    return {"items": items, "total": len(items)}


def rpc_revoke_share_link(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    share_id = gw.str_param(params, "share_id")
    share = st.shares.get(share_id)
    if share is None:
        raise RpcError(rpc.NOT_FOUND, f"no share link {share_id}")
    _owner_only(conn, share["owner_aid"])
    del st.shares[share_id]
    st.save()
    return {"share_id": share_id, "revoked": True}


def rpc_get_by_share(conn: Conn, params: dict[str, Any]) -> dict[str, Any]:
    st = _storage(conn.net)
    share_id = gw.str_param(params, "share_id")
    share = st.shares.get(share_id)
    if share is None:
        raise RpcError(rpc.NOT_FOUND, f"no share link {share_id}")
    if share["expire_at"] and time.time() > share["expire_at"]:
        raise RpcError(rpc.PERMISSION_DENIED, "the share link expired")
    if share["allowed_aids"] and conn.aid not in share["allowed_aids"] and conn.aid != share["owner_aid"]:
        raise RpcError(rpc.PERMISSION_DENIED, "this share link is for other AIDs")
    if share["max_uses"] and share["uses"] >= share["max_uses"]:
        raise RpcError(rpc.PERMISSION_DENIED, "the share link is used up")
    owner, bucket, key = share["owner_aid"], share["bucket"], share["object_key"]
    meta = st.objects.get(_id(owner, bucket, key))
    if meta is None:
        raise RpcError(rpc.NOT_FOUND, f"the shared object is gone: {key}")
    share["uses"] += 1
    st.save()
    view = dict(_view(owner, bucket, key, meta), share_id=share_id)
    if meta["size_bytes"] <= INLINE_MAX_BYTES:
        return dict(view, content=base64.b64encode(st.blob(meta["sha256"]).read_bytes()).decode())
    url, exp = st.url(conn.net, "GET", f"/storage/v1/shared/{share_id}")
    return dict(view, download_url=url, expire_at=exp)


# --- HTTP -------------------------------------------------------------------------------------
def _signed(st: Storage, method: str, path: str, query: dict[str, list[str]]) -> bool:
    try:
        exp = int((query.get("exp") or ["0"])[0])
    except ValueError:
        return False
    sig = (query.get("sig") or [""])[0]
    return exp >= time.time() and hmac.compare_digest(sig, st.sign(method, path, exp))


def http(net: Devnet, method: str, path: str, headers: dict[str, str], query: dict[str, list[str]],
         body: bytes) -> tuple[int, Any, dict[str, str]]:
    """The data plane: PUT an upload session's body, GET an object (by ticket or share)."""
    st = _storage(net)
    if not _signed(st, "PUT" if method == "PUT" else "GET", path, query):
        return 403, {"error": "missing, wrong or expired URL signature"}, {}
    if method == "PUT" and path.startswith("/storage/v1/upload/"):
        session = st.sessions.get(path.rsplit("/", 1)[-1])
        if session is None:
            return 404, {"error": "no such upload session"}, {}
        if len(body) > MAX_OBJECT_BYTES:
            return 413, {"error": f"an object is at most {MAX_OBJECT_BYTES} bytes"}, {}
        tmp = st.root / "uploads" / (path.rsplit("/", 1)[-1] + ".part")
        tmp.write_bytes(body)
        os.replace(tmp, st.root / "uploads" / path.rsplit("/", 1)[-1])
        session["received"] = True
        return 200, {"size_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}, {}
    share_id = path[len("/storage/v1/shared/"):] if path.startswith("/storage/v1/shared/") else ""
    if method in ("GET", "HEAD") and share_id:
        share = st.shares.get(share_id)
        if share is None:
            return 404, {"error": "no such share link"}, {}
        owner, bucket, key = share["owner_aid"], share["bucket"], share["object_key"]
    elif method in ("GET", "HEAD") and path.startswith("/storage/v1/object/"):
        parts = path[len("/storage/v1/object/"):].split("/", 2)
        if len(parts) != 3:
            return 404, {"error": "not found"}, {}
        owner, bucket, key = (unquote(p) for p in parts)
    else:
        return 404, {"error": "not found"}, {}
    meta = st.objects.get(_id(owner, bucket, key))
    if meta is None:
        return 404, {"error": f"object not found: {key}"}, {}
    if meta["is_private"] and not share_id:
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        reader = net.store.token_aid(token, "access") if token else None
        if reader is None:
            return 401, {"error": "a private object needs a bearer access token"}, {}
        if not _may(st, reader, owner, bucket, key, "r"):
            return 403, {"error": f"{reader} may not read {key}"}, {}
    return 200, st.blob(meta["sha256"]).read_bytes(), {"content-type": meta["content_type"],
                                                       "x-aun-sha256": meta["sha256"]}


gw.register({
    "storage.check_upload": rpc_check_upload, "storage.put_object": rpc_put_object,
    "storage.get_object": rpc_get_object, "storage.head_object": rpc_head_object,
    "storage.delete_object": rpc_delete_object, "storage.list_objects": rpc_list_objects,
    "storage.list_prefixes": rpc_list_prefixes, "storage.get_quota": rpc_get_quota,
    "storage.create_upload_session": rpc_create_upload_session, "storage.complete_upload": rpc_complete_upload,
    "storage.create_download_ticket": rpc_create_download_ticket,
    "storage.fs.list": rpc_fs_list, "storage.fs.stat": rpc_fs_stat, "storage.fs.mkdir": rpc_fs_mkdir,
    "storage.fs.remove": rpc_fs_remove,
    "storage.set_acl": rpc_set_acl, "storage.remove_acl": rpc_remove_acl, "storage.list_acl": rpc_list_acl,
    "storage.create_share_link": rpc_create_share_link, "storage.list_share_links": rpc_list_share_links,
    "storage.revoke_share_link": rpc_revoke_share_link, "storage.get_by_share": rpc_get_by_share,
}, __name__)
