"""Perplexity, zero-shot accuracy or image-model agreement of a saved model (``strataprune eval``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from strataprune.commands.flags import at_least, threads_flag, zeroshot_flags


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("eval", help="perplexity (or, with --tasks, zero-shot accuracy) of a saved model")
    parser.add_argument("model_dir", help="model folder (e.g. the output of `strataprune run`), .gguf file or embedded name")
    parser.add_argument(
        "--data", default="bbc", help="dataset name or text file (default: bbc); image models: photos or an image folder"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--seqlen", type=at_least(2), default=512, help="tokens per window (default 512; at most the model's context)"
    )
    parser.add_argument(
        "--windows",
        type=at_least(1, allow_all=True),
        default=40,
        help="number of windows, or 'all' (default 40); image models: number of crops",
    )
    parser.add_argument("--encoding", default="utf-8", help="encoding of a text file given as --data (default utf-8)")
    parser.add_argument(
        "--protocol",
        choices=["auto", "wikitext2", "c4", "documents"],
        default="auto",
        help="how text becomes tokens (default auto: the papers' protocol for wikitext2, c4 and WikiText files)",
    )
    parser.add_argument("--bos", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", help="image models: the dense model to compare with (default: the run's model.source)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    threads_flag(parser)
    zeroshot_flags(parser)
    parser.add_argument(
        "--batch-size", dest="batch_size", type=int, default=1, help="zero-shot: requests per forward pass (default 1)"
    )
    parser.add_argument("--perplexity", action="store_true", help="with --tasks: also compute perplexity")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.data.textfile import TextFile, is_image_source, looks_like_path
    from strataprune.engine.bos import bos_per_window
    from strataprune.engine.limits import check_seqlen
    from strataprune.engine.preflight import check_cache_dir, language_model
    from strataprune.models.files import inspect_model

    check_cache_dir()
    wants_perplexity = args.tasks is None or args.perplexity
    config = inspect_model(args.model_dir)  # cheap checks first: files, context length
    image_data = is_image_source(args.data) and not language_model(args.model_dir, config)  # photos or an image folder
    if config is not None and wants_perplexity:
        check_seqlen(config, args.seqlen, "--seqlen")
    if looks_like_path(args.data) and wants_perplexity and not image_data:
        TextFile(Path(args.data).expanduser(), args.encoding)
    from strataprune.data.text_windows import evaluation_windows, open_dataset
    from strataprune.evaluate.perplexity import perplexity
    from strataprune.models.loading import load_model, resolve_device
    from strataprune.runtime.threads import apply_threads

    resolve_device(args.device)
    threads = apply_threads(args.threads)
    if args.tasks is not None:
        return eval_tasks(args, threads)
    dataset = None if image_data else open_dataset(args.data, args.encoding, args.protocol)  # text errors before loading
    loaded = load_model(args.model_dir, device=args.device)
    from strataprune.engine.tasks.kinds import task_kind

    if not task_kind(loaded.adapter.task).reads_text:  # vision and multimodal models: agreement with a reference
        return eval_images(loaded, args)
    if dataset is None:  # an image source given to a language model: open_dataset says what text it takes
        dataset = open_dataset(args.data, args.encoding, args.protocol)
    check_seqlen(loaded.model.config, args.seqlen, "--seqlen")
    windows = evaluation_windows(
        loaded.tokenizer, dataset, args.split, args.seqlen, args.windows, bos_per_window(args.bos, loaded)
    )
    result = perplexity(loaded.model, windows.ids, "perplexity", not args.quiet)
    result["data"] = windows.description
    result["threads"] = threads
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows of {result['seqlen']}; "
        f"protocol {windows.description['protocol']}; tokens sha256 {windows.description['sha256'][:16]})"
    )
    return 0


def eval_tasks(args: argparse.Namespace, threads: dict[str, Any]) -> int:
    """``strataprune eval DIR --tasks ...``: zero-shot accuracy (and perplexity with --perplexity)."""
    from strataprune.engine.bos import bos_per_window
    from strataprune.evaluate.zeroshot import accuracy_table, check_settings, evaluate_tasks, resolve_tasks
    from strataprune.models.loading import load_model

    check_settings(args.limit, args.batch_size)
    resolved = resolve_tasks(args.tasks, args.include_path)  # unknown task or missing data: fail before loading the model
    loaded = load_model(args.model_dir, device=args.device)
    result = evaluate_tasks(
        loaded.model,
        loaded.tokenizer,
        resolved,
        args.limit,
        batch_size=args.batch_size,
        adapter=loaded.adapter,
        show_progress=not args.quiet,
    )
    if args.perplexity:
        from strataprune.data.text_windows import evaluation_windows, open_dataset
        from strataprune.evaluate.perplexity import perplexity

        dataset = open_dataset(args.data, args.encoding, args.protocol)
        bos = bos_per_window(args.bos, loaded)
        windows = evaluation_windows(loaded.tokenizer, dataset, args.split, args.seqlen, args.windows, bos)
        result["perplexity"] = {
            **perplexity(loaded.model, windows.ids, "perplexity", not args.quiet),
            "data": windows.description,
        }
    result["threads"] = threads
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    harness = result["harness"]
    print(
        f"zero-shot accuracy of {args.model_dir} ({harness['name']} {harness['version']}, 0-shot, limit {args.limit or 'none'}, "
        f"{result['time_s']:.1f} s)"
    )
    print(accuracy_table(result))
    if "perplexity" in result:
        ppl = result["perplexity"]
        print(f"perplexity {ppl['ppl']:.4f} over {ppl['tokens']} tokens ({ppl['windows']} windows of {ppl['seqlen']})")
    return 0


def eval_images(loaded: Any, args: argparse.Namespace) -> int:
    """``strataprune eval DIR`` for an image model: compare with a reference (``--reference``, else the
    model the run started from, read from DIR/recipe.yaml); without one, what the model scores alone."""
    from strataprune.engine.recipe import load_recipe
    from strataprune.engine.tasks.image_data import image_source, predict, task_data
    from strataprune.engine.tasks.images import headline
    from strataprune.evaluate.vision_metrics import compare, standalone
    from strataprune.models.loading import load_model
    from strataprune.runtime.run_folder import RunFolder

    reference = getattr(args, "reference", None)
    recipe_file = RunFolder(args.model_dir).recipe_path
    if reference is None and recipe_file.is_file():
        reference = load_recipe(recipe_file).model.source
    source = image_source(args.data, "--data")
    split = "test" if args.split is None else args.split
    data = task_data(loaded, source, split, args.windows, 2, "evaluation")
    outputs = predict(loaded, data)
    result: dict[str, Any] = {
        "task": loaded.adapter.task,
        "model": str(args.model_dir),
        "data": data.description,
        "model_alone": standalone(outputs, data.extra),
    }
    if reference:
        dense = load_model(reference, device=args.device)
        ref_data = task_data(dense, source, split, args.windows, 2, "evaluation")
        result["reference"] = reference
        result["reference_alone"] = standalone(predict(dense, ref_data), ref_data.extra)
        result["vs_reference"] = compare(predict(dense, ref_data), outputs, data.extra)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        lines = [f"{loaded.adapter.task}: {data.description.get('crops')} crops of {source} ({split})"]
        if "vs_reference" in result:
            lines.append(f"vs {reference}: {headline(loaded.adapter.task, result['vs_reference'])}")
        lines.append(f"alone: {json.dumps(result['model_alone'])}")
        print("\n".join(lines))
    return 0
