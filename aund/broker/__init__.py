"""Broker layer: the Unix socket apps talk to (listener, per-app sessions, op dispatch, policy,
quotas, event fan-out). Imports trio, structlog and client_stub; never the daemon, which it
reaches only through the ``Backend`` protocol in ``aund.broker.backend``.
"""
from aund.broker.backend import AppIdentity, Backend, InboxEvent, LinkLease
from aund.broker.limits import AppStatistics, BrokerStatistics, Limits
from aund.broker.policy import Policy
from aund.broker.server import BrokerServer, serve_broker
from aund.broker.session import DISPATCH, CallBorrower
from aund.broker.sockets import (
    DaemonAlreadyRunning, SocketPathInUse, activated_listeners, bind_unix,
    peer_credentials,
)

__all__ = [
    "AppIdentity", "AppStatistics", "Backend", "BrokerServer", "BrokerStatistics", "CallBorrower",
    "DISPATCH", "DaemonAlreadyRunning", "InboxEvent", "Limits", "Policy", "LinkLease",
    "SocketPathInUse", "activated_listeners", "bind_unix", "peer_credentials",
    "serve_broker",
]
