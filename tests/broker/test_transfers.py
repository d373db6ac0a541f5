"""Storage transfers through the broker (the real socket, dispatch and stub; the FakeBackend holds
the objects): chunks bounded by the negotiated frame, in order, with progress; the declared hash
checked before the backend sees anything; per-connection limits and cancel; Client and
AsyncClient share one implementation and behave alike."""
from __future__ import annotations

import hashlib
import os

import pytest
import trio

from aund.aun import storage as aun_storage
from aund.broker import Policy, transfers
from client_stub import AsyncClient, Client, InvalidParams, ResourceAlreadyExistError, wire
from tests.broker.conftest import in_asyncio, in_thread
from tests.broker.rawclient import RawConn

pytestmark = pytest.mark.timeout(60)
ALICE = "alice.aid.test"


async def test_upload_download_blocking_and_async(start_broker, tmp_path):
    b = await start_broker()
    data = os.urandom(transfers.TRANSFER_CHUNK * 3 + 17)

    def app() -> dict:
        out: dict = {"progress": []}
        with Client(b.path, app="stor") as aund:
            st = aund.session(ALICE).storage
            out["view"] = st.upload(data, "/a/b.bin", progress=lambda d, t: out["progress"].append((d, t)))
            out["bytes"] = st.download("a/b.bin")
            out["file"] = st.download("/a/b.bin", tmp_path / "out.bin")
            with pytest.raises(ResourceAlreadyExistError):
                st.download("/a/b.bin", tmp_path / "out.bin")
            src = tmp_path / "src.txt"
            src.write_bytes(b"from a file")
            st.upload(src, "/f.txt")
            with pytest.raises(InvalidParams):
                st.upload(12, "/x")
        return out

    with trio.fail_after(30):
        out = await in_thread(app)
    assert out["view"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert b.backend.objects[(ALICE, "a/b.bin")] == data and b.backend.objects[(ALICE, "f.txt")] == b"from a file"
    assert out["progress"] == [(0, len(data))] + [(min(len(data), (i + 1) * transfers.TRANSFER_CHUNK), len(data))
                                                   for i in range(4)]
    assert out["bytes"] == data and (tmp_path / "out.bin").read_bytes() == data
    assert out["file"]["size"] == len(data) and out["file"]["path"] == "/a/b.bin"
    assert not list(tmp_path.glob(".out.bin*"))  # no partial file left

    async def twin() -> tuple:
        async with AsyncClient(b.path, app="stor-async") as aund:
            st = aund.session(ALICE).storage
            await st.upload(b"async bytes", "/async.txt")
            return await st.download("/async.txt"), await st.download("/a/b.bin")

    with trio.fail_after(30):
        small, big = await in_asyncio(twin)
    assert small == b"async bytes" and big == data
    assert not any(s.transfers for s in b.server.apps.values() if hasattr(s, "transfers"))


async def test_chunks_fit_the_frame_order_hash_limits_cancel(start_broker):
    b = await start_broker()
    with trio.fail_after(20):
        raw = await RawConn.open(b.path)
        await raw.hello("small-frames", max_frame=8192)
        sid = (await raw.request(1, "session.open", {"aid": ALICE}))["result"]["session"]

        async def begin(rid: int, data: bytes, path: str = "x.bin", sha: str | None = None) -> int:
            rep = await raw.request(rid, "storage.upload.begin", {
                "session": sid, "path": path, "size": len(data), "sha256": sha or hashlib.sha256(data).hexdigest()})
            assert rep["result"]["chunk_size"] == 8192 - transfers.FRAME_SLACK
            return rep["result"]["transfer"]

        # a chunk out of order drops the upload
        tid = await begin(2, b"abcdef")
        bad = await raw.request(3, "storage.upload.chunk", {"transfer": tid, "offset": 3, "data": b"def"})
        assert bad["error"]["type"] == "InvalidParams" and bad["error"]["data"]["arg"] == "offset"
        gone = await raw.request(4, "storage.upload.chunk", {"transfer": tid, "offset": 0, "data": b"abc"})
        assert gone["error"]["type"] == "ResourceNotExistError"
        # a chunk larger than chunk_size is refused
        tid = await begin(5, b"y" * 9000)
        big = await raw.request(6, "storage.upload.chunk", {"transfer": tid, "offset": 0, "data": b"y" * 7200})
        assert big["error"]["type"] == "InvalidParams"
        await raw.request(7, "storage.cancel", {"transfer": tid})
        # the declared hash must match: nothing reaches the backend otherwise
        tid = await begin(8, b"abc", sha=hashlib.sha256(b"abd").hexdigest())
        await raw.request(9, "storage.upload.chunk", {"transfer": tid, "offset": 0, "data": b"abc"})
        fin = await raw.request(10, "storage.upload.finish", {"transfer": tid})
        assert fin["error"]["type"] == "InvalidParams" and fin["error"]["data"]["arg"] == "sha256"
        assert b.backend.objects == {}
        # at most TRANSFERS_PER_APP at once; cancel frees one
        tids = [await begin(20 + i, b"z") for i in range(transfers.TRANSFERS_PER_APP)]
        over = await raw.request(30, "storage.upload.begin", {"session": sid, "path": "q", "size": 1,
                                                              "sha256": hashlib.sha256(b"z").hexdigest()})
        assert over["error"]["type"] == "LimitsExceeded"
        assert (await raw.request(31, "storage.cancel", {"transfer": tids[0]}))["result"] == {"cancelled": True}
        assert (await raw.request(32, "storage.cancel", {"transfer": tids[0]}))["result"] == {"cancelled": False}
        await begin(33, b"z")
        # a bad path, a bad hash, a size above the limit
        for rid, args in enumerate([{"path": "/", "size": 1, "sha256": "0" * 64},
                                    {"path": "p", "size": 1, "sha256": "xyz"},
                                    {"path": "p", "size": aun_storage.MAX_OBJECT_BYTES + 1, "sha256": "0" * 64}], 40):
            rep = await raw.request(rid, "storage.upload.begin", dict(args, session=sid))
            assert rep["error"]["type"] == "InvalidParams", rep
        # download chunks are bounded by the frame too
        b.backend.objects[(ALICE, "big")] = os.urandom(20000)
        rep = (await raw.request(50, "storage.download.begin", {"session": sid, "path": "big"}))
        assert rep["error"]["type"] == "LimitsExceeded"  # still 4 uploads open
        for i, t in enumerate(tids[1:]):
            await raw.request(51 + i, "storage.cancel", {"transfer": t})
        rep = (await raw.request(60, "storage.download.begin", {"session": sid, "path": "big"}))["result"]
        got, offset, rid = b"", 0, 61
        while True:
            chunk = (await raw.request(rid, "storage.download.chunk", {"transfer": rep["transfer"], "offset": offset}))
            assert len(chunk["result"]["data"]) <= rep["chunk_size"]
            got += chunk["result"]["data"]
            offset, rid = len(got), rid + 1
            if chunk["result"]["done"]:
                break
        assert got == b.backend.objects[(ALICE, "big")] and rep["sha256"] == hashlib.sha256(got).hexdigest()
        await raw.aclose()


async def test_a_policy_reload_drops_a_running_transfer(start_broker):
    uid = os.getuid()
    b = await start_broker(policy=Policy({ALICE: {"uids": [uid]}}, owners={4242}))
    with trio.fail_after(20):
        raw = await RawConn.open(b.path)
        await raw.hello("reload")
        sid = (await raw.request(1, "session.open", {"aid": ALICE}))["result"]["session"]
        tid = (await raw.request(2, "storage.upload.begin", {"session": sid, "path": "p", "size": 2,
                                                             "sha256": hashlib.sha256(b"ab").hexdigest()}))["result"]
        await raw.request(3, "storage.upload.chunk", {"transfer": tid["transfer"], "offset": 0, "data": b"a"})
        b.backend.policy = Policy(owners={4242})
        denied = await raw.request(4, "storage.upload.chunk", {"transfer": tid["transfer"], "offset": 1, "data": b"b"})
        assert denied["error"]["type"] == "PermissionDenied"
        b.backend.policy = Policy({ALICE: {"uids": [uid]}}, owners={4242})
        gone = await raw.request(5, "storage.upload.finish", {"transfer": tid["transfer"]})
        assert gone["error"]["type"] == "ResourceNotExistError" and b.backend.objects == {}
        await raw.aclose()


def test_the_token_goes_only_to_the_gateway_host():
    gw = "wss://gw.example:8443/aun"
    assert aun_storage._auth_headers("https://gw.example:8443/storage/v1/object/a", gw, "tok") == \
        [("Authorization", "Bearer tok")]
    for other in ("https://gw.example:9443/x", "http://gw.example:8443/x", "https://oss.example/x",
                  "https://gw.example.evil:8443/x"):
        assert aun_storage._auth_headers(other, gw, "tok") == []
    assert aun_storage._auth_headers("https://gw.example:8443/x", gw, "") == []
    assert wire.DEFAULT_MAX_FRAME >= transfers.TRANSFER_CHUNK + transfers.FRAME_SLACK
