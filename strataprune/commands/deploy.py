"""Compress a run's model for an engine, parity-checked (``strataprune deploy``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from strataprune.commands.flags import at_least, threads_flag


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("deploy", help="compress a run's model and prepare it for an engine, parity-checked")
    parser.add_argument("run_dir", help="output folder of `strataprune run`")
    parser.add_argument(
        "--backend", default="onnxruntime", help="backend name (see `strataprune doctor`), NAME:key=value to set parameters"
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--prompt-len",
        dest="prompt_len",
        type=at_least(1),
        default=64,
        help="tokens per parity window (and fixed-shape engines' prompt)",
    )
    parser.add_argument(
        "--parity-steps",
        dest="parity_steps",
        type=int,
        default=8,
        help="greedy tokens that must match the reference (>= 1)",
    )
    threads_flag(parser, help="engine threads")
    parser.add_argument("--text", help="parity text: dataset name or text file (default: the run's evaluation text)")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.contract.backend import DeploySettings
    from strataprune.deploy.deployment import deploy

    settings = DeploySettings(batch=1, prompt_len=args.prompt_len, new_tokens=args.parity_steps, threads=args.threads)
    info = deploy(
        args.run_dir,
        args.backend,
        args.output,
        overwrite=args.overwrite,
        settings=settings,
        parity_steps=args.parity_steps,
        text=args.text,
        log=None if args.quiet else (lambda m: print(f"[deploy] {m}", file=sys.stderr)),
    )
    st, par = info["storage"], info["parity"]
    print(
        f"{info['backend']} {info['engine_version']}: artifact {info['artifact'] or '(the checkpoint)'}"
        f"{' (%.1f MB)' % (info['artifact_bytes'] / 1e6) if info['artifact_bytes'] else ''}"
    )
    print(
        f"{st['format']} checkpoint {st['file_bytes'] / 1e6:.1f} MB = {st['ratio_whole_model']:.3f} of dense fp32 "
        f"({st['encoded_matrices']} matrices at {st['sparsity_of_encoded']:.1%} sparsity: "
        f"{(st['bytes_per_weight_packed_matrices'] or 4):.3f} B/weight, {st['ratio_packed_matrices']:.3f} of dense)"
    )
    if "relative" in par:
        print(
            f"parity vs {par['reference']}: max |logit diff| {par['max_abs_logit_diff']:.3g} "
            f"({par['relative']:.2g} relative, tolerance {par['tolerance']:g}); {par['greedy_steps']} greedy tokens identical"
        )
    print(f"wrote {args.output}/ (deploy.json)")
    return 0
