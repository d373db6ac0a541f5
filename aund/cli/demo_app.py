"""The two apps of `aund demo`, and a minimal example of an app using aund through client_stub.

    python -m aund.cli.demo_app alice|bob SOCKET MY_AID PEER_AID

Each app holds nothing but a socket: aund owns the keys, the gateway link and the E2EE.
bob sends first and waits for the answer; alice waits for bob's message and answers it.
"""
from __future__ import annotations

import sys

from client_stub import Client


def main(role: str, socket_path: str, me: str, peer: str) -> int:
    with Client(socket_path, app=f"demo-{role}") as aund:
        info = aund.ensure_identity(me)  # load, register only if absent, load again
        session = aund.session(me)
        session.wait_ready(timeout=30)
        session.set_protected_headers({"app": f"demo-{role}"})  # signed into every E2EE send
        print(f"{role}: {me} ready (cert {info['cert_fingerprint'][:23]}...)", flush=True)
        with session.events(consumer=f"demo-{role}", kinds=("message.received",), start="last_ack") as events:
            if role == "bob":
                r = session.call("message.send", {"to": peer, "payload": {"type": "text", "text": "hello alice"}})
                print(f"bob -> alice: 'hello alice' ({r['status']}, seq {r['seq']}, end-to-end encrypted)", flush=True)
            for event in events:
                d = event.data
                text = (d.get("payload") or {}).get("text")
                print(f"{role} <- {d['from'].split('.')[0]}: {text!r} (encrypted={d['encrypted']}, "
                      f"verified headers={ {k: v for k, v in d['protected_headers'].items() if k == 'app'} })",
                      flush=True)
                event.ack()
                if role == "alice":
                    r = session.call("message.send", {"to": peer, "payload": {"type": "text",
                                                                              "text": f"got '{text}', hi bob"}})
                    print(f"alice -> bob: reply ({r['status']}, seq {r['seq']})", flush=True)
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
