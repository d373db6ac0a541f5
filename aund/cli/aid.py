"""`aund aid list|show|ensure|agent-md|renew|disable|enable|export|import`: identities.
list/show/ensure/agent-md/renew/disable/enable go through the daemon. import moves an identity made
by the official SDK, or a bundle made by `export`, into aund's store (with the daemon stopped: it
owns the store). export reads the state dir itself, with the seed, and never asks the daemon: the
daemon's rule is that a private key never leaves it over the socket (apps sign through it), so
only someone who can read the state dir and the seed anyway (root, the daemon's user) can export,
and no app the policy admits gains a way to take a key."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aund.cli._common import (
    EXIT_FAILED, EXIT_OK, add_socket_argument, open_client, print_json, say, table, unreachable,
)

DEFAULT_SEED_FILE = Path("/etc/aund/encryption_seed")
PASSPHRASE_ENV = "AUND_EXPORT_PASSPHRASE"  # aund.identity.bundle's (not imported here: `aund aid list` stays light)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="aid_command", metavar="list|show|ensure|agent-md|reset-consumer|renew|disable|enable|export|import",
                           required=True)
    def daemon_command(name: str, text: str, *, aid: bool = True,
                       json_help: str | None = None) -> argparse.ArgumentParser:
        """A subcommand that talks to the daemon: --socket, the AID (unless `aid` is False), --json."""
        cmd = sub.add_parser(name, help=text)
        add_socket_argument(cmd)
        if aid:
            cmd.add_argument("aid")
        cmd.add_argument("--json", action="store_true", help=json_help)
        return cmd

    daemon_command("list", "identities in the daemon's store", aid=False)
    daemon_command("show", "certificate, device, gateways, links, inbox and your consumers of one AID")
    reset = daemon_command("reset-consumer", "set one of your durable consumers back (or forward)")
    reset.add_argument("consumer")
    reset.add_argument("--to", dest="cursor", type=int, default=0, metavar="CURSOR",
                       help="it reads again after CURSOR (default 0: everything)")
    daemon_command("ensure", "load, register if absent, load again")
    card = daemon_command("agent-md", "print the AID's published agent.md, or replace it (--set FILE)",
                          json_help="print {aid, etag, content}")
    card.add_argument("--set", dest="set_file", type=Path, metavar="FILE",
                      help="markdown with YAML front matter (aid, name, type, version); aund signs it ('-': stdin)")
    ren = daemon_command("renew", "a new certificate for the AID now (--rekey: a new key too); "
                                  "old keys and certificates are kept")
    ren.add_argument("--rekey", action="store_true", help="a new key pair and its certificate (auth.rekey)")
    daemon_command("disable", "stop holding the AID: its links close, sessions and subscriptions are "
                              "refused until `enable` (kept across restarts; nothing is deleted)")
    daemon_command("enable", "hold a disabled AID again (a configured one reconnects)")
    exp = sub.add_parser("export", help="write one identity to an encrypted bundle FILE (key, past keys, "
                                        "certificates, prekeys, meta; no tokens), to import elsewhere")
    exp.add_argument("aid")
    exp.add_argument("--to", dest="bundle", type=Path, required=True, metavar="FILE",
                     help="the bundle to create (0600; an existing file is never overwritten)")
    _add_offline_arguments(exp)
    exp.epilog = (f"The passphrase comes from --passphrase-file or ${PASSPHRASE_ENV} (at least 12 characters), "
                  "never from the command line. export only reads the state dir; it works while aund runs.")
    imp = sub.add_parser("import", help="import an identity created by fastaun, or a bundle from `aund aid export` "
                                        "(aund must be stopped)")
    imp.add_argument("aid")
    imp.add_argument("--from", dest="aun_path", type=Path, required=True,
                     help="the SDK's aun_path, or a bundle file made by `aund aid export`")
    _add_offline_arguments(imp)
    imp.epilog = ("The SDK's seed is read from AUND_IMPORT_SEED (\"\" if unset), a bundle's passphrase from "
                  f"--passphrase-file or ${PASSPHRASE_ENV}; aund's seed from --seed-file, "
                  f"AUND_ENCRYPTION_SEED or {DEFAULT_SEED_FILE} (the file aund.service loads). Run as root on a "
                  "state dir of another user (the daemon's), the import reads the seed and the SDK's files as "
                  "root, then writes the state dir as that user. An AID already here with another key is refused.")


def _add_offline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, help="aund's state dir (default: from config)")
    p.add_argument("--config", type=Path)
    p.add_argument("--seed-file", type=Path,
                   help=f"aund's encryption seed (default: $AUND_ENCRYPTION_SEED, else {DEFAULT_SEED_FILE})")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE",
                   help=f"the bundle's passphrase (default: ${PASSPHRASE_ENV})")


def run(args: argparse.Namespace) -> int:
    if args.aid_command == "import":
        return _import(args)
    if args.aid_command == "export":
        return _export(args)
    from client_stub import AundError, DaemonUnavailable

    text = None
    if args.aid_command == "agent-md" and args.set_file is not None:
        text = _read_card(args.set_file)
        if text is None:
            return EXIT_FAILED
    try:
        with open_client(args, timeout=60) as client:
            if args.aid_command == "list":
                result = client.list_identities()
            elif args.aid_command == "ensure":
                result = client.ensure_identity(args.aid)
            elif args.aid_command == "show":
                result = client.show_identity(args.aid)
            elif args.aid_command == "reset-consumer":
                result = client.reset_consumer(args.aid, args.consumer, args.cursor)
            elif args.aid_command == "renew":
                result = client.renew_identity(args.aid, rekey=args.rekey)
            elif args.aid_command == "disable":
                result = client.disable_identity(args.aid)
            elif args.aid_command == "enable":
                result = client.enable_identity(args.aid)
            elif text is not None:
                result = client.set_agent_md(args.aid, text)
            else:
                result = client.agent_md(args.aid)
    except DaemonUnavailable as exc:
        return unreachable(exc)
    except AundError as exc:
        where = f" {args.set_file}" if text is not None else ""
        say(f"aund aid {args.aid_command}{where}: {type(exc).__name__}: {exc.message or exc}", err=True)
        return EXIT_FAILED
    if args.json:
        print_json(result)
    elif args.aid_command == "agent-md":
        if text is not None:
            say(f"published the agent.md of {result['aid']}  etag {result['etag']}")
        else:
            for line in result["content"].removesuffix("\n").split("\n"):  # a card from the network: escaped
                say(line)
    elif args.aid_command == "show":
        _print_identity(result)
    elif args.aid_command == "reset-consumer":
        say(f"{result['aid']} consumer {result['consumer']}: reads again after cursor {result['cursor']}")
    elif args.aid_command == "list":
        rows = [[i["aid"], "disabled" if i.get("disabled") else "enabled",
                 ", ".join(f"{link['slot_id']}:{link['state']}" for link in i.get("links", [])) or "-"]
                for i in result]
        print(table(rows, ["AID", "STATE", "LINKS"]) if rows else "no identities")
    elif args.aid_command in ("disable", "enable"):
        if args.aid_command == "disable":
            say(f"{result['aid']} disabled{'' if result['changed'] else ' (it was already)'}: "
                f"{result['links_closed']} link(s) closed; `aund aid enable {result['aid']}` holds it again")
        else:
            say(f"{result['aid']} enabled{'' if result['changed'] else ' (it was not disabled)'}"
                + ("; its configured link is starting" if result.get("connecting") else ""))
    elif args.aid_command == "renew":
        say(f"{'rekeyed' if result['rekeyed'] else 'renewed'} {result['aid']}  {result['cert_fingerprint']}  "
            f"(was {result['old_cert_fingerprint']})")
    else:
        say(f"{result['aid']}  {result['cert_fingerprint']}")
    return EXIT_OK


def _print_identity(r: dict) -> None:
    import time

    now = time.time()
    expiry = r["not_after"]
    left = f"expires in {int((expiry - now) // 86400)} days" if expiry > now else "EXPIRED"
    say(f"{r['aid']}")
    for label, value in (("certificate", r["cert_fingerprint"]), ("subject", r["subject"]), ("issuer", r["issuer"]),
                         ("valid", f"{time.strftime('%Y-%m-%d', time.gmtime(r['not_before']))} .. "
                                   f"{time.strftime('%Y-%m-%d', time.gmtime(expiry))} ({left})"),
                         ("device", r["device_id"]), ("gateways", ", ".join(r["gateways"]) or "by discovery"),
                         ("agent.md", r["agent_md_etag"] or "not published yet"),
                         ("state", _disabled_text(r.get("disabled"))),
                         ("inbox", f"{r['inbox_events']} events")):
        say(f"  {label:<12}{value}")
    if r["links"]:
        print()
        print(table([[x["slot_id"], x["state"], x["gateway"], x["reconnects"]] for x in r["links"]],
                    ["SLOT", "STATE", "GATEWAY", "RECONNECTS"]))
    print()
    print(table([[c["consumer"], c["cursor"]] for c in r["consumers"]], ["CONSUMER", "CURSOR"])
          if r["consumers"] else "no durable consumers")


def _disabled_text(disabled: dict | None) -> str:
    import time

    if not disabled:
        return "enabled"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(disabled.get("at", 0)))
    return f"DISABLED since {when} by uid {disabled.get('by_uid', '?')} (aund aid enable to hold it again)"


def _read_card(path: Path) -> str | None:
    """The text of `path` ('-': stdin), or None after one line on stderr saying what is wrong."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text (byte {exc.start}); save it as UTF-8 markdown"
    except IsADirectoryError:
        problem = "is a directory; give the agent.md file"
    except FileNotFoundError:
        problem = "does not exist; give the path of a markdown file with YAML front matter"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc}); check the path and its permissions"
    say(f"aund aid agent-md: {path} {problem}", err=True)
    return None


def _import(args: argparse.Namespace) -> int:
    import time

    from aund.config import ConfigError, load
    from aund.errors import AundError
    from aund.identity.store import IdentityStore, StateLock, load_seed, read_fastaun

    os.umask(0o077)
    aid = args.aid.strip().lower()
    try:
        config = load(args.config, {"state_dir": args.state_dir})
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = _seed(args.seed_file, load_seed)
        if args.aun_path.is_file():  # a bundle from `aund aid export`
            from aund.identity import bundle
            from aund.identity.errors import InvalidIdentity

            opened = bundle.open_bundle(args.aun_path, bundle.read_passphrase(args.passphrase_file))
            if opened.aid != aid:
                raise InvalidIdentity(f"{args.aun_path} holds {opened.aid}, not {aid}", data={"aid": aid})
            origin = {"bundle": str(args.aun_path.resolve()), "exported_at": opened.created_at,
                      "from_device": opened.content.get("device_id", ""), "imported_at": time.time()}

            def store_it(store: IdentityStore):
                return store.import_content(opened.content, meta={"imported_from": origin})
        else:
            found = read_fastaun(args.aun_path, aid, os.environ.get("AUND_IMPORT_SEED", ""))

            def store_it(store: IdentityStore):
                return store.import_read(found, meta={"imported_from": "fastaun"})
        _become_owner(config.state_dir)
        with StateLock(config.state_dir):
            store = IdentityStore(config.state_dir, seed)
            store.verify_seed()
            identity = store_it(store)
    except (ConfigError, AundError) as exc:
        say(f"aund aid import: {exc}", err=True)
        return EXIT_FAILED
    except OSError as exc:
        say(f"aund aid import: {exc.filename or ''}: {exc.strerror or exc}", err=True)
        return EXIT_FAILED
    say(f"imported {identity.aid}  {identity.cert_fingerprint}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    """Offline, read-only: the state dir's files are each replaced atomically by the daemon, so a
    running daemon is no obstacle. The bundle is created once (never over an existing file), 0600."""
    from aund.config import ConfigError, load
    from aund.errors import AundError
    from aund.identity import bundle
    from aund.identity.errors import IdentityNotFound
    from aund.identity.store import IdentityStore, create_once, load_seed

    os.umask(0o077)
    aid = args.aid.strip().lower()
    target: Path = args.bundle
    try:
        config = load(args.config, {"state_dir": args.state_dir})
        if not (config.state_dir / "AIDs").is_dir():
            raise IdentityNotFound(f"{config.state_dir} is not an aund state dir (no AIDs/ in it); give --state-dir",
                                   data={"path": str(config.state_dir)})
        if os.path.lexists(target):
            say(f"aund aid export: {target} exists; aund never overwrites a file: choose another name", err=True)
            return EXIT_FAILED
        passphrase = bundle.read_passphrase(args.passphrase_file, new=True)
        store = IdentityStore(config.state_dir, _seed(args.seed_file, load_seed))
        store.verify_seed()
        content = store.export_content(aid)
        if not create_once(target, bundle.seal(aid, content, passphrase), 0o600):
            say(f"aund aid export: {target} appeared meanwhile; aund never overwrites a file", err=True)
            return EXIT_FAILED
    except (ConfigError, AundError) as exc:
        say(f"aund aid export: {exc}", err=True)
        return EXIT_FAILED
    except OSError as exc:
        say(f"aund aid export: {exc.filename or target}: {exc.strerror or exc}", err=True)
        return EXIT_FAILED
    say(f"exported {aid} to {target}: {1 + len(content['past_keys'])} key(s), {len(content['certs'])} "
        f"certificate(s), {len(content['prekeys']) + len(content['group_prekeys'])} prekey(s); no tokens. "
        f"Import it elsewhere with: aund aid import {aid} --from {target.name}")
    return EXIT_OK


def _seed(seed_file: Path | None, load_seed) -> bytes:
    """aund's seed: --seed-file, else $AUND_ENCRYPTION_SEED / the systemd credential, else the file
    aund.service loads it from (so the documented import works without putting the seed in the
    environment). Errors: SeedMissing (load_seed's, naming every place looked at)."""
    from aund.identity.errors import SeedMissing

    if seed_file is None:
        try:
            return load_seed()
        except SeedMissing:
            if not DEFAULT_SEED_FILE.exists():
                raise
            seed_file = DEFAULT_SEED_FILE
    try:
        data = seed_file.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise SeedMissing(f"cannot read the seed file {seed_file}: {exc.strerror or exc}") from None
    if not data:
        raise SeedMissing(f"the seed file {seed_file} is empty")
    return data


def _become_owner(state_dir: Path) -> None:
    """Run as root on a state dir that belongs to another user (the daemon's): from here on, be that
    user for good. Everything the import writes is then that user's, as if the daemon had written
    it, and root never writes where that user (who may be hostile) could point it with a symlink or
    a hard link planted in the state dir. Call after reading what only root may read (the seed
    file, the SDK's files)."""
    if os.geteuid() != 0:
        return
    owner = state_dir.stat()
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setresgid(owner.st_gid, owner.st_gid, owner.st_gid)
    os.setresuid(owner.st_uid, owner.st_uid, owner.st_uid)
