"""The devnet's storage service over real loopback sockets: signed writes, object keys checked,
upload sessions whose size and hash the completion checks, presigned data-plane URLs (a wrong or
missing signature refused), private downloads only with the bearer token of the owner or a
grantee, share links, the change event, and objects on disk."""
from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest
import trio

from aund.aun import jsonrpc as rpc
from aund.devnet import storage
from tests.devnet.rawclient import connect, http

pytestmark = pytest.mark.timeout(60)


async def test_storage_rpcs_data_plane_acl_and_shares(devnet_inproc, alice, bob, tmp_path):
    url = devnet_inproc.gateway_url
    with trio.fail_after(40):
        async with connect(url, alice.token, "da", "main", identity=alice.identity) as a, \
                connect(url, bob.token, "db", "main", identity=bob.identity) as b:
            # writes are signed; keys are checked
            unsigned = await a.call("storage.put_object", {"object_key": "x.txt", "content": "eA=="})
            assert unsigned["error"]["code"] == rpc.CLIENT_SIGNATURE_INVALID
            bad = await a.signed_call("storage.put_object", {"object_key": "a/../x", "content": "eA=="})
            assert bad["error"]["code"] == rpc.INVALID_PARAMS and "segment" in bad["error"]["message"]
            put = await a.signed_call("storage.put_object", {"object_key": "n/small.txt",
                                                             "content": base64.b64encode(b"small").decode()})
            assert put["result"]["sha256"] == hashlib.sha256(b"small").hexdigest() and put["result"]["version"] == 1
            event = await a.next_frame(lambda f: f.get("method") == "event/storage.object_changed")
            assert event["params"]["object_key"] == "n/small.txt" and event["params"]["action"] == "put"
            # an upload session: the completion checks size and hash
            body = os.urandom(storage.INLINE_MAX_BYTES + 1000)
            check = (await a.call("storage.check_upload", {"object_key": "n/big.bin", "size_bytes": len(body)}))["result"]
            assert check["inline"] is False and check["target_exists"] is False
            session = (await a.signed_call("storage.create_upload_session", {"object_key": "n/big.bin",
                                                                              "size_bytes": len(body)}))["result"]
            forged = session["upload_url"].replace("sig=", "sig=0")
            assert (await http("PUT", forged, body=body)).status == 403
            assert (await http("PUT", session["upload_url"], body=body)).status == 200
            wrong = await a.signed_call("storage.complete_upload", {
                "object_key": "n/big.bin", "session_id": session["session_id"], "size_bytes": len(body),
                "sha256": hashlib.sha256(b"other").hexdigest()})
            assert wrong["error"]["code"] == rpc.INVALID_PARAMS and "sha256 mismatch" in wrong["error"]["message"]
            done = (await a.signed_call("storage.complete_upload", {
                "object_key": "n/big.bin", "session_id": session["session_id"], "size_bytes": len(body),
                "sha256": hashlib.sha256(body).hexdigest()}))["result"]
            assert done["size_bytes"] == len(body)
            too_big = await a.call("storage.get_object", {"object_key": "n/big.bin"})
            assert "create_download_ticket" in too_big["error"]["message"]
            # a private object: the ticket alone is not enough, the bearer must be the owner or a grantee
            assert (await b.call("storage.create_download_ticket", {"owner_aid": alice.aid,
                                                                    "object_key": "n/big.bin"}))["error"]["code"] \
                == rpc.PERMISSION_DENIED
            ticket = (await a.call("storage.create_download_ticket", {"object_key": "n/big.bin"}))["result"]
            assert (await http("GET", ticket["download_url"])).status == 401
            bob_bearer = {"Authorization": f"Bearer {bob.token}"}
            assert (await http("GET", ticket["download_url"], headers=bob_bearer)).status == 403
            got = await http("GET", ticket["download_url"], headers={"Authorization": f"Bearer {alice.token}"})
            assert got.status == 200 and got.body == body
            await a.signed_call("storage.set_acl", {"path": "n", "grantee_aid": bob.aid, "perms": "r"})
            assert (await http("GET", ticket["download_url"], headers=bob_bearer)).body == body
            # list and stat
            nodes = (await a.call("storage.fs.list", {"path": ""}))["result"]["nodes"]
            assert [(n["type"], n["name"]) for n in nodes] == [("dir", "n")]
            assert (await b.call("storage.fs.list", {"owner_aid": alice.aid, "path": ""}))["error"]["code"] \
                == rpc.PERMISSION_DENIED
            # a share link: read by the share, no token; revoked, gone
            share = (await a.signed_call("storage.create_share_link", {"object_key": "n/small.txt"}))["result"]
            shared = (await b.signed_call("storage.get_by_share", {"share_id": share["share_id"]}))["result"]
            assert base64.b64decode(shared["content"]) == b"small"
            await a.signed_call("storage.revoke_share_link", {"share_id": share["share_id"]})
            gone = await b.signed_call("storage.get_by_share", {"share_id": share["share_id"]})
            assert gone["error"]["code"] == rpc.NOT_FOUND
    index = json.loads((next(tmp_path.glob("devnet*")) / "storage" / "index.json").read_text())
    assert f"{alice.aid}|default|n/big.bin" in index["objects"]
