"""Prune a model: the main job (``strataprune run``)."""

from __future__ import annotations

import argparse
from typing import Any

from strataprune.commands.flags import build_recipe, recipe_flags, zeroshot_flags


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("run", help="prune a model (the main job)")
    recipe_flags(parser)
    parser.add_argument("--output", help="output directory")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier strataprune output (never a folder strataprune did not write)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--recovery", help="fine-tune to recover accuracy: losa, lora or none (see `strataprune plugins`)")
    zeroshot_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.engine.preflight import preflight

    recipe = build_recipe(args)
    output = recipe.output_dir or recipe.default_output_dir()
    preflight(
        recipe, output, args.overwrite, command="run", inputs={"the recipe": args.recipe}
    )  # before the heavy imports and any work
    from strataprune.engine.pipeline import Pipeline
    from strataprune.engine.run_report import summary

    result = Pipeline(recipe, show_progress=not args.quiet).run(output, overwrite=args.overwrite)
    print(summary(result.report))
    print(f"\nwrote {result.output_dir}/ (model, allocation.json, report.json, recipe.yaml)")
    return 0
