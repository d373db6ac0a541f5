"""devnet: a spec-faithful local AUN network in one process on loopback (`aund devnet`).

`serve_devnet` binds one port for the gateway WebSocket (`/aun`) and its HTTP endpoints,
creates or reloads the state under `state_dir` (its CA in the `pki_mode` shape, SQLite), reports
the gateway URL and root CA path through `task_status`, and serves until cancelled.
`revoke` puts an AID's current certificate on the CRL of a state dir, running devnet or not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from aund.devnet import federation
from aund.devnet.gateway import Devnet
from aund.devnet.pki import DevCA, PKIModeMismatch, check_mode  # noqa: F401  (re-exported)
from aund.devnet.store import Store


@dataclass(frozen=True)
class DevnetInfo:
    gateway_url: str
    http_url: str
    root_ca: Path
    devnet: Devnet


async def serve_devnet(host: str, port: int, state_dir: Path, *, issuer: str = "aid.test",
                       access_ttl: float = 3600.0, slot_policy: str = "kick", extra_gateways: list[str] | None = None,
                       pki_mode: str = "dev", federate: dict[str, str] | None = None,
                       agent_md_check: bool = True, group_identity_check: bool = False, cert_ttl: float = 0.0,
                       group_card_grace: float = 30.0,
                       tls_cert: Path | None = None, tls_key: Path | None = None,
                       stop: trio.Event | None = None, task_status: trio.TaskStatus[DevnetInfo] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    state_dir = state_dir.resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = DevCA.open(state_dir / "pki", issuer, pki_mode)
    store = Store(state_dir / "devnet.sqlite3")
    net = Devnet(store, ca, issuer, access_ttl=access_ttl, slot_policy=slot_policy, extra_gateways=extra_gateways,
                 federation=federate)
    net.agent_md_check = agent_md_check
    net.group_identity_check = group_identity_check
    net.group_card_grace = group_card_grace
    net.cert_ttl = cert_ttl
    config = Config()
    config.bind = [f"{host}:{port}"]
    if tls_cert is not None:  # wss:// and https:// on the same port, as a real gateway serves them
        config.certfile, config.keyfile = str(tls_cert), str(tls_key)
    config.websocket_max_message_size = 2 * 1024 * 1024
    config.websocket_ping_interval = None
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.errorlog.setLevel(logging.CRITICAL)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(net.app, config, shutdown_trigger=shutdown.wait,
                                                                  task_status=task_status))
            if net.federation:
                nursery.start_soon(federation.run_pusher, net)
            http_url = binds[0]
            net.tls = tls_cert is not None
            net.public_url = ("wss://" if net.tls else "ws://") + http_url.split("://", 1)[1] + "/aun"
            task_status.started(DevnetInfo(net.public_url, http_url, ca.root_cert_path, net))
            await (stop.wait() if stop is not None else trio.sleep_forever())
            shutdown.set()  # graceful: hypercorn closes the listener and the sockets, then returns
            net.federation_outbox[0].close()  # the pusher sends what is queued and ends
    finally:
        store.close()


def revoke(state_dir: Path, aid: str) -> tuple[str, float, bool] | None:
    """Revoke `aid`'s current certificate in the devnet database under `state_dir`: (serial hex,
    revoked_at, newly revoked), None when the AID has no certificate there. A devnet running on the
    same state dir answers from the database, so its CRL and OCSP show it at once.

    Raises FileNotFoundError when `state_dir` holds no devnet database."""
    db = state_dir / "devnet.sqlite3"
    if not db.is_file():
        raise FileNotFoundError(f"no devnet database at {db}")
    store = Store(db)
    try:
        return store.revoke_current(aid)
    finally:
        store.close()
