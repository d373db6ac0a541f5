"""`aund backup --to DIR`: a consistent copy of the state dir, also while the daemon runs.

Offline (it reads the state dir itself, it is no op of the daemon): SQLite's online backup API
works from a second connection in another process (the inbox is in WAL mode, so the copy is one
consistent snapshot while the daemon keeps writing), and the identity files are each replaced
atomically, so a plain copy of each is whole. Going through the daemon would make it write files
where a socket client names them, as the daemon's user, and would need an op the policy hands
out; offline, the backup can do no more than the person running it (root, or the daemon's user)
can do anyway. The seed is not needed (the files are copied encrypted, as they are) and never
copied: it does not live in the state dir, and a file named like it is left out.

What is copied: every regular file under the state dir (identities, `.kdf.json`, `.device_id`,
trust roots, caches), SQLite databases through the backup API; not the lock file, the SQLite
side files (-wal, -shm, -journal), temp files, sockets or symbolic links. DIR is created 0700
(an existing DIR must be empty), every file 0600, every directory 0700.
"""
from __future__ import annotations

import argparse
import os
import stat
import time
from pathlib import Path

from aund.cli._common import EXIT_FAILED, EXIT_OK, say

SQLITE_MAGIC = b"SQLite format 3\x00"
SKIP_NAMES = frozenset({"aund.lock", "encryption_seed", "seed"})  # the lock; never a seed
SKIP_SUFFIXES = ("-wal", "-shm", "-journal")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", dest="target", type=Path, required=True, metavar="DIR",
                   help="where the copy goes: created 0700, or an existing empty directory")
    p.add_argument("--state-dir", type=Path, help="aund's state dir (default: from config)")
    p.add_argument("--config", type=Path)
    p.epilog = ("Restore: stop aund, move the damaged state dir aside (never delete it), copy DIR's contents "
                "into a fresh state dir owned by the daemon's user, start aund with the same seed.")


class BackupRefused(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    from aund.config import ConfigError, load
    from aund.errors import AundError

    os.umask(0o077)
    try:
        config = load(args.config, {"state_dir": args.state_dir})
        copied, databases, skipped = backup(config.state_dir, args.target)
    except (ConfigError, AundError, BackupRefused) as exc:
        say(f"aund backup: {exc}", err=True)
        return EXIT_FAILED
    # an OSError (a full disk, a bad path) is named by aund.cli.main's one-line handler
    say(f"backed up {config.state_dir} to {args.target}: {copied} file(s), databases "
        f"{', '.join(f'{name} ({pages} pages)' for name, pages in databases) or 'none'}"
        + (f"; left out {len(skipped)} (sockets, links, lock, seed)" if skipped else ""))
    return EXIT_OK


def backup(state_dir: Path, target: Path) -> tuple[int, list[tuple[str, int]], list[str]]:
    """Copy `state_dir` into `target` (see the module docstring): (files copied, [(database,
    pages)], [left out]). Errors: BackupRefused (not a state dir, DIR not empty), OSError."""
    from aund.identity.errors import StateDirLocked
    from aund.identity.store import StateLock

    if not ((state_dir / ".kdf.json").exists() or (state_dir / "AIDs").is_dir()):
        raise BackupRefused(f"{state_dir} is not an aund state dir (no .kdf.json, no AIDs/); give --state-dir")
    _make_target(target)
    lock = None
    if (state_dir / "aund.lock").exists():  # never create it: the daemon's user must own it
        try:
            lock = StateLock(state_dir).acquire()  # the daemon is stopped: keep it so while we copy
        except StateDirLocked:
            lock = None  # it runs: its WAL files exist, and SQLite's backup reads a snapshot beside it
    try:
        return _copy_tree(state_dir, target, quiet=lock is not None or not (state_dir / "aund.lock").exists())
    finally:
        if lock is not None:
            lock.release()


def _make_target(target: Path) -> None:
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        if not target.is_dir() or target.is_symlink():
            raise BackupRefused(f"{target} exists and is not a directory; give a new or empty directory") from None
        if any(target.iterdir()):
            raise BackupRefused(f"{target} is not empty; aund backs up only into a new or empty directory "
                                "(it never writes over files)") from None
    os.chmod(target, 0o700)


def _copy_tree(state_dir: Path, target: Path, *, quiet: bool) -> tuple[int, list[tuple[str, int]], list[str]]:
    from aund.identity.store import create_once

    copied, databases, skipped = 0, [], []
    for root, dirs, files in os.walk(state_dir, followlinks=False):
        here = Path(root)
        rel = here.relative_to(state_dir)
        if here != state_dir and here.resolve() == target.resolve():
            dirs.clear()  # a DIR inside the state dir is not copied into itself
            continue
        out_dir = target / rel
        for d in list(dirs):
            if (here / d).is_symlink() or (here / d).resolve() == target.resolve():
                dirs.remove(d)
                skipped.append(str(rel / d))
            else:
                os.mkdir(out_dir / d, 0o700)
                os.chmod(out_dir / d, 0o700)
        for name in sorted(files):
            src = here / name
            st = os.lstat(src)
            if (not stat.S_ISREG(st.st_mode) or name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES)
                    or (name.startswith(".") and ".tmp-" in name)):
                skipped.append(str(rel / name))
                continue
            try:
                fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:  # renamed meanwhile by the running daemon (a registration finished)
                skipped.append(str(rel / name))
                continue
            with os.fdopen(fd, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
                if head == SQLITE_MAGIC:
                    databases.append((str(rel / name), _backup_database(src, out_dir / name, quiet=quiet)))
                    copied += 1
                    continue
                data = head + f.read()
            if not create_once(out_dir / name, data, 0o600):
                raise BackupRefused(f"{out_dir / name} appeared while copying; aund never writes over a file")
            copied += 1
    return copied, databases, skipped


def _backup_database(src: Path, dst: Path, *, quiet: bool) -> int:
    """SQLite's online backup of `src` into the new file `dst` (0600, fsynced); returns its pages.
    `quiet`: no daemon writes it (we hold its lock, or none ever ran), so it is opened immutable
    and nothing (no -wal, -shm) is created beside it; else read-only beside the running daemon."""
    import sqlite3  # here, not at import: every `aund` command builds the whole parser

    uri = src.resolve().as_uri() + ("?mode=ro&immutable=1" if quiet else "?mode=ro")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        source = sqlite3.connect(uri, uri=True, timeout=30.0)
        try:
            copy = sqlite3.connect(tmp)
            try:
                for attempt in range(50):
                    try:
                        source.backup(copy, pages=1024, sleep=0.01)
                        break
                    except sqlite3.OperationalError as exc:  # busy: the daemon is checkpointing
                        if "locked" not in str(exc) and "busy" not in str(exc):
                            raise
                        time.sleep(0.05 * (attempt + 1))
                copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                pages = copy.execute("PRAGMA page_count").fetchone()[0]
                ok = copy.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                copy.close()
        finally:
            source.close()
        if ok != "ok":
            raise BackupRefused(f"the copy of {src} does not pass SQLite's check ({ok}); the original is untouched")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.link(tmp, dst)  # never over an existing file
        dir_fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except sqlite3.Error as exc:
        raise BackupRefused(f"cannot copy the database {src}: {exc}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return pages
