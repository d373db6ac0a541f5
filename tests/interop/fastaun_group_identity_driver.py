"""fastaun 0.5.25's group identity facades against the devnet (issue: group identities).

Run as `python fastaun_group_identity_driver.py SCENARIO` with env AUN_GW_URL, AUN_ROOT_CA and
AUN_WORKDIR; imports only fastaun (through the shared drivers), never aund. The devnet runs with
`--group-identity-check`, so every group RPC of these (declaring) clients passes production's
admission. Host names *.aid.test resolve to the devnet in this process only; any other name a
lookup asks for is refused and reported (there is no DNS in tests).

  anonymous: `client.group.create({"name"}, aid_store=)` (create, then bind_group_aid and the card
             upload by the SDK itself); the group identity is in the store; another client
             downloads the card and the SDK's owner / current certificate checks accept it;
             `renew_group_aid`; a member joins and both exchange E2EE messages; dissolve revokes.
  named:     `client.group.create({"group_name"}, aid_store=)`; the same name by someone else is
             refused; the card is published.
  recovery:  a raw `group.create` (no identity) then `client.group.add_member`: the devnet answers
             -32003 (to these calls, or to the SDK's own background pulls of the group, whichever
             comes first) and the SDK binds the identity, uploads the card and retries on its own.
"""
import asyncio
import json
import secrets
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit

from aun_core.agent_md import AgentMdManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from fastaun_common import GW, check, failed, note, store_for
from fastaun_groups_driver import Member, fails, wait_for

_gw = urlsplit(GW)
_real_getaddrinfo = socket.getaddrinfo
foreign_lookups: list[str] = []


def _loopback_names(host, port, *args, **kwargs):
    """*.aid.test -> the devnet (its port, whatever port was asked); loopback as is; else refused."""
    if isinstance(host, str) and host.lower().endswith(".aid.test"):
        return _real_getaddrinfo(_gw.hostname, _gw.port, *args, **kwargs)
    if host in ("127.0.0.1", "localhost", "::1", _gw.hostname):
        return _real_getaddrinfo(host, port, *args, **kwargs)
    foreign_lookups.append(str(host))
    raise socket.gaierror(socket.EAI_NONAME, f"no DNS in tests: {host}")


socket.getaddrinfo = _loopback_names
HTTP = f"http://{_gw.netloc}"


def http_get(path, headers=None):
    """(status, headers (lower-case names), body bytes) of a GET on the devnet."""
    request = urllib.request.Request(HTTP + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def fingerprint(pem: str) -> str:
    return "sha256:" + x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex()


def projection(aid):
    """What the name service says of a group AID (the SDK's fresh entity GET)."""
    status, headers, _ = http_get("/agent.md", {"Host": aid, "X-AUN-Ownership-Check": "1", "Cache-Control": "no-cache"})
    return status, {k: headers.get(k, "") for k in ("x-aun-entity-owner-aid", "x-aun-entity-cert-fingerprint",
                                                    "x-aun-ownership-status", "x-aun-entity-verification-status")}


async def owner_member(name):
    me = Member(name)
    await me.open()
    me.store = me.client._aid_store
    return me


async def reader_checks(gid, owner_aid, cert_fp, label):
    """Another store (a reader that holds no group key) downloads and checks the group's card."""
    reader = store_for(f"reader-{secrets.token_hex(2)}")
    reader._keystore.set_metadata_value(gid, "gateway_url", GW)
    card = await reader.download_agent_md(gid)
    data = (card.data or {}) if card.ok else {}
    check(f"{label}: card downloaded and verified", card.ok and (data.get("verification") or {}).get("status") == "verified",
          data.get("verification") if card.ok else f"{card.error.code}: {card.error.message}")
    front = data.get("frontmatter") or {}
    check(f"{label}: card is the group's", front.get("type") == "group" and front.get("aid") == gid
          and front.get("owner") == owner_aid and front.get("entity_cert_fingerprint") == cert_fp, front)
    check(f"{label}: ETag is fastaun's content hash",
          data.get("etag") == AgentMdManager.content_etag(data.get("content", "")), data.get("etag"))
    synced = await reader.check_agent_md(gid, ttl_days=0)
    check(f"{label}: check_agent_md finds it", synced.ok and synced.data.get("remote_found") is True,
          synced.data if synced.ok else synced.error.message)


async def identity_checks(me, gid, label):
    """The group identity is in the owner's store, the devnet serves its certificate
    authoritatively, and the SDK's own owner / current-certificate resolution accepts it."""
    loaded = me.store.load(gid)
    ident = loaded.data.get("aid") if loaded.ok and isinstance(loaded.data, dict) else None
    check(f"{label}: group identity in the AIDs store", ident is not None and ident.is_private_key_valid(),
          None if loaded.ok else loaded.error.message)
    if ident is None:
        return ""
    fp = ident.cert_fingerprint
    status, headers, body = http_get(f"/pki/cert/{quote(gid)}?cert_fingerprint={fp}&consistency=authoritative"
                                     "&key_purpose=group_identity")
    check(f"{label}: authoritative certificate", status == 200 and headers.get("x-aun-cert-lifecycle-state") ==
          "active_signing" and headers.get("x-aun-cert-fingerprint") == fp and fingerprint(body.decode()) == fp,
          {"status": status, **{k: v for k, v in headers.items() if k.startswith("x-aun")}})
    context = await me.client._resolve_entity_agent_md_owner(gid, "group")
    check(f"{label}: SDK resolves owner and certificate", context.get("owner_aid") == me.aid
          and context.get("entity_cert_fingerprint") == fp, context)
    status, proj = projection(gid)
    check(f"{label}: owner projection", status == 200 and proj == {
        "x-aun-entity-owner-aid": me.aid, "x-aun-entity-cert-fingerprint": fp,
        "x-aun-ownership-status": "not_applicable", "x-aun-entity-verification-status": "current"}, proj)
    await reader_checks(gid, me.aid, fp, label)
    return fp


async def exchange(owner, member, gid):
    """Both send one E2EE group message and each decrypts the other's."""
    for sender, receiver in ((owner, member), (member, owner)):
        text = f"from {sender.name} {secrets.token_hex(3)}"
        r = await sender.client.group.send({"group_id": gid, "payload": {"type": "text", "text": text}})
        check(f"{sender.name} sends E2EE", isinstance(r.get("seq"), int), r)
        got = await wait_for(lambda t=text, r=receiver: t in r.texts(), 20)
        row = next((m for m in receiver.messages.values() if receiver.text_of(m) == text), {})
        check(f"{receiver.name} decrypts {sender.name}'s message", got and row.get("encrypted") is True,
              sorted(map(str, receiver.texts()))[:5])


async def anonymous():
    owner, member = await owner_member("gidown"), await owner_member("gidmem")
    try:
        created = await owner.client.group.create({"name": "anonymous team", "join_mode": "approval"},
                                                  aid_store=owner.store)
        gid = (created.get("group") or {}).get("group_aid") or created.get("group_aid", "")
        check("anonymous create + bind", gid.endswith(".aid.test") and bool((created.get("aid_cert") or {}).get("cert")),
              {k: created.get(k) for k in ("group_id", "group_aid", "group")})
        old_fp = await identity_checks(owner, gid, "anonymous")

        renewed = await owner.client.group.renew_group_aid({"group_id": gid}, aid_store=owner.store)
        new_pem = (renewed.get("aid_cert") or {}).get("cert", "")
        check("renew_group_aid", renewed.get("old_cert_revoked") is True and new_pem and fingerprint(new_pem) != old_fp,
              {k: v for k, v in renewed.items() if k != "aid_cert"})
        status, headers, body = http_get(f"/pki/cert/{quote(gid)}?consistency=authoritative&key_purpose=group_identity")
        check("the new certificate is served", status == 200 and new_pem and fingerprint(body.decode()) == fingerprint(new_pem),
              headers.get("x-aun-cert-fingerprint"))
        status, headers, _ = http_get(f"/pki/cert/{quote(gid)}?cert_fingerprint={old_fp}&consistency=authoritative")
        check("the old certificate stays in history, revoked", status == 200
              and headers.get("x-aun-cert-lifecycle-state") == "revoked", headers.get("x-aun-cert-lifecycle-state"))
        await identity_checks(owner, gid, "renewed")

        r = await owner.client.group.add_member({"group_id": gid, "aid": member.aid})
        check("add member", (r.get("member") or {}).get("aid") == member.aid, r)
        await asyncio.sleep(0.5)
        await exchange(owner, member, gid)

        serial = format(x509.load_pem_x509_certificate(new_pem.encode()).serial_number, "x")
        r = await owner.client.group.dissolve({"group_id": gid})
        check("dissolve", r.get("status") == "dissolved", r)
        _, _, ocsp = http_get(f"/pki/ocsp/{serial}")
        check("the group certificate is revoked (OCSP)", json.loads(ocsp).get("status") == "revoked", ocsp[:200])
        _, proj = projection(gid)
        check("the card is marked dissolved", proj["x-aun-entity-verification-status"] == "dissolved", proj)
        note(group_id=gid)
    finally:
        await owner.close()
        await member.close()


async def named():
    owner, other = await owner_member("gidnamed"), await owner_member("gidother")
    name = f"team-{secrets.token_hex(3)}"
    try:
        created = await owner.client.group.create({"group_name": name, "name": "Named team"}, aid_store=owner.store)
        gid = (created.get("group") or {}).get("group_aid", "")
        check("named create", gid == f"{name}.aid.test" and (created.get("group") or {}).get("owner_aid") == owner.aid
              and bool((created.get("aid_cert") or {}).get("cert")), created.get("group"))
        await identity_checks(owner, gid, "named")
        raised, err = await fails(other.client.group.create({"group_name": name}, aid_store=other.store))
        check("the name is taken for someone else", raised and "already taken" in err, err)
        r = await owner.client.group.add_member({"group_id": gid, "aid": other.aid})
        check("a named group admits a member", (r.get("member") or {}).get("aid") == other.aid, r)
        await asyncio.sleep(0.5)
        await exchange(owner, other, gid)
    finally:
        await owner.close()
        await other.close()


async def recovery():
    owner, member = await owner_member("gidrec"), await owner_member("gidrecm")
    try:
        created = await owner.call("group.create", {"name": "raw create"})  # no identity yet
        gid = created["group"]["group_id"]
        r = await owner.client.group.add_member({"group_id": gid, "aid": member.aid})  # -32003, recovered by the SDK
        check("add_member succeeds after the SDK's recovery", (r.get("member") or {}).get("aid") == member.aid, r)
        await identity_checks(owner, gid, "recovered")
    finally:
        await owner.close()
        await member.close()


async def main(scenario):
    await {"anonymous": anonymous, "named": named, "recovery": recovery}[scenario]()
    check("no name outside *.aid.test was looked up", not foreign_lookups, foreign_lookups)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
