"""List what is registered, by whom (``strataprune plugins``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("plugins", help="list registered plugins")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.contract.registry import get_registry
    from strataprune.runtime.reports import table

    registry = get_registry()
    infos = [i.as_dict() for i in registry.all()]
    if args.json:
        print(json.dumps({"plugins": infos, "skipped": [{"plugin": p, "reason": r} for p, r in registry.skipped]}, indent=2))
    else:
        print(
            table(
                [[i["name"], i["kind"], i["provided_by"], i["version"]] for i in infos],
                ["name", "kind", "provided by", "version"],
            )
        )
    return 0
