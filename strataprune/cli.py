"""The ``strataprune`` command: run, eval, allocate, plugins, deploy, bench, doctor, backends.

    strataprune run                      # the embedded default: SmolLM2-135M, BBC News, Wanda, uniform 50%
    strataprune run recipe.yaml --sparsity 0.6 --output out/
    strataprune eval out/
    strataprune eval out/ --tasks bbc_topic,bbc_continuation --limit 100     # zero-shot accuracy (lm-eval)
    strataprune plugins --json
    strataprune leaderboard grid.yaml --jobs 2

Errors caused by input print one line (``error: ...``) and exit with status 2, never a traceback;
they are found before the heavy imports and the work (core/preflight.py). Any other exception is a
bug: one line ``error: internal error ...`` and exit status 1 (operating-system errors such as a full
disk: ``error: ...``, status 1); ``STRATAPRUNE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .core.errors import ConfigError, StrataPruneError

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
    parser.add_argument("--sparsity", help="target ratio in [0, 1), or N:M = keep N of every M weights (NVIDIA's notation: "
                        "2:4 is 50%%, 1:4 is 75%% sparse; the paper repos' n:m counts pruned weights instead)")
    parser.add_argument("--calibration", help="calibration text: dataset name (bbc) or text file path")
    parser.add_argument("--nsamples", type=int, help="calibration samples")
    parser.add_argument("--seqlen", type=int, help="calibration tokens per sample")
    parser.add_argument("--seed", type=int, help="calibration sampling seed")
    parser.add_argument("--propagate", help="pruned (default: block l sees pruned blocks < l) or dense")
    parser.add_argument("--eval-data", dest="eval_data", help="evaluation text: dataset name or text file path")
    parser.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="tokens per evaluation window")
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, help="number of evaluation windows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any recipe key, e.g. allocator.beta=0.01")
    _threads_flag(parser)


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_at_least(1), help="torch CPU threads (default: auto, the cores other processes leave free)")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: strataprune run: argument ...``), exit status 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _at_least(minimum: int, allow_all: bool = False) -> Any:
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


def build_recipe(args: argparse.Namespace) -> Any:
    from .core.recipes import apply_overrides, load_recipe, parse_set
    from .core.sparsity import paper_notation_warning

    recipe = load_recipe(args.recipe)
    overrides: dict[str, Any] = {key: getattr(args, flag, None) for flag, key in FLAG_KEYS.items()}
    if overrides.get("sparsity") is not None and ":" not in overrides["sparsity"]:
        try:
            overrides["sparsity"] = float(overrides["sparsity"])
        except ValueError:
            raise ConfigError(f"--sparsity {overrides['sparsity']!r} must be a number in [0, 1) or an N:M pattern like 2:4") from None
    for kind in ("allocator", "pruner"):
        name = getattr(args, kind, None)
        if name is not None and name != getattr(recipe, kind).name:
            overrides[kind] = name  # another plugin: its own defaults, not the recipe's parameters
    overrides.update(parse_set(args.set))
    recipe = apply_overrides(recipe, overrides)
    warning = paper_notation_warning(recipe.target.pattern)
    if warning:
        print(warning, file=sys.stderr)
    return recipe


def cmd_run(args: argparse.Namespace) -> int:
    from .core.preflight import preflight

    recipe = build_recipe(args)
    output = recipe.output_dir or recipe.default_output_dir()
    preflight(recipe, output, args.overwrite, command="run")  # before the heavy imports and any work
    from .core.pipeline import Pipeline, summary

    result = Pipeline(recipe, show_progress=not args.quiet).run(output, overwrite=args.overwrite)
    print(summary(result.report))
    print(f"\nwrote {result.output_dir}/ (model, allocation.json, report.json, recipe.yaml)")
    return 0


def _zeroshot_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", help="zero-shot accuracy (lm-eval) on these tasks: names, groups or presets (papers7, bbc), comma-separated")
    parser.add_argument("--limit", type=int, help="zero-shot: examples per task (default: all)")
    parser.add_argument("--include-path", dest="include_path", help="zero-shot: folder of extra lm-eval task YAML files (local data)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .core.limits import check_seqlen
    from .core.modelfiles import inspect_model
    from .core.textfile import TextFile, looks_like_path

    from .core.preflight import language_model
    from .core.textfile import is_image_source

    wants_perplexity = args.tasks is None or args.perplexity
    config = inspect_model(args.model_dir)  # cheap checks first: files, context length
    image_data = is_image_source(args.data) and not language_model(args.model_dir, config)  # photos or an image folder
    if config is not None and wants_perplexity:
        check_seqlen(config, args.seqlen, "--seqlen")
    if looks_like_path(args.data) and wants_perplexity and not image_data:
        TextFile(Path(args.data).expanduser(), args.encoding)
    from .core.data import evaluation_windows, open_dataset
    from .core.evaluation import perplexity
    from .core.models import load_model, resolve_device
    from .core.threads import apply_threads

    resolve_device(args.device)
    threads = apply_threads(args.threads)
    if args.tasks is not None:
        return _eval_tasks(args, threads)
    dataset = None if image_data else open_dataset(args.data, args.encoding, args.protocol)  # text errors before loading
    loaded = load_model(args.model_dir, device=args.device)
    if loaded.adapter.task != "causal-lm":  # vision and multimodal models: agreement with a reference, not perplexity
        from .core.task_eval import eval_command

        return eval_command(loaded, args)
    if dataset is None:  # an image source given to a language model: open_dataset says what text it takes
        dataset = open_dataset(args.data, args.encoding, args.protocol)
    check_seqlen(loaded.model.config, args.seqlen, "--seqlen")
    bos = args.bos == "always" or (args.bos == "auto" and loaded.adapter.bos_per_window(loaded.model))
    windows = evaluation_windows(loaded.tokenizer, dataset, args.split, args.seqlen, args.windows, bos)
    result = perplexity(loaded.model, windows.ids, "perplexity", not args.quiet)
    result["data"] = windows.description
    result["threads"] = threads
    print(json.dumps(result, indent=2) if args.json else
          f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows of {result['seqlen']}; "
          f"protocol {windows.description['protocol']}; tokens sha256 {windows.description['sha256'][:16]})")
    return 0


def _eval_tasks(args: argparse.Namespace, threads: dict[str, Any]) -> int:
    """``strataprune eval DIR --tasks ...``: zero-shot accuracy (and perplexity with --perplexity)."""
    from .core.models import load_model
    from .core.zeroshot import accuracy_table, check_settings, evaluate_tasks, resolve_tasks

    check_settings(args.limit, args.batch_size)
    resolved = resolve_tasks(args.tasks, args.include_path)  # unknown task or missing data: fail before loading the model
    loaded = load_model(args.model_dir, device=args.device)
    result = evaluate_tasks(loaded.model, loaded.tokenizer, resolved, args.limit, batch_size=args.batch_size,
                            adapter=loaded.adapter, show_progress=not args.quiet)
    if args.perplexity:
        from .core.data import evaluation_windows, open_dataset
        from .core.evaluation import perplexity

        bos = args.bos == "always" or (args.bos == "auto" and loaded.adapter.bos_per_window(loaded.model))
        windows = evaluation_windows(loaded.tokenizer, open_dataset(args.data, args.encoding, args.protocol), args.split, args.seqlen, args.windows, bos)
        result["perplexity"] = {**perplexity(loaded.model, windows.ids, "perplexity", not args.quiet), "data": windows.description}
    result["threads"] = threads
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    harness = result["harness"]
    print(f"zero-shot accuracy of {args.model_dir} ({harness['name']} {harness['version']}, 0-shot, limit {args.limit or 'none'}, {result['time_s']:.1f} s)")
    print(accuracy_table(result))
    if "perplexity" in result:
        ppl = result["perplexity"]
        print(f"perplexity {ppl['ppl']:.4f} over {ppl['tokens']} tokens ({ppl['windows']} windows of {ppl['seqlen']})")
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
    from .core.preflight import preflight
    from .core.recipes import parse_allocator_specs

    recipe = build_recipe(args)
    specs = [n.strip() for n in (args.allocators or recipe.allocator.name).split(",") if n.strip()]
    output = args.output or "strataprune-allocations"
    preflight(recipe, output, args.overwrite, command="allocate", allocators=parse_allocator_specs(specs))
    from .core.allocate import compare_allocators

    compare_allocators(recipe, specs, output, overwrite=args.overwrite, show_progress=not args.quiet)
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


# --------------------------------------------------------------------------- deploy, bench, doctor, backends
def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from .core.errors import ConfigError

    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated whole numbers, e.g. 128,512") from None
    if not values:
        raise ConfigError(f"{flag} {text!r} names no value")
    return values


def cmd_deploy(args: argparse.Namespace) -> int:
    from .core.plugin import DeploySettings
    from .deploy.deployment import deploy

    settings = DeploySettings(batch=1, prompt_len=args.prompt_len, new_tokens=args.parity_steps, threads=args.threads)
    info = deploy(args.run_dir, args.backend, args.output, overwrite=args.overwrite, settings=settings,
                  parity_steps=args.parity_steps, text=args.text, log=None if args.quiet else (lambda m: print(f"[deploy] {m}", file=sys.stderr)))
    st, par = info["storage"], info["parity"]
    print(f"{info['backend']} {info['engine_version']}: artifact {info['artifact'] or '(the checkpoint)'}"
          f"{' (%.1f MB)' % (info['artifact_bytes'] / 1e6) if info['artifact_bytes'] else ''}")
    print(f"sparse-bitmask checkpoint {st['file_bytes'] / 1e6:.1f} MB = {st['ratio_whole_model']:.3f} of dense fp32 "
          f"({st['compressed_matrices']} matrices at {st['sparsity_of_compressed']:.1%} sparsity: "
          f"{(st['bytes_per_weight_compressed_matrices'] or 4):.3f} B/weight, {st['ratio_compressed_matrices']:.3f} of dense)")
    if "relative" in par:
        print(f"parity vs {par['reference']}: max |logit diff| {par['max_abs_logit_diff']:.3g} "
              f"({par['relative']:.2g} relative, tolerance {par['tolerance']:g}); {par['greedy_steps']} greedy tokens identical")
    print(f"wrote {args.output}/ (deploy.json)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy.bench import BenchConfig, benchmark, format_table, write_report

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    config = BenchConfig(
        backends=backends, prompt_lens=_int_list(args.prompt_len, "--prompt-len"), batch=args.batch,
        decode_tokens=args.decode_tokens, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
        parity_steps=args.parity_steps, text=args.text, dense=args.dense, progress=not args.quiet,
    )
    if args.output:
        from .core.reports import check_output_dir

        check_output_dir(Path(args.output), args.overwrite)
    report = benchmark(args.run_dir if len(args.run_dir) > 1 else args.run_dir[0], config)
    print(format_table(report))
    if args.output:
        write_report(report, Path(args.output), args.overwrite)
        print(f"\nwrote {args.output}/bench.json and bench.md")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .deploy.doctor import doctor, format_doctor

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0


def cmd_backends_install(args: argparse.Namespace) -> int:
    from .deploy.engine_env import install

    install(args.name, log=lambda m: print(f"[install] {m}", file=sys.stderr))
    return 0


def _deploy_parsers(sub: Any) -> None:
    dp = sub.add_parser("deploy", help="compress a run's model and prepare it for an engine, parity-checked")
    dp.add_argument("run_dir", help="output folder of `strataprune run`")
    dp.add_argument("--backend", default="onnxruntime", help="backend name (see `strataprune doctor`), NAME:key=value to set parameters")
    dp.add_argument("--output", required=True, help="output directory")
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--prompt-len", dest="prompt_len", type=int, default=64, help="tokens per parity window (and fixed-shape engines' prompt)")
    dp.add_argument("--parity-steps", dest="parity_steps", type=int, default=8, help="greedy tokens that must match the reference")
    dp.add_argument("--threads", type=int, help="engine threads")
    dp.add_argument("--text", help="parity text: dataset name or text file (default: the run's evaluation text)")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=cmd_deploy)

    be = sub.add_parser("bench", help="latency of dense vs pruned on every engine, parity first, with a verdict")
    be.add_argument("run_dir", nargs="+", help="output folder(s) of `strataprune run` (or `deploy`), pruned from one dense model")
    be.add_argument("--backends", help="comma-separated backends (default: every available one), NAME:key=value for parameters")
    be.add_argument("--prompt-len", dest="prompt_len", default="128", help="prompt lengths, comma-separated (default 128)")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--decode-tokens", dest="decode_tokens", type=int, default=32, help="greedy tokens timed after the prompt")
    be.add_argument("--threads", type=int, help="threads of every engine (default: min(4, CPUs))")
    be.add_argument("--warmup", type=int, default=1)
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--parity-steps", dest="parity_steps", type=int, default=8)
    be.add_argument("--text", help="parity/timing text: dataset name or text file (default: the run's evaluation text)")
    be.add_argument("--dense", help="the dense model (default: the run's model.source)")
    be.add_argument("--output", help="write bench.json and bench.md here")
    be.add_argument("--overwrite", action="store_true")
    be.add_argument("--json", action="store_true", help="also print the report as JSON")
    be.add_argument("--quiet", action="store_true")
    be.set_defaults(func=cmd_bench)

    dr = sub.add_parser("doctor", help="which backends run here, their versions, and why not")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_doctor)

    bk = sub.add_parser("backends", help="manage engines that need their own environment")
    bsub = bk.add_subparsers(dest="backends_command", required=True)
    inst = bsub.add_parser("install", help="install an engine into its own venv in the cache (deepsparse)")
    inst.add_argument("name", choices=["deepsparse"])
    inst.set_defaults(func=cmd_backends_install)


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="strataprune", description="Layer-wise sparsity allocation and pruning for large models.")
    parser.add_argument("--version", action="version", version=f"strataprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prune a model (the main job)")
    _recipe_flags(run)
    run.add_argument("--output", help="output directory")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier strataprune output (never a folder strataprune did not write)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _zeroshot_flags(run)
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="perplexity (or, with --tasks, zero-shot accuracy) of a saved model")
    ev.add_argument("model_dir", help="model folder (e.g. the output of `strataprune run`), .gguf file or embedded name")
    ev.add_argument("--data", default="bbc", help="dataset name or text file (default: bbc); image models: photos or an image folder")
    ev.add_argument("--split", default="test")
    ev.add_argument("--seqlen", type=_at_least(2), default=512, help="tokens per window (default 512; at most the model's context)")
    ev.add_argument("--windows", type=_at_least(1, allow_all=True), default=40, help="number of windows, or 'all' (default 40); image models: number of crops")
    ev.add_argument("--encoding", default="utf-8", help="encoding of a text file given as --data (default utf-8)")
    ev.add_argument("--protocol", choices=["auto", "wikitext2", "c4", "documents"], default="auto",
                    help="how text becomes tokens (default auto: the papers' protocol for wikitext2, c4 and WikiText files)")
    ev.add_argument("--bos", choices=["auto", "always", "never"], default="auto")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--reference", help="image models: the dense model to compare with (default: the run's model.source)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--quiet", action="store_true")
    _threads_flag(ev)
    _zeroshot_flags(ev)
    ev.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="zero-shot: requests per forward pass (default 1)")
    ev.add_argument("--perplexity", action="store_true", help="with --tasks: also compute perplexity")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plugins", help="list registered plugins")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=cmd_plugins)

    al = sub.add_parser("allocate", help="compute and compare allocations without pruning")
    _recipe_flags(al)
    al.add_argument("--allocators", help="comma-separated allocators, each NAME or NAME:key=value:... (default: the recipe's)")
    al.add_argument("--output", help="output directory (default: strataprune-allocations)")
    al.add_argument("--overwrite", action="store_true", help="replace an earlier strataprune output (never a folder strataprune did not write)")
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
    _deploy_parsers(sub)
    return parser


def _fail(message: str, status: int) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    from .core.outputs import current_command, release_output_locks

    debug = os.environ.get("STRATAPRUNE_DEBUG", "") not in ("", "0")
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except StrataPruneError as exc:
        return _fail(str(exc), 2)
    token = current_command.set(args.command)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, StrataPruneError):
            return _fail(str(exc), 2)
        if isinstance(exc, MemoryError):
            return _fail("out of memory; lower calibration.nsamples or seqlen, or use --offload / --activation-dir", 1)
        if isinstance(exc, OSError):
            return _fail(f"{exc} (an operating-system error; STRATAPRUNE_DEBUG=1 shows the traceback)", 1)
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (a bug in strataprune or a plugin, please report it; "
            "run with STRATAPRUNE_DEBUG=1 for the traceback)", 1,
        )
    finally:
        release_output_locks()
        current_command.reset(token)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
