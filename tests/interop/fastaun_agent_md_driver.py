"""fastaun 0.5.25 reads PEER_AID's agent.md as any peer does: `download_agent_md` (the document
at http://{aid}/agent.md, its signature checked against the AID's certificate from the gateway's
PKI; the ETag must be fastaun's own hash of the content) and `check_agent_md` (a HEAD).

Env: AUN_GW_URL, AUN_ROOT_CA, AUN_WORKDIR (see fastaun_common), PEER_AID, EXPECT_NAME (the front
matter name the card must carry). The AID host names of *.aid.test resolve to the devnet's
address and port, in this process only (there is no DNS in tests). Imports only fastaun."""
import asyncio
import os
import socket
import sys
from urllib.parse import urlsplit

from fastaun_common import GW, check, failed, store_for
from aun_core.agent_md import AgentMdManager  # noqa: E402  (after fastaun_common set the environment)

_gw = urlsplit(GW)
_real_getaddrinfo = socket.getaddrinfo


def _loopback_names(host, port, *args, **kwargs):
    """*.aid.test -> the devnet (its port, whatever port was asked: the URL says :80)."""
    if isinstance(host, str) and host.lower().endswith(".aid.test"):
        return _real_getaddrinfo(_gw.hostname, _gw.port, *args, **kwargs)
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _loopback_names


async def main():
    peer, name = os.environ["PEER_AID"], os.environ["EXPECT_NAME"]
    store = store_for("reader")
    store._keystore.set_metadata_value(peer, "gateway_url", GW)  # the peer's gateway, as discovery would say
    card = await store.download_agent_md(peer)
    data = (card.data or {}) if card.ok else {}
    check("download_agent_md", card.ok, None if card.ok else f"{card.error.code}: {card.error.message}")
    check("signature verified", (data.get("verification") or {}).get("status") == "verified", data.get("verification"))
    check("front matter", (data.get("frontmatter") or {}).get("name") == name, data.get("frontmatter"))
    # fastaun treats its own upload as committed only when the gateway's ETag is its hash of the content
    check("ETag is fastaun's content hash", data.get("etag") == AgentMdManager.content_etag(data.get("content", "")),
          data.get("etag"))
    synced = await store.check_agent_md(peer, ttl_days=0)  # ttl 0: ask the gateway (HEAD), not the cache
    check("check_agent_md in sync", synced.ok and synced.data.get("in_sync") is True and synced.data.get("remote_found"),
          synced.data if synced.ok else synced.error.message)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
