"""Act as a second instance of an identity that aund holds: the gateway must kick aund's link."""
from __future__ import annotations

from pathlib import Path

import trio
import trio_websocket

from aund.aun import auth, jsonrpc as rpc
from aund.identity.store import IdentityStore

SEED = "test-seed-not-secret"


def take_slot(devnet, state_dir: Path, aid: str, slot_id: str = "main") -> dict:
    """Log in as `aid` (same device id as aund) and open a long connection on the same slot."""
    store = IdentityStore(state_dir, SEED)
    identity = store.load(aid)

    async def main() -> dict:
        trust = auth.GatewayTrust.from_files([Path(devnet.root_ca)])
        tokens = await auth.login(devnet.gateway_url, trust, aid, identity.private_key, identity.cert_pem)
        with trio.fail_after(15):
            async with trio_websocket.open_websocket_url(devnet.gateway_url) as ws:
                challenge = rpc.parse_frame(await ws.get_message())
                await ws.send_message(rpc.dumps(rpc.request("auth.connect", {
                    "nonce": challenge["params"]["nonce"], "auth": {"method": "kite_token", "token": tokens.access_token},
                    "device": {"id": identity.device_id, "type": "sdk"}, "client": {"slot_id": slot_id},
                    "capabilities": {"p2p_peer_pull_v1": True}})))
                while True:
                    frame = rpc.parse_frame(await ws.get_message())
                    if "id" in frame:
                        return frame

    reply = trio.run(main)
    assert reply.get("result", {}).get("status") == "ok", reply
    return reply
