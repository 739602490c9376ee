"""Compare allocators without pruning (``strataprune allocate``)."""

from __future__ import annotations

import argparse
from typing import Any

from strataprune.commands.flags import build_recipe, recipe_flags


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("allocate", help="compute and compare allocations without pruning")
    recipe_flags(parser)
    parser.add_argument(
        "--allocators", help="comma-separated allocators, each NAME or NAME:key=value:... (default: the recipe's)"
    )
    parser.add_argument("--output", help="output directory (default: strataprune-allocations)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier strataprune output (never a folder strataprune did not write)",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.engine.preflight import preflight
    from strataprune.engine.recipe import parse_allocator_specs

    recipe = build_recipe(args)
    specs = [n.strip() for n in (args.allocators or recipe.allocator.name).split(",") if n.strip()]
    output = args.output or "strataprune-allocations"
    preflight(
        recipe,
        output,
        args.overwrite,
        command="allocate",
        allocators=parse_allocator_specs(specs),
        inputs={"the recipe": args.recipe},
    )
    from strataprune.engine.allocator_comparison import compare_allocators

    compare_allocators(recipe, specs, output, overwrite=args.overwrite, show_progress=not args.quiet)
    return 0
