"""The devnet's agent.md admission, as production's: a client that declares
`agent_md_validation_v1` and whose AID has no agent.md gets -32003 on its calls; one that does not
declare it, or a devnet started without the check, is served."""
from __future__ import annotations

import trio

from aund.aun import jsonrpc as rpc
from aund.identity import agent_md
from tests.devnet.rawclient import CAPABILITIES, fresh_aid, http, http_base, new_account, open_raw

DECLARING = {**CAPABILITIES, "agent_md_validation_v1": True}


def _card(account) -> bytes:
    return agent_md.sign(agent_md.default_document(account.aid), account.identity.key, account.identity.cert).encode()


async def _ping(info, account, capabilities):
    async with open_raw(info.gateway_url) as c:
        reply = await c.authenticate(account.token, "dev-1", "main", capabilities=capabilities)
        assert reply["result"]["status"] == "ok", reply
        return await c.call("message.peers", {"filter": "pending"})


async def test_declaring_clients_need_an_agent_md(start_devnet):
    info = await start_devnet()
    with trio.fail_after(20):
        alice = await new_account(info.gateway_url, fresh_aid("alice"), root_ca=info.root_ca)
        refused = await _ping(info, alice, DECLARING)
        assert refused["error"]["code"] == rpc.AGENT_MD_REQUIRED == -32003
        assert refused["error"]["message"] == f"valid agent.md is required for {alice.aid}"
        assert "result" in await _ping(info, alice, CAPABILITIES)  # an older client: served as before
        put = await http("PUT", http_base(info.gateway_url) + "/agent.md", body=_card(alice),
                         headers={"Host": alice.aid, "Authorization": f"Bearer {alice.token}", "If-None-Match": "*"})
        assert put.status == 200
        assert "result" in await _ping(info, alice, DECLARING)


async def test_the_check_can_be_turned_off(start_devnet):
    info = await start_devnet(agent_md_check=False)
    with trio.fail_after(20):
        alice = await new_account(info.gateway_url, fresh_aid("alice"), root_ca=info.root_ca)
        assert "result" in await _ping(info, alice, DECLARING)
