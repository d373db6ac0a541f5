"""Run the real broker over the scripted FakeBackend in its own process (fuzzing, RSS and socket
activation tests): ``python -m tests.broker.serve_fake SOCKET [--activated] [--limits JSON]``.

Prints one JSON line to stdout once serving: ``{"ready": true, "pid", "listeners", "listen_env"}``
(``listen_env``: LISTEN_* variables still set after activation; must be empty). Logs go to
stderr. SIGTERM/SIGINT: stop and exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from functools import partial

import trio

from aund import logs
from aund.broker import Limits, activated_listeners, serve_broker
from tests.broker.fakebackend import FakeBackend


async def main(args: argparse.Namespace) -> int:
    limits = Limits(**json.loads(args.limits)) if args.limits else Limits()
    backend = FakeBackend()
    kwargs: dict = {"limits": limits}
    if args.activated:
        listeners = activated_listeners()
        if not listeners:
            print(json.dumps({"ready": False, "error": "no activated listeners"}), flush=True)
            return 3
        kwargs["listeners"] = listeners
    else:
        kwargs["socket_path"] = args.socket
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_broker, backend, **kwargs))
            print(json.dumps({"ready": True, "pid": os.getpid(), "listeners": len(kwargs.get("listeners", [1])),
                              "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}), flush=True)
            async for _ in signals:
                print(json.dumps({"stopping": True, "stats": server.statistics().as_dict()}), flush=True)
                nursery.cancel_scope.cancel()
                break
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--activated", action="store_true")
    parser.add_argument("--limits")
    logs.configure(json_lines=True)
    sys.exit(trio.run(main, parser.parse_args()))
