"""`aund devnet`: run the local AUN network until SIGTERM/SIGINT (then exit 0)."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (default 127.0.0.1:0, any port)")
    p.add_argument("--state-dir", required=True, type=Path, help="where the CA and the database live (kept)")
    p.add_argument("--issuer", default="aid.test", help="the issuer domain of the AIDs it registers")
    p.add_argument("--access-ttl", type=float, default=3600.0, help="access token lifetime in seconds")
    p.add_argument("--slot-policy", choices=("kick", "refuse"), default="kick",
                   help="a second long connection on a slot replaces the first (kick) or is refused")
    p.add_argument("--also-gateway", action="append", default=[], metavar="URL",
                   help="list another gateway URL in /.well-known/aun-gateway (failover candidate)")


def run(args: argparse.Namespace) -> int:
    import trio

    from aund import logs
    from aund.devnet import serve_devnet

    logs.configure()
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"aund devnet: --listen must be HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("aund devnet: warning: serving a development CA beyond loopback", file=sys.stderr)

    async def main() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(lambda task_status: serve_devnet(
                    host, int(port), args.state_dir, issuer=args.issuer, access_ttl=args.access_ttl,
                    slot_policy=args.slot_policy, extra_gateways=args.also_gateway, stop=stop,
                    task_status=task_status))
                print(f"aund devnet ready gateway={info.gateway_url} root_ca={info.root_ca}", flush=True)
                async for _ in signals:
                    stop.set()
                    break

    trio.run(main)
    return 0
