"""What using AUN adds to an app's memory (the bench spawns it). argv: MODE ...

  stub SOCKET AID     import client_stub, connect to aund, open a session on AID (ready)
  fastaun NAME        import fastaun (aun_core), connect one stored identity (env as fastaun_worker)

Prints one JSON line of RSS bytes: {"base": before the import, "imported": after it,
"connected": once connected, "threads": thread count then}, then waits for a line on stdin
(so the bench can read the daemon's side while the connection is open).
"""
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def report(base, imported, connected):
    import json

    print(json.dumps({"base": base, "imported": imported, "connected": connected, "threads": threads()}), flush=True)
    sys.stdin.readline()


def stub(sock, aid):
    base = rss()
    import client_stub

    imported = rss()
    client = client_stub.Client(sock, app="mem-probe")
    client.session(aid).wait_ready(timeout=30)
    report(base, imported, rss())
    client.close()


def fastaun(name):
    base = rss()
    import asyncio

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fastaun_worker as fw  # imports aun_core (and only that)

    imported = rss()

    async def main():
        await fw.cmd_open(name)
        connected = rss()
        report(base, imported, connected)  # blocks the loop while the bench looks: fine for a probe
        await fw.cmd_close(name)

    asyncio.run(main())


if __name__ == "__main__":
    {"stub": stub, "fastaun": fastaun}[sys.argv[1]](*sys.argv[2:])
