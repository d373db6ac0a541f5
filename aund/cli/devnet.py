"""`aund devnet`: run the local AUN network until SIGTERM/SIGINT (then exit 0);
`aund devnet revoke AID --state-dir DIR`: revoke an AID's current certificate on that network."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from aund.cli._common import only_os_error, os_error_line, say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (default 127.0.0.1:0, any port)")
    p.add_argument("--state-dir", type=Path, help="where the CA and the database live (kept); required")
    p.add_argument("--issuer", default="aid.test", help="the issuer domain of the AIDs it registers")
    p.add_argument("--access-ttl", type=float, default=3600.0, help="access token lifetime in seconds")
    p.add_argument("--slot-policy", choices=("kick", "refuse"), default="kick",
                   help="a second long connection on a slot replaces the first (kick) or is refused")
    p.add_argument("--also-gateway", action="append", default=[], metavar="URL",
                   help="list another gateway URL in /.well-known/aun-gateway (failover candidate)")
    p.add_argument("--pki", choices=("dev", "production"), default="dev",
                   help="CA shape: dev (P-256 root -> issuer) or production (P-384 root -> registry -> issuer "
                        "-> auth cert, as the AUN network); fixed for a state dir at its first start")
    p.add_argument("--federate", action="append", default=[], metavar="ISSUER=URL",
                   help="relay P2P messages for AIDs of ISSUER to the devnet at URL (repeat per issuer)")
    p.add_argument("--no-agent-md-check", action="store_true",
                   help="admit clients that declare agent.md validation without one (production answers -32003)")
    p.add_argument("--group-identity-check", action="store_true",
                   help="refuse a declaring client's group RPCs (-32003) until the group has its certificate and "
                        "card, as production does (off by default, as it was before group identities)")
    p.add_argument("--group-card-grace", type=float, default=30.0, metavar="SECONDS",
                   help="with --group-identity-check: after a new group certificate the owner's own group RPCs "
                        "pass this long before its card must follow (default 30)")
    p.add_argument("--cert-ttl", type=float, default=0.0, metavar="SECONDS",
                   help="AID certificates valid this many seconds (default: the PKI mode's 365/730 days); "
                        "for renewal tests")
    p.add_argument("--tls-cert", type=Path, help="serve wss:// and https:// with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    sub = p.add_subparsers(dest="devnet_command", metavar="revoke")
    rev = sub.add_parser("revoke", help="put an AID's current certificate on the devnet's CRL (OCSP: revoked)",
                         description="Revoke an AID's current certificate; a devnet running on the same state "
                                     "dir serves the new CRL and OCSP answer at once.")
    rev.add_argument("aid")
    rev.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help="the devnet's state dir (required)")


DEVNET_SESSIONS = 10_000  # sessions the devnet is sized for at start (open files)


def run(args: argparse.Namespace) -> int:
    if args.devnet_command == "revoke":
        return _revoke(args)
    if args.state_dir is None:
        say("aund devnet: --state-dir is required", err=True)
        return 2
    import trio

    from aund import logs
    from aund.devnet import PKIModeMismatch, check_mode, serve_devnet

    logs.configure()
    from aund import fdlimit

    # a devnet serves every link of the daemons on this machine: one socket each (soft -> hard)
    check = fdlimit.ensure_nofile(fdlimit.needed(DEVNET_SESSIONS))
    if not check.enough:
        say(f"aund devnet: warning: open files limited to {check.soft}: fewer than {DEVNET_SESSIONS} sessions "
            "fit (raise `ulimit -Hn`)", err=True)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        say(f"aund devnet: --listen must be HOST:PORT, got {args.listen!r}", err=True)
        return 2
    if host not in ("127.0.0.1", "::1", "localhost"):
        say("aund devnet: warning: serving a development CA beyond loopback", err=True)
    from aund.devnet.federation import parse_peers

    try:
        federate = parse_peers(args.federate)
    except ValueError as exc:
        say(f"aund devnet: {exc}", err=True)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        say("aund devnet: --tls-cert and --tls-key go together", err=True)
        return 2
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            say(f"aund devnet: {path} does not exist or is not a file", err=True)
            return 2
    try:
        check_mode(args.state_dir.resolve() / "pki", args.pki)
    except PKIModeMismatch as exc:
        say(f"aund devnet: {exc}", err=True)
        return 2

    async def main() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(lambda task_status: serve_devnet(
                    host, int(port), args.state_dir, issuer=args.issuer, access_ttl=args.access_ttl,
                    slot_policy=args.slot_policy, extra_gateways=args.also_gateway, pki_mode=args.pki, stop=stop,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, federate=federate,
                    agent_md_check=not args.no_agent_md_check, cert_ttl=args.cert_ttl,
                    group_identity_check=args.group_identity_check, group_card_grace=args.group_card_grace,
                    task_status=task_status))
                say(f"aund devnet ready gateway={info.gateway_url} root_ca={info.root_ca}", flush=True)
                async for _ in signals:
                    stop.set()
                    break

    try:
        trio.run(main)
    except BaseException as exc:
        found = only_os_error(exc)
        if found is None or found.filename:  # a path is named by the generic line (aund.cli.main)
            raise
        say(f"aund devnet: cannot listen on {args.listen}: {os_error_line(found)}", err=True)
        return 1
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from aund.aun import ids
    from aund.devnet import revoke

    if args.state_dir is None:
        say("aund devnet revoke: --state-dir is required", err=True)
        return 2
    try:
        aid = ids.normalize_aid(args.aid)
    except ValueError as exc:
        say(f"aund devnet revoke: invalid AID {args.aid!r}: {exc}", err=True)
        return 2
    try:
        done = revoke(args.state_dir.resolve(), aid)
    except FileNotFoundError as exc:
        say(f"aund devnet revoke: {exc} (is --state-dir a devnet's state dir?)", err=True)
        return 2
    if done is None:
        say(f"aund devnet revoke: {aid} has no certificate on this devnet", err=True)
        return 1
    serial, _, newly = done
    say(f"{'revoked' if newly else 'already revoked'} {aid} serial={serial}", flush=True)
    return 0
