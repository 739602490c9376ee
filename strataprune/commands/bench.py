"""Latency of dense vs pruned on every engine, parity first (``strataprune bench``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from strataprune.commands.flags import int_list, threads_flag


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("bench", help="latency of dense vs pruned on every engine, parity first, with a verdict")
    parser.add_argument(
        "run_dir", nargs="+", help="output folder(s) of `strataprune run` (or `deploy`), pruned from one dense model"
    )
    parser.add_argument(
        "--backends", help="comma-separated backends (default: every available one), NAME:key=value for parameters"
    )
    parser.add_argument("--prompt-len", dest="prompt_len", default="128", help="prompt lengths, comma-separated (default 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--decode-tokens", dest="decode_tokens", type=int, default=32, help="greedy tokens timed after the prompt"
    )
    threads_flag(parser, help="threads of every engine (default: min(4, CPUs))")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parity-steps", dest="parity_steps", type=int, default=8)
    parser.add_argument("--text", help="parity/timing text: dataset name or text file (default: the run's evaluation text)")
    parser.add_argument("--dense", help="the dense model (default: the run's model.source)")
    parser.add_argument("--output", help="write bench.json and bench.md here")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from strataprune.deploy.bench import BenchConfig, benchmark, format_table, write_report

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    config = BenchConfig(
        backends=backends,
        prompt_lens=int_list(args.prompt_len, "--prompt-len"),
        batch=args.batch,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        parity_steps=args.parity_steps,
        text=args.text,
        dense=args.dense,
        progress=not args.quiet,
    )
    if args.output is not None:
        from strataprune.deploy.rundir import open_run
        from strataprune.engine.preflight import check_output_name
        from strataprune.runtime.reports import check_output_dir

        check_output_name(args.output)
        labels = ["the run"] if len(args.run_dir) == 1 else [f"run #{i + 1}" for i in range(len(args.run_dir))]
        inputs = dict(zip(labels, args.run_dir))
        if args.dense is None:  # the dense model each run names (a folder; embedded and hub names are skipped)
            inputs.update(
                {f"the dense model of {label}": open_run(path).model_source for label, path in zip(labels, args.run_dir)}
            )
        inputs.update({"the dense model (--dense)": args.dense, "the text (--text)": args.text})
        check_output_dir(Path(args.output), args.overwrite, inputs=inputs)
    report = benchmark(args.run_dir if len(args.run_dir) > 1 else args.run_dir[0], config)
    print(format_table(report))
    if args.output:
        write_report(report, Path(args.output), args.overwrite)
        print(f"\nwrote {args.output}/bench.json and bench.md")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0
