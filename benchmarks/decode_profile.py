"""Where one decode token's time goes on each quantized kernel path: SmolLM2-135M's matrices one by one.

For every quantized path this CPU runs (``avx512``, ``avx2`` (with AVX-VNNI where the CPU has it), ``avx2-novnni``),
at 1 thread and thread CPU time:

- each SmolLM2-135M projection shape (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536) packed as the
  native decoder packs it (int8 one scale per row, int4 group 128) at 70% random sparsity, one token: microseconds
  per matrix and GB/s of the packed bytes (masks + codes + scales [+ zeros] + row offsets) read; a stack of distinct
  copies well above the last-level cache, so every call streams from memory as in a real decode step;
- the dense int8 lm_head (49152 x 576), timed as a native decoder over a 1-layer model of SmolLM2's width with the
  int8 head, minus the same decoder with a 4-row head (the rest of that step): milliseconds and GB/s of its bytes;
- the estimate of one decode token: 30 layers x the seven matrices + the head; what is left of a measured decode
  (``benchmarks/cpu_bar.py``) is attention, norms, RoPE and the call overhead.

    python benchmarks/decode_profile.py [--sparsity 0.7] [--stack-mb 64] [--reps 5]

Prints a Markdown table (CPU model, flags and load average first); writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYERS = 30  # SmolLM2-135M
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # fmt: skip
FORMATS = {"int8": (8, None), "int4-g128": (4, 128)}
VOCAB, HIDDEN = 49152, 576


def best_of(fn, reps: int) -> float:
    """Minimum thread CPU seconds of ``fn`` over ``reps`` runs (after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def matrices(paths: list[str], sparsity: float, stack_mb: float, reps: int) -> dict:
    from strataprune.kernels import quantized as Q

    out: dict = {}
    g = torch.Generator().manual_seed(0)
    for fmt, (bits, group) in FORMATS.items():
        for name, (rows, cols) in SHAPES.items():
            w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
            keep = torch.rand(rows, cols, generator=g) >= sparsity
            one = Q.pack_int8(w * keep, group_size=group) if bits == 8 else Q.pack_int4(w * keep, group_size=group)
            stack = max(4, math.ceil(stack_mb * 1e6 / one.nbytes))
            packs = [
                Q.pack_int8(w * (1 + 0.01 * i) * keep, group_size=group)
                if bits == 8
                else Q.pack_int4(w * (1 + 0.01 * i) * keep, group_size=group)
                for i in range(stack)
            ]
            ptrs = [Q.pointers(p) for p in packs]
            x = torch.randn(1, cols, generator=g)
            for path in paths:
                with Q.use_quantized_isa(path):
                    s = best_of(lambda x=x, ptrs=ptrs: [Q.launch_pointers(x, p) for p in ptrs], reps) / stack
                out[(fmt, name, path)] = {"us": s * 1e6, "GBps": one.nbytes / s / 1e9, "bytes": one.nbytes}
            del packs, ptrs
    return out


def head(paths: list[str], reps: int) -> dict:
    """ms of the int8 lm_head per token on each path: a 1-layer decoder with a full head minus one with a 4-row head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import use_quantized_isa

    def decoder(vocab: int):
        config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        return NativeDecoder(LlamaForCausalLM(config).eval(), max_context=64, lm_head="int8")

    full, small = decoder(VOCAB), decoder(4)
    out = {}
    for path in paths:
        with use_quantized_isa(path):
            per = {}
            for label, engine in (("full", full), ("small", small)):
                engine.reset(0)
                engine.prefill(0, [1, 2, 3])
                steps = 8
                per[label] = best_of(lambda e=engine: [e.decode([0], [1]) for _ in range(steps)], reps) / steps
                engine.reset(0)
        s = per["full"] - per["small"]
        out[path] = {"ms": s * 1e3, "GBps": (VOCAB * HIDDEN + VOCAB * 4) / s / 1e9}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--stack-mb", type=float, default=64.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--paths", default="", help="comma list of quantized paths (default: every one this CPU runs)")
    args = ap.parse_args()
    from strataprune import kernels
    from strataprune.kernels.quantized import quantized_isas

    available = [p for p in quantized_isas() if p != "portable"]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()] or available
    bad = [p for p in paths if p not in available]
    if bad or not 0 <= args.sparsity < 1 or args.stack_mb <= 0 or args.reps < 1:
        print(f"error: --paths {bad} / --sparsity {args.sparsity} / --stack-mb / --reps: allowed paths {available}, "
              "sparsity in [0, 1), positive sizes", file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    from kernels import isa_flags
    from results_files import cpu_model

    print(f"{cpu_model()}; {isa_flags()}; load average {os.getloadavg()[0]:.1f}; 1 thread, thread CPU time (min of "
          f"{args.reps}); sparsity {args.sparsity:.0%}\n")  # fmt: skip
    mats = matrices(paths, args.sparsity, args.stack_mb, args.reps)
    heads = head(paths, args.reps)
    print("| format | matrix | KB | " + " | ".join(f"{p} us | {p} GB/s" for p in paths) + " |")
    print("|---|---|---|" + "---|---|" * len(paths))
    for fmt in FORMATS:
        for name in SHAPES:
            cells = " | ".join(f"{mats[(fmt, name, p)]['us']:.1f} | {mats[(fmt, name, p)]['GBps']:.1f}" for p in paths)
            print(f"| {fmt} | {name} | {mats[(fmt, name, paths[0])]['bytes'] / 1e3:.0f} | {cells} |")
        layer = {p: sum(mats[(fmt, n, p)]["us"] for n in SHAPES) for p in paths}
        cells = " | ".join(f"{LAYERS * layer[p] / 1e3:.2f} ms | " for p in paths)
        print(f"| {fmt} | 30 layers | | {cells} |")
    cells = " | ".join(f"{heads[p]['ms']:.2f} ms | {heads[p]['GBps']:.1f}" for p in paths)
    print(f"| int8 | lm_head 49152x576 (dense) | {(VOCAB * HIDDEN + VOCAB * 4) / 1e3:.0f} | {cells} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
