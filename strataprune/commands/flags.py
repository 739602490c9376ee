"""Flags shared by several commands, and the recipe they build."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from strataprune.contract.errors import ConfigError

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
    "threads": "threads",
    "tasks": "evaluation.tasks",
    "limit": "evaluation.task_limit",
    "include_path": "evaluation.task_include_path",
}


def recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default: the embedded default job)")
    parser.add_argument("--model", help="embedded name (smollm2-135m), model folder, .gguf file or hub id")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N, or auto (spread over all GPUs)")
    parser.add_argument(
        "--offload", action="store_true", default=None, help="one block in memory at a time, the rest read from disk"
    )
    parser.add_argument(
        "--activation-dtype", dest="activation_dtype", help="calibration activations: float32, bfloat16 or float16"
    )
    parser.add_argument("--activation-dir", dest="activation_dir", help="keep calibration activations in files in this folder")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--allocator", help="allocator name (see `strataprune plugins`)")
    parser.add_argument("--pruner", help="pruner name (see `strataprune plugins`)")
    parser.add_argument(
        "--sparsity",
        help="target ratio in [0, 1), or N:M = keep N of every M weights (NVIDIA's notation: "
        "2:4 is 50%%, 1:4 is 75%% sparse; the paper repos' n:m counts pruned weights instead)",
    )
    parser.add_argument("--calibration", help="calibration text: dataset name (bbc) or text file path")
    parser.add_argument("--nsamples", type=int, help="calibration samples")
    parser.add_argument("--seqlen", type=int, help="calibration tokens per sample")
    parser.add_argument("--seed", type=int, help="calibration sampling seed")
    parser.add_argument("--propagate", help="pruned (default: block l sees pruned blocks < l) or dense")
    parser.add_argument("--eval-data", dest="eval_data", help="evaluation text: dataset name or text file path")
    parser.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="tokens per evaluation window")
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, help="number of evaluation windows")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="set any recipe key, e.g. allocator.beta=0.01"
    )
    threads_flag(parser)


def threads_flag(
    parser: argparse.ArgumentParser, help: str = "torch CPU threads (default: auto, the cores other processes leave free)"
) -> None:
    parser.add_argument("--threads", type=thread_count, help=help)


def thread_count(text: str) -> int:
    """``--threads N``: an integer from 1 to 4 per CPU (strataprune/runtime/threads.py says why)."""
    from strataprune.contract.threads import check_thread_count

    value = at_least(1)(text)
    try:
        return check_thread_count(value, "--threads")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--threads: ")) from None


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: strataprune run: argument ...``), exit status 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see '{self.prog} --help')")


def at_least(minimum: int, allow_all: bool = False) -> Any:
    def parse(text: str) -> int | None:
        if allow_all and text == "all":
            return None
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {minimum}" + (" or 'all'" if allow_all else ""))
        return value

    return parse


def zeroshot_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", help="zero-shot accuracy (lm-eval) on these tasks: names, groups or presets (papers7, bbc), comma-separated"
    )
    parser.add_argument("--limit", type=int, help="zero-shot: examples per task (default: all)")
    parser.add_argument(
        "--include-path", dest="include_path", help="zero-shot: folder of extra lm-eval task YAML files (local data)"
    )


def int_list(text: str, flag: str) -> tuple[int, ...]:
    from strataprune.contract.errors import ConfigError

    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated whole numbers, e.g. 128,512") from None
    if not values:
        raise ConfigError(f"{flag} {text!r} names no value")
    return values


def build_recipe(args: argparse.Namespace) -> Any:
    from strataprune.contract.sparsity import paper_notation_warning
    from strataprune.engine.recipe import apply_overrides, load_recipe, parse_set

    recipe = load_recipe(args.recipe)
    overrides: dict[str, Any] = {key: getattr(args, flag, None) for flag, key in FLAG_KEYS.items()}
    if overrides.get("sparsity") is not None and ":" not in overrides["sparsity"]:
        try:
            overrides["sparsity"] = float(overrides["sparsity"])
        except ValueError:
            raise ConfigError(
                f"--sparsity {overrides['sparsity']!r} must be a number in [0, 1) or an N:M pattern like 2:4"
            ) from None
    for kind in ("allocator", "pruner"):
        name = getattr(args, kind, None)
        if name is not None and name != getattr(recipe, kind).name:
            overrides[kind] = name  # another plugin: its own defaults, not the recipe's parameters
    recovery = getattr(args, "recovery", None)  # `run --recovery losa|lora|none`
    if recovery is not None and recovery != "none" and (recipe.recovery is None or recovery != recipe.recovery.name):
        overrides["recovery"] = recovery
    assignments = parse_set(args.set)
    for key, value in assignments.items():  # one key, two values: refuse rather than pick one silently
        flag = next((f for f, k in FLAG_KEYS.items() if k == key and getattr(args, f, None) is not None), None)
        if flag is not None and overrides[key] != value:
            raise ConfigError(
                f"--{flag.replace('_', '-')} {getattr(args, flag)} and --set {key}={value} both set {key}; give it once"
            )
    overrides.update(assignments)
    recipe = apply_overrides(recipe, overrides)
    if recovery == "none":
        recipe.recovery = None
    warning = paper_notation_warning(recipe.target.pattern)
    if warning:
        print(warning, file=sys.stderr)
    return recipe
