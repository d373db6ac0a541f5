"""`aund config show [--json]`: the effective configuration, each value with its source."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from aund.cli._common import EXIT_FAILED, EXIT_OK, print_json, say


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="show", required=True)
    show = sub.add_parser("show", help="print the merged configuration and where each value comes from")
    show.add_argument("--config", type=Path)
    show.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from aund.config import ConfigError, load

    try:
        config = load(args.config)
    except ConfigError as exc:
        say(f"aund config: {exc}", err=True)
        return EXIT_FAILED
    shown = config.redacted()
    if args.json:
        print_json(shown)
        return EXIT_OK
    width = max(len(k) for k in shown)
    for key, item in shown.items():
        say(f"{key.ljust(width)}  {json.dumps(item['value'])}  # {item['source']}")
    return EXIT_OK
