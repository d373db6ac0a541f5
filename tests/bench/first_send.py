"""A tiny app (the bench spawns it): import client_stub, connect, open a session, send one
message through aund, print the wall clock at the reply. argv: SOCKET AID TO.

Prints one JSON line {"t_reply": time.time() at the reply, "import_seconds": in-process import
of client_stub, "status": the send's status}.
"""
import time

T0 = time.perf_counter()
import client_stub  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - T0

import json  # noqa: E402
import sys  # noqa: E402

sock, aid, to = sys.argv[1:4]
with client_stub.Client(sock, app="first-send") as aund:
    reply = aund.session(aid).call("message.send", {"to": to, "payload": {"type": "text", "text": "first"},
                                                   "encrypt": False})
    t_reply = time.time()
print(json.dumps({"t_reply": t_reply, "import_seconds": IMPORT_SECONDS, "status": reply.get("status")}))
