"""``session.storage``: the AID's AUN Storage through aund (uploads, downloads, list, ACL, shares).

Uploads and downloads move through the daemon in bounded chunks (the ``storage.upload.*`` and
``storage.download.*`` ops, docs/storage.md): the daemon talks to the gateway and its data plane
and holds the access token a private download needs; the app only sees bytes and object views.
The rest are plain gateway calls (``storage.fs.list``, ``storage.set_acl``, ...) by the ordinary
call path, with the path given as the SDK does (no leading ``/``).

Each operation is written once, as ``AsyncStorage`` in ``client_stub/_async/storage.py``;
``Storage`` (blocking) is generated from it into ``client_stub/_sync/storage.py`` by
``scripts/unasync.py``, so both behave alike. This module only gathers the names.
"""
from __future__ import annotations

from client_stub._async.storage import CHUNK_WAIT, GATEWAY_WAIT, READ_SIZE, AsyncStorage  # noqa: F401
from client_stub._sync.storage import Storage

__all__ = ["Storage", "AsyncStorage"]
