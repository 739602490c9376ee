"""The ``strataprune`` command: run, eval, allocate, plugins.

    strataprune run                      # the embedded default: SmolLM2-135M, BBC News, Wanda, uniform 50%
    strataprune run recipe.yaml --sparsity 0.6 --output out/
    strataprune eval out/
    strataprune plugins --json
    strataprune leaderboard grid.yaml --jobs 2

Errors caused by input print one line (``error: ...``) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .core.errors import StrataPruneError

#: run/allocate flags -> recipe keys they override
FLAG_KEYS = {
    "model": "model.source",
    "device": "model.device",
    "offload": "model.offload",
    "activation_dtype": "calibration.activation_dtype",
    "activation_dir": "calibration.activation_dir",
    "dtype": "model.dtype",
    "sparsity": "sparsity",
    "calibration": "calibration.source",
    "nsamples": "calibration.nsamples",
    "seqlen": "calibration.seqlen",
    "seed": "calibration.seed",
    "propagate": "calibration.propagate",
    "eval_data": "evaluation.source",
    "eval_seqlen": "evaluation.seqlen",
    "eval_windows": "evaluation.max_windows",
    "output": "output_dir",
}


def _recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default: the embedded default job)")
    parser.add_argument("--model", help="embedded name (smollm2-135m), model folder, .gguf file or hub id")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N, or auto (spread over all GPUs)")
    parser.add_argument("--offload", action="store_true", default=None, help="one block in memory at a time, the rest read from disk")
    parser.add_argument("--activation-dtype", dest="activation_dtype", help="calibration activations: float32, bfloat16 or float16")
    parser.add_argument("--activation-dir", dest="activation_dir", help="keep calibration activations in files in this folder")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--allocator", help="allocator name (see `strataprune plugins`)")
    parser.add_argument("--pruner", help="pruner name (see `strataprune plugins`)")
    parser.add_argument("--sparsity", help="target ratio in [0, 1) or an N:M pattern like 2:4")
    parser.add_argument("--calibration", help="calibration text: dataset name (bbc) or text file path")
    parser.add_argument("--nsamples", type=int, help="calibration samples")
    parser.add_argument("--seqlen", type=int, help="calibration tokens per sample")
    parser.add_argument("--seed", type=int, help="calibration sampling seed")
    parser.add_argument("--propagate", help="pruned (default: block l sees pruned blocks < l) or dense")
    parser.add_argument("--eval-data", dest="eval_data", help="evaluation text: dataset name or text file path")
    parser.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="tokens per evaluation window")
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, help="number of evaluation windows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any recipe key, e.g. allocator.beta=0.01")


def build_recipe(args: argparse.Namespace) -> Any:
    from .core.recipes import apply_overrides, load_recipe, parse_set

    recipe = load_recipe(args.recipe)
    overrides: dict[str, Any] = {key: getattr(args, flag, None) for flag, key in FLAG_KEYS.items()}
    if overrides.get("sparsity") is not None and ":" not in overrides["sparsity"]:
        try:
            overrides["sparsity"] = float(overrides["sparsity"])
        except ValueError:
            from .core.errors import ConfigError

            raise ConfigError(f"--sparsity {overrides['sparsity']!r} must be a number in [0, 1) or an N:M pattern like 2:4") from None
    for kind in ("allocator", "pruner"):
        name = getattr(args, kind, None)
        if name is not None and name != getattr(recipe, kind).name:
            overrides[kind] = name  # another plugin: its own defaults, not the recipe's parameters
    overrides.update(parse_set(args.set))
    return apply_overrides(recipe, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from .core.pipeline import Pipeline, summary

    recipe = build_recipe(args)
    result = Pipeline(recipe, show_progress=not args.quiet).run(recipe.output_dir or recipe.default_output_dir(), overwrite=args.overwrite)
    print(summary(result.report))
    print(f"\nwrote {result.output_dir}/ (model, allocation.json, report.json, recipe.yaml)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .core.data import evaluation_windows, open_dataset
    from .core.evaluation import perplexity
    from .core.models import load_model

    loaded = load_model(args.model_dir, device=args.device)
    bos = args.bos == "always" or (args.bos == "auto" and loaded.adapter.bos_per_window(loaded.model))
    windows = evaluation_windows(loaded.tokenizer, open_dataset(args.data), args.split, args.seqlen, args.windows, bos)
    result = perplexity(loaded.model, windows.ids, "perplexity", not args.quiet)
    result["data"] = windows.description
    print(json.dumps(result, indent=2) if args.json else f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows of {result['seqlen']})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .core.registry import get_registry
    from .core.reports import table

    registry = get_registry()
    infos = [i.as_dict() for i in registry.all()]
    if args.json:
        print(json.dumps({"plugins": infos, "skipped": [{"plugin": p, "reason": r} for p, r in registry.skipped]}, indent=2))
    else:
        print(table([[i["name"], i["kind"], i["provided_by"], i["version"]] for i in infos], ["name", "kind", "provided by", "version"]))
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from .core.allocate import compare_allocators

    recipe = build_recipe(args)
    names = [n.strip() for n in (args.allocators or recipe.allocator.name).split(",") if n.strip()]
    compare_allocators(recipe, names, args.output or "strataprune-allocations", overwrite=args.overwrite, show_progress=not args.quiet)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard.grid import load_grid
    from .leaderboard.run import run_leaderboard

    grid = load_grid(args.grid)
    run_leaderboard(
        grid, args.output, jobs=args.jobs, executor=args.executor, threads=args.threads, ray_address=args.ray_address,
        merge=args.merge, run=not args.no_run, retry_failed=args.retry_failed, show_progress=not args.quiet,
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="strataprune", description="Layer-wise sparsity allocation and pruning for large models.")
    parser.add_argument("--version", action="version", version=f"strataprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prune a model (the main job)")
    _recipe_flags(run)
    run.add_argument("--output", help="output directory")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="perplexity of a saved model")
    ev.add_argument("model_dir", help="model folder (e.g. the output of `strataprune run`), .gguf file or embedded name")
    ev.add_argument("--data", default="bbc", help="dataset name or text file (default: bbc)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--seqlen", type=int, default=512)
    ev.add_argument("--windows", type=int, default=40, help="number of windows (default 40)")
    ev.add_argument("--bos", choices=["auto", "always", "never"], default="auto")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plugins", help="list registered plugins")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=cmd_plugins)

    al = sub.add_parser("allocate", help="compute and compare allocations without pruning")
    _recipe_flags(al)
    al.add_argument("--allocators", help="comma-separated allocators, each NAME or NAME:key=value:... (default: the recipe's)")
    al.add_argument("--output", help="output directory (default: strataprune-allocations)")
    al.add_argument("--overwrite", action="store_true")
    al.add_argument("--quiet", action="store_true")
    al.set_defaults(func=cmd_allocate)

    lb = sub.add_parser("leaderboard", help="run a grid of models x allocators x pruners x sparsities into a leaderboard")
    lb.add_argument("grid", help="grid YAML (see examples/leaderboard/smollm2.yaml)")
    lb.add_argument("--output", help="leaderboard folder (default: the grid's output_dir, else strataprune-leaderboard/<name>)")
    lb.add_argument("--jobs", type=int, default=1, help="cells at once (local processes, or Ray tasks with --executor ray)")
    lb.add_argument("--executor", choices=["local", "process", "ray"], default="local",
                    help="local (default; a process pool when --jobs > 1), process, or ray")
    lb.add_argument("--threads", type=int, help="torch threads per cell (default: cores // jobs)")
    lb.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: start a local Ray instance)")
    lb.add_argument("--merge", action="append", default=[], metavar="RESULTS.jsonl", help="merge a results file made elsewhere")
    lb.add_argument("--no-run", dest="no_run", action="store_true", help="run no cell: only merge and render")
    lb.add_argument("--retry-failed", dest="retry_failed", action="store_true", help="run failed cells again")
    lb.add_argument("--quiet", action="store_true", help="no progress bars")
    lb.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StrataPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
