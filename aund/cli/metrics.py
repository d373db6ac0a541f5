"""`aund metrics [--textfile PATH]`: the daemon's state as metrics, in the OpenMetrics text format
on stdout, or written (atomically) to PATH in the Prometheus text format that node-exporter's
textfile collector reads (run it from a timer; e.g. PATH=/var/lib/node_exporter/aund.prom).

What is measured is what `status` reports; the formats are prometheus_client's."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aund.cli._common import EXIT_OK, add_socket_argument, open_client, unreachable

# aund.aun.link.LinkState's values (the CLI does not import the daemon's stack; a test keeps them equal)
LINK_STATES = ("no_identity", "standby", "authenticated", "connecting", "ready", "retry_backoff", "reconnecting",
               "connection_failed", "closed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_socket_argument(p)
    p.add_argument("--textfile", type=Path, metavar="PATH",
                   help="write node-exporter's textfile format to PATH (atomically) instead of printing")


def run(args: argparse.Namespace) -> int:
    from client_stub import DaemonUnavailable

    try:
        with open_client(args) as client:
            status = client.status()
    except DaemonUnavailable as exc:
        return unreachable(exc)
    registry = registry_of(status)
    if args.textfile is not None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(args.textfile), registry)  # an OSError is named by aund.cli.main
    else:
        import sys

        from prometheus_client.openmetrics.exposition import generate_latest

        sys.stdout.write(generate_latest(registry).decode("utf-8"))
    return EXIT_OK


def registry_of(status: dict[str, Any]):
    """A prometheus_client registry holding one snapshot of `status`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Snapshot:
        def collect(self):
            links = status.get("links") or []
            broker = status.get("broker") or {}
            budget = status.get("budget") or {}
            yield GaugeMetricFamily("aund_up", "1 while the daemon answers", value=1)
            yield GaugeMetricFamily("aund_identities", "identities in the store", value=status.get("identities", 0))
            by_state = GaugeMetricFamily("aund_links", "gateway links by state", labels=["state"])
            states = [link.get("state", "") for link in links]
            for state in sorted(set(LINK_STATES) | set(states)):
                by_state.add_metric([state], states.count(state))
            yield by_state
            per_link = {
                "reconnects": CounterMetricFamily("aund_link_reconnects", "reconnects of a link", labels=["aid", "slot"]),
                "rpcs": CounterMetricFamily("aund_link_rpcs", "RPCs started on a link", labels=["aid", "slot"]),
                "in_flight": GaugeMetricFamily("aund_link_rpcs_in_flight", "RPCs in flight on a link (at most 16)",
                                               labels=["aid", "slot"]),
                "queued": GaugeMetricFamily("aund_link_rpcs_queued", "RPCs waiting for the link's budget",
                                            labels=["aid", "slot"]),
                "holders": GaugeMetricFamily("aund_link_apps", "app sessions holding a link", labels=["aid", "slot"]),
            }
            for link in sorted(links, key=lambda x: (x.get("aid", ""), x.get("slot_id", ""))):
                for key, family in per_link.items():
                    family.add_metric([link.get("aid", ""), link.get("slot_id", "")], link.get(key, 0) or 0)
            yield from per_link.values()
            yield GaugeMetricFamily("aund_apps_connected", "app connections",
                                    value=len(broker.get("apps") or []))
            yield GaugeMetricFamily("aund_app_calls_in_flight", "app calls in flight",
                                    value=broker.get("calls_in_flight", 0))
            yield GaugeMetricFamily("aund_app_calls_waiting", "app calls waiting for a call slot",
                                    value=broker.get("calls_waiting", 0))
            yield CounterMetricFamily("aund_app_connections", "app connections accepted",
                                      value=broker.get("connections_total", 0))
            yield CounterMetricFamily("aund_app_connections_rejected", "app connections refused",
                                      value=broker.get("connections_rejected", 0))
            yield GaugeMetricFamily("aund_budget_in_use", "daemon-wide RPC budget in use", value=budget.get("in_use", 0))
            yield GaugeMetricFamily("aund_budget_total", "daemon-wide RPC budget", value=budget.get("total", 0))
            depth = GaugeMetricFamily("aund_inbox_events", "events held in the inbox", labels=["aid"])
            for aid, count in sorted((status.get("inbox") or {}).items()):
                depth.add_metric([aid], count)
            yield depth
            written = CounterMetricFamily("aund_inbox_written_events", "events written to the inbox since start",
                                          labels=["aid"])
            for aid, count in sorted((status.get("inbox_written") or {}).items()):
                written.add_metric([aid], count)
            yield written
            warnings = GaugeMetricFamily("aund_warnings", "current warnings by code", labels=["code"])
            codes = [w.get("code", "") for w in status.get("warnings") or []]
            for code in sorted(set(codes)):
                warnings.add_metric([code], codes.count(code))
            yield warnings

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return registry
