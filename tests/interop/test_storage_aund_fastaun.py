"""Storage through aund, judged by the official SDK on the devnet: an app on client_stub uploads
through the daemon (inline and by upload session, streamed in chunks with progress) and fastaun
downloads it with its own facade; fastaun uploads and the app downloads that private object
through the daemon (which adds the access token on the data plane; the app never has it), with
Client and AsyncClient; a declared hash that does not match the bytes is refused before anything
reaches the gateway."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from client_stub import AsyncClient, Client, InvalidParams, ResourceAlreadyExistError, ResourceNotExistError
from tests.helpers import ROOT, AundProcess

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


def _wait_file(path, proc, seconds=90.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the fastaun driver ended before {path.name}: {out[-3000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds}s"
        time.sleep(0.05)


@pytest.fixture
def aund_daemon(devnet, tmp_path):
    aid = f"stor-{os.getpid() % 100000}.aid.test"
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\nidentities = ["{aid}"]\n')
    proc = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    proc.start()
    proc.aid = aid
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def test_storage_aund_to_fastaun_and_back(devnet, aund_daemon, tmp_path):
    aid = aund_daemon.aid
    work = tmp_path / "sdk"
    work.mkdir()
    fa_payload = os.urandom(333_333)  # fastaun's session upload
    (work / "fa_payload").write_bytes(fa_payload)
    env = dict(os.environ, AUN_GW_URL=devnet.gateway_url, AUN_ROOT_CA=devnet.root_ca, AUN_WORKDIR=str(work),
               PEER_AID=aid)
    fa = subprocess.Popen([sys.executable, str(ROOT / "tests/interop/fastaun_storage_driver.py"), "peer"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(aund_daemon.socket, app="storage-test", timeout=30) as client:
            client.ensure_identity(aid)
            session = client.session(aid)
            session.wait_ready(timeout=60)
            store = session.storage
            # inline: a small object, round trip as bytes
            small = b"through aund\n" * 20
            view = store.upload(small, "/notes/small.txt", content_type="text/plain")
            assert view["size_bytes"] == len(small) and view["sha256"] == hashlib.sha256(small).hexdigest()
            assert store.download("/notes/small.txt") == small
            with pytest.raises(ResourceAlreadyExistError):
                store.upload(b"other", "/notes/small.txt")
            # session upload from a file, in chunks, with progress
            big = os.urandom(700_000)
            src = tmp_path / "big.bin"
            src.write_bytes(big)
            seen: list[tuple[int, int]] = []
            view = store.upload(src, "/share/big.bin", progress=lambda done, total: seen.append((done, total)))
            assert view["sha256"] == hashlib.sha256(big).hexdigest() and view["size_bytes"] == len(big)
            assert len(seen) >= 4 and seen[-1] == (len(big), len(big))
            assert [d for d, _ in seen] == sorted(d for d, _ in seen)
            # list / stat / mkdir
            store.mkdir("/empty")
            names = sorted(n["name"] for n in store.list("/")["nodes"])
            assert names == ["empty", "notes", "share"], names
            assert store.stat("/share/big.bin")["size_bytes"] == len(big)
            # a declared hash that does not match is refused by the daemon
            sid = session.info["session"]
            begin = client.request("storage.upload.begin", {"session": sid, "path": "bad.bin", "size": 3,
                                                            "sha256": hashlib.sha256(b"abd").hexdigest()})
            client.request("storage.upload.chunk", {"transfer": begin["transfer"], "offset": 0, "data": b"abc"})
            with pytest.raises(InvalidParams, match="sha256"):
                client.request("storage.upload.finish", {"transfer": begin["transfer"]})
            with pytest.raises(ResourceNotExistError):
                store.stat("/bad.bin")
            # fastaun downloads aund's object (aund grants it r on the private object)
            _wait_file(work / "fa.json", fa)
            fa_aid = json.loads((work / "fa.json").read_text())["aid"]
            store.set_acl("/share", fa_aid, "r")
            assert {"grantee_aid": fa_aid, "perms": "r"} in store.list_acl("/share")["items"]
            (work / "aund_up.json").write_text(json.dumps({"path": "/share/big.bin", "sha256": view["sha256"],
                                                           "size": len(big)}))
            # fastaun's private object, downloaded through aund to a file
            _wait_file(work / "fa_up.json", fa)
            up = json.loads((work / "fa_up.json").read_text())
            got = store.download(up["path"], tmp_path / "from_fa.bin", owner=up["owner"])
            assert (tmp_path / "from_fa.bin").read_bytes() == fa_payload
            assert got["sha256"] == up["sha256"] == hashlib.sha256(fa_payload).hexdigest()
            with pytest.raises(ResourceAlreadyExistError):
                store.download(up["path"], tmp_path / "from_fa.bin", owner=up["owner"])

        async def twin():
            async with AsyncClient(aund_daemon.socket, app="storage-async") as aclient:
                asession = aclient.session(aid)
                await asession.wait_ready(timeout=30)
                data = await asession.storage.download(up["path"], owner=up["owner"])
                await asession.storage.upload(b"async", "/async.txt")
                return data, await asession.storage.download("/async.txt")
        data, echo = asyncio.run(twin())
        assert data == fa_payload and echo == b"async"
        (work / "done").touch()
        out, err = fa.communicate(timeout=90)
    finally:
        if fa.poll() is None:
            fa.kill()
            fa.communicate()
    checks = [json.loads(x) for x in out.splitlines() if x.startswith("{") and "check" in x]
    failed = [c for c in checks if not c["ok"]]
    assert fa.returncode == 0 and not failed and checks, f"fastaun: {failed or checks}\n{err[-3000:]}"
    assert any(c["check"] == "fastaun downloads aund's object" for c in checks)
