"""Inbox group commit: 200 commits one after another, then 200 at once (transactions and time).

Run: `.venv/bin/python -m tests.bench.inbox_commit` (a temp dir; nothing else is touched).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import trio

from aund.inbox import Inbox, NewEvent

COMMITS = 200


async def main() -> None:
    inbox = Inbox(Path(tempfile.mkdtemp()) / "inbox.sqlite3", os.urandom(32))
    try:
        for concurrent in (False, True):
            batches, began = inbox.batches, time.perf_counter()

            async def one(i: int) -> None:
                await inbox.commit(f"a{i % 4}.aid.test", [NewEvent("message.received", "s.aid.test",
                                                                   f"m{concurrent}-{i}", i, {"x": i})])

            async with trio.open_nursery() as nursery:
                for i in range(COMMITS):
                    if concurrent:
                        nursery.start_soon(one, i)
                    else:
                        await one(i)
            took = time.perf_counter() - began
            print(f"{'at once' if concurrent else 'one by one'}: {COMMITS} commits in {took * 1000:.0f} ms, "
                  f"{inbox.batches - batches} transactions, {took / COMMITS * 1000:.2f} ms/commit")
    finally:
        inbox.close()


if __name__ == "__main__":
    trio.run(main)
