"""Broker layer: the per-app quotas and global limits of the app socket, and the frozen statistics
the server reports. Pure dataclasses (imports client_stub.wire for the frame bounds only).

An *app* is one connection (one ``AppConnection``): quotas are per connection, per uid (all of one
user's connections together) and global; ``max_connections`` caps how many connections exist at
once. The daemon's ``[limits]`` table sets any field (``Limits.from_table``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from client_stub import wire


@dataclass(frozen=True)
class Limits:
    """Quotas and bounds of the broker; every field must be positive.

    - ``max_connections``: app connections at once; the next one gets ``LimitsExceeded`` and is closed.
    - ``max_frame``: the largest frame either way (an app may ask for less in ``hello``).
    - ``calls_per_app``: ``call`` requests in flight per connection.
    - ``requests_per_app``: requests of any op in flight per connection (bounds its tasks).
    - ``subscriptions_per_app`` / ``sessions_per_app``: open at once per connection.
    - ``outbox_bytes_per_app``: encoded frames waiting to be written to one app. Event pumps wait
      while it is full; replies may overshoot it by at most ``max_frame`` before the connection
      is closed (``broker.outbox_overflow``).
    - ``stall_timeout``: a connection whose outbox stays full this long (the app stopped reading)
      is closed (``broker.consumer_stalled``); its events stay in the durable inbox.
    - ``global_calls``: gateway calls in flight across all apps and links (the daemon's one
      ``aund.aun.budget.CallBudget``; a standalone broker makes a ``trio.CapacityLimiter``).
    - ``call_queue_timeout``: the longest wait for a global call slot when a call has no timeout.
    - ``max_call_timeout``: the largest ``timeout`` a call may ask for, in seconds.
    - ``release_grace``: shielded time to release an app's sessions and subscriptions once it left.
    - ``hello_timeout``: a connection that has not said ``hello`` this long is closed.
    - ``connections_per_uid``: connections at once of one uid, so one user cannot lock the others out.
    - ``calls_per_uid`` / ``calls_per_aid``: global call slots one uid / one AID may hold at once;
      further calls wait (within their timeout) for one of their own, so a slow AID or a busy user
      leaves the rest of the global budget to the others.
    - ``links_per_app`` / ``links_per_uid``: distinct (AID, slot) gateway links one connection /
      one uid may hold open through its sessions.
    """

    max_connections: int = 256
    max_frame: int = wire.DEFAULT_MAX_FRAME
    calls_per_app: int = 64
    requests_per_app: int = 256
    subscriptions_per_app: int = 16
    sessions_per_app: int = 64
    outbox_bytes_per_app: int = 1 << 20
    stall_timeout: float = 10.0
    global_calls: int = 256
    call_queue_timeout: float = 30.0
    max_call_timeout: float = 600.0
    release_grace: float = 5.0
    hello_timeout: float = 10.0
    connections_per_uid: int = 64
    calls_per_uid: int = 128
    calls_per_aid: int = 64
    links_per_app: int = 16
    links_per_uid: int = 32

    @classmethod
    def from_table(cls, table: Any) -> "Limits":
        """Limits from a config table ({field: value}); ValueError names an unknown or bad key."""
        if not isinstance(table, dict):
            raise ValueError("[limits] must be a table")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ValueError(f"unknown key {key!r} (known: {', '.join(sorted(known))})")
            default = getattr(cls(), key)
            if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
            values[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
        return cls(**values)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")
        if self.max_frame > wire.HARD_MAX_FRAME:
            raise ValueError(f"Limits.max_frame must be <= {wire.HARD_MAX_FRAME}")
        if self.calls_per_app > self.requests_per_app:
            raise ValueError("Limits.calls_per_app must be <= requests_per_app")


    def per_app(self) -> dict[str, Any]:
        """The quotas an app sees in the hello reply."""
        return {"calls": self.calls_per_app, "requests": self.requests_per_app,
                "subscriptions": self.subscriptions_per_app, "sessions": self.sessions_per_app,
                "outbox_bytes": self.outbox_bytes_per_app}


@dataclass(frozen=True)
class AppStatistics:
    """One connected app (one connection)."""

    conn_id: int
    pid: int
    uid: int
    gid: int
    app: str
    protocol: int | None
    requests_in_flight: int
    calls_in_flight: int
    subscriptions: int
    sessions: int
    bytes_buffered: int


@dataclass(frozen=True)
class BrokerStatistics:
    """The whole socket server; ``as_dict()`` is JSON-safe (merged into ``status``)."""

    connections: int
    max_connections: int
    apps: tuple[AppStatistics, ...]
    calls_in_flight: int
    calls_waiting: int
    global_calls: int
    connections_total: int
    connections_rejected: int
    protocol_violations: int
    stalled_disconnects: int

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["apps"] = [asdict(a) for a in self.apps]
        return d
