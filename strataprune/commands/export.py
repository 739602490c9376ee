"""Export a pruned model for other tools, dense (``strataprune export``): transformers or GGUF (llama.cpp)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "export", help="write a pruned model as a plain transformers checkpoint or a GGUF file (llama.cpp), dense"
    )
    parser.add_argument("source", help="a run folder, a `strataprune deploy` output or a sparse-cpu folder")
    parser.add_argument("--to", required=True, choices=("hf", "gguf"), help="hf: transformers safetensors; gguf: llama.cpp")
    parser.add_argument(
        "--gguf-type",
        dest="gguf_type",
        default="f16",
        choices=("f32", "f16", "q8_0", "q4_0"),
        help="GGUF weight type of the matrices (norms stay f32; default f16)",
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from strataprune.deploy.export import export

    info = export(
        args.source,
        args.to,
        args.output,
        gguf_type=args.gguf_type,
        overwrite=args.overwrite,
        log=None if args.quiet else (lambda m: print(f"[export] {m}", file=sys.stderr)),
    )
    if args.to == "gguf":
        g = info["gguf"]
        print(
            f"wrote {args.output}/{info['file']} ({g['bytes'] / 1e6:.1f} MB, {g['type']}: "
            f"{', '.join(f'{n} {k}' for k, n in sorted(g['tensor_types'].items()))}"
            f"{'; f16 where rows are not a multiple of 32: ' + ', '.join(g['f16_fallbacks'][:3]) if g['f16_fallbacks'] else ''})"
        )
    else:
        print(f"wrote {args.output}/ (transformers safetensors, dense fp32; {info['load_with']})")
    print(f"linear sparsity {info['linear_sparsity']:.1%} (zeros kept as zeros; the exported weights are dense)")
    return 0
