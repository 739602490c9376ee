"""A grid of methods into one leaderboard (``strataprune leaderboard``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("leaderboard", help="run a grid of models x allocators x pruners x sparsities into a leaderboard")
    parser.add_argument("grid", help="grid YAML (see examples/leaderboard/smollm2-135m.yaml)")
    parser.add_argument(
        "--output", help="leaderboard folder (default: the grid's output_dir, else strataprune-leaderboard/<name>)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells at once (local processes, or Ray tasks with --executor ray)")
    parser.add_argument(
        "--executor",
        choices=["local", "process", "ray"],
        default="local",
        help="local (default; a process pool when --jobs > 1), process, or ray",
    )
    parser.add_argument("--threads", type=int, help="torch threads per cell (default: cores // jobs)")
    parser.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument(
        "--merge", action="append", default=[], metavar="RESULTS.jsonl", help="merge a results file made elsewhere"
    )
    parser.add_argument("--no-run", dest="no_run", action="store_true", help="run no cell: only merge and render")
    parser.add_argument("--retry-failed", dest="retry_failed", action="store_true", help="run failed cells again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.leaderboard.grid import load_grid
    from strataprune.leaderboard.run import run_leaderboard

    grid = load_grid(args.grid)
    run_leaderboard(
        grid,
        args.output,
        jobs=args.jobs,
        executor=args.executor,
        threads=args.threads,
        ray_address=args.ray_address,
        merge=args.merge,
        run=not args.no_run,
        retry_failed=args.retry_failed,
        show_progress=not args.quiet,
    )
    return 0
