"""Engines that need their own environment (``strataprune backends install deepsparse``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("backends", help="manage engines that need their own environment")
    bsub = parser.add_subparsers(dest="backends_command", required=True)
    inst = bsub.add_parser("install", help="install an engine into its own venv in the cache (deepsparse)")
    inst.add_argument("name", choices=["deepsparse"])
    inst.set_defaults(func=install)


def install(args: argparse.Namespace) -> int:
    from strataprune.deploy.engine_env import install

    install(args.name, log=lambda m: print(f"[install] {m}", file=sys.stderr))
    return 0
