"""`aund aid list|ensure|import`: identities. list/ensure go through the daemon; import moves an
identity made by the official SDK into aund's store (with the daemon stopped: it owns the store)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aund.cli._common import EXIT_FAILED, EXIT_OK, add_socket_argument, open_client, print_json, table, unreachable

DEFAULT_SEED_FILE = Path("/etc/aund/encryption_seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="aid_command", metavar="list|ensure|import", required=True)
    lst = sub.add_parser("list", help="identities in the daemon's store")
    add_socket_argument(lst)
    lst.add_argument("--json", action="store_true")
    ens = sub.add_parser("ensure", help="load, register if absent, load again")
    add_socket_argument(ens)
    ens.add_argument("aid")
    ens.add_argument("--json", action="store_true")
    imp = sub.add_parser("import", help="import an identity created by fastaun (aund must be stopped)")
    imp.add_argument("aid")
    imp.add_argument("--from", dest="aun_path", type=Path, required=True, help="the SDK's aun_path")
    imp.add_argument("--state-dir", type=Path, help="aund's state dir (default: from config)")
    imp.add_argument("--config", type=Path)
    imp.add_argument("--seed-file", type=Path,
                     help=f"aund's encryption seed (default: $AUND_ENCRYPTION_SEED, else {DEFAULT_SEED_FILE})")
    imp.epilog = ("The SDK's seed is read from AUND_IMPORT_SEED (\"\" if unset); aund's from --seed-file, "
                  f"AUND_ENCRYPTION_SEED or {DEFAULT_SEED_FILE} (the file aund.service loads). Run as root on a "
                  "state dir of another user (the daemon's), the import reads the seed and the SDK's files as "
                  "root, then writes the state dir as that user.")


def run(args: argparse.Namespace) -> int:
    if args.aid_command == "import":
        return _import(args)
    from client_stub import AundError, DaemonUnavailable

    try:
        with open_client(args, timeout=60) as client:
            result = client.list_identities() if args.aid_command == "list" else client.ensure_identity(args.aid)
    except DaemonUnavailable as exc:
        return unreachable(exc)
    except AundError as exc:
        print(f"aund aid {args.aid_command}: {type(exc).__name__}: {exc.message or exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json(result)
    elif args.aid_command == "list":
        rows = [[i["aid"], ", ".join(f"{link['slot_id']}:{link['state']}" for link in i.get("links", [])) or "-"]
                for i in result]
        print(table(rows, ["AID", "LINKS"]) if rows else "no identities")
    else:
        print(f"{result['aid']}  {result['cert_fingerprint']}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    from aund.config import ConfigError, load
    from aund.errors import AundError
    from aund.identity.store import IdentityStore, StateLock, load_seed, read_fastaun

    os.umask(0o077)
    try:
        config = load(args.config, {"state_dir": args.state_dir})
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = _seed(args.seed_file, load_seed)
        found = read_fastaun(args.aun_path, args.aid.strip().lower(), os.environ.get("AUND_IMPORT_SEED", ""))
        _become_owner(config.state_dir)
        with StateLock(config.state_dir):
            store = IdentityStore(config.state_dir, seed)
            store.verify_seed()
            identity = store.import_read(found, meta={"imported_from": "fastaun"})
    except (ConfigError, AundError) as exc:
        print(f"aund aid import: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"aund aid import: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"imported {identity.aid}  {identity.cert_fingerprint}")
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
