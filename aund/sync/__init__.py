"""Sans-IO cursor state machines for aund's inbound streams (see `aund.sync.core`)."""

from aund.sync.core import AckUpstream, Commit, Drop, Pull, Skip, Stream, SyncCore

__all__ = ["AckUpstream", "Commit", "Drop", "Pull", "Skip", "Stream", "SyncCore"]
