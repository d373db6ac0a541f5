"""`aund completion bash|zsh|tcsh`: a completion script for the shell, generated from the command
line itself by shtab (so it never drifts from the real options). Install, e.g. for bash:
`aund completion bash | sudo tee /etc/bash_completion.d/aund`."""
from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "tcsh")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=SHELLS)


def run(args: argparse.Namespace) -> int:
    import sys

    import shtab

    from aund.cli import build_parser

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0
