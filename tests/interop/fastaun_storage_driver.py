"""fastaun's own storage facade (`client.storage`, StorageVFS) against the devnet, in its own process.

Run as `python fastaun_storage_driver.py MODE` with env AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR.

- `facade`: one AID uploads bytes inline and by upload session, uploads and downloads a file
  (hash checked), reads bytes back, makes a folder, lists, stats, removes; a stranger is refused
  a private object and reads it through a share link.
- `peer`: the interop half with aund (PEER_AID is aund's AID). We write fa.json {aid}; after
  WORK/aund_up.json {path, sha256, size} appears we download that object of PEER (aund granted us
  `r`), check its hash and write fa_got.json; we upload WORK/fa_payload (a session upload) as
  /from-fastaun.bin, grant PEER `r` and write fa_up.json {path, sha256, size}; then wait for
  WORK/done.
Prints one JSON line per check; exits 1 if any failed. Imports only fastaun, never aund.
"""
import asyncio
import hashlib
import json
import os
import sys

from fastaun_common import WORK, AUNClient, check, ensure, failed, note, wait_for


async def connect(name):
    aid, ident = await ensure(name)
    client = AUNClient(ident)
    await asyncio.wait_for(client.connect({"auto_reconnect": False}), 30)
    check(f"connect {name}", client.state.value == "ready", client.state.value)
    return aid, client


async def facade():
    aid, client = await connect("owner")
    fs = client.storage
    small = b"hello storage\n" * 10
    big = os.urandom(300 * 1024)  # above the 64 KiB inline limit: an upload session
    try:
        up = await fs.write_bytes("/notes/small.txt", small)
        check("inline upload", up.size == len(small) and up.sha256 == hashlib.sha256(small).hexdigest(), up.to_dict())
        up = await fs.write_bytes("/notes/big.bin", big)
        check("session upload", up.size == len(big) and up.sha256 == hashlib.sha256(big).hexdigest(), up.to_dict())
        check("read inline bytes", await fs.read_bytes("/notes/small.txt") == small)
        check("read big bytes (ticket, private: bearer token)", await fs.read_bytes("/notes/big.bin") == big)
        src = WORK / "local.bin"
        src.write_bytes(big[:150_000])
        await fs.upload_file(str(src), "/files/local.bin")
        got = await fs.download_file("/files/local.bin", str(WORK / "back.bin"))
        check("download_file verified", got.verified and (WORK / "back.bin").read_bytes() == big[:150_000],
              got.to_dict())
        await fs.mkdir("/empty")
        names = sorted(n.name for n in await fs.list("/"))
        check("list root", names == ["empty", "files", "notes"], names)
        names = sorted(n.name for n in await fs.list("/notes"))
        check("list folder", names == ["big.bin", "small.txt"], names)
        st = await fs.stat("/notes/big.bin")
        check("stat file", st.type == "file" and st.size == len(big), st.to_dict())
        st = await fs.stat("/notes")
        check("stat dir", st.type == "dir", st.to_dict())
        try:
            await fs.write_bytes("/notes/small.txt", b"again")
            check("overwrite refused without overwrite=True", False)
        except Exception as exc:  # noqa: BLE001 (the SDK's ExistsError)
            check("overwrite refused without overwrite=True", type(exc).__name__ == "ExistsError", repr(exc))
        removed = await fs.remove("/notes/small.txt")
        check("remove", removed.removed_count == 1, removed.to_dict())
        names = sorted(n.name for n in await fs.list("/notes"))
        check("list after remove", names == ["big.bin"], names)
        share = await fs.lowlevel.create_share_link(object_key="notes/big.bin")
        _, other = await connect("stranger")
        try:
            try:
                await other.storage.read_bytes("/notes/big.bin", owner=aid)
                check("stranger refused a private object", False)
            except Exception as exc:  # noqa: BLE001
                check("stranger refused a private object", "AccessDenied" in type(exc).__name__, repr(exc))
            shared = await other.storage.lowlevel.get_by_share(share_id=share["share_id"])
            data = await other.storage.lowlevel.http_get(shared["download_url"])
            check("stranger reads through the share link", data == big, {k: v for k, v in shared.items()
                                                                           if k != "download_url"})
        finally:
            await other.close()
    finally:
        await client.close()


async def peer():
    peer_aid = os.environ["PEER_AID"]
    aid, client = await connect("fa")
    fs = client.storage
    (WORK / "fa.json").write_text(json.dumps({"aid": aid}))
    try:
        check("aund uploaded", await wait_for((WORK / "aund_up.json").exists, 90))
        up = json.loads((WORK / "aund_up.json").read_text())
        got = await fs.download_file(up["path"], str(WORK / "fa_got.bin"), owner=peer_aid)
        data = (WORK / "fa_got.bin").read_bytes()
        check("fastaun downloads aund's object", got.verified and hashlib.sha256(data).hexdigest() == up["sha256"]
              and len(data) == up["size"], got.to_dict())
        payload = (WORK / "fa_payload").read_bytes()
        mine = await fs.write_bytes("/from-fastaun.bin", payload)
        await fs.lowlevel.set_acl(path="from-fastaun.bin", grantee_aid=peer_aid, perms="r")
        (WORK / "fa_up.json").write_text(json.dumps({"path": "/from-fastaun.bin", "owner": aid,
                                                     "sha256": mine.sha256, "size": mine.size}))
        check("aund is done", await wait_for((WORK / "done").exists, 90))
    finally:
        await client.close()


if __name__ == "__main__":
    try:
        asyncio.run({"facade": facade, "peer": peer}[sys.argv[1]]())
    except Exception as exc:  # noqa: BLE001 (reported as a failed check)
        note(error=repr(exc))
        check("driver ran to the end", False, repr(exc))
    sys.exit(1 if failed else 0)
