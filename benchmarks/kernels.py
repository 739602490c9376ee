"""Benchmark: strataprune's CPU sparse kernels against dense torch, dense ONNX Runtime and torch's CSR matmul.

Per weight shape ([out, in]: SmolLM2-135M's 576x576, 192x576, 1536x576, 576x1536, and 4096x4096), a
stack of S matrices whose dense fp32 bytes total ``--stack-mb`` (256 MB by default: well above this
machine's caches, so weights stream from memory as in a real model's decode) is multiplied by the same
input, one matrix after the other: GEMV (1 token) and GEMM (128 tokens). Dense engines run once per
shape (their speed does not depend on the values); the sparse engines at 0/50/70/80/90% unstructured
random sparsity. Every engine gets the same thread count; repetitions go round-robin over the engines
(so a noisy neighbour hurts all alike) and the best repetition counts (the median is recorded too).

Reported per row: time per stack, weight bytes read per second (dense fp32 bytes, the packed format's
bytes, CSR's 12 bytes per nonzero), dense-equivalent GFLOP/s (2 x tokens x rows x cols / time) and useful
GFLOP/s (2 x tokens x nnz / time), and the speed ratio against the fastest dense engine of the same
shape and token count. A streaming read (``torch.sum`` over a 256 MB tensor, same threads) is measured
in the same run; with the best dense GEMV it gives the memory ceiling. The Markdown opens with the
targets (70%: GEMV >= 2x, 128-token GEMM >= 1.3x the fastest dense engine) and, where missed, a profile
of why (bytes/s against the ceiling, useful FLOP/s against the dense engine's).

With ``--e2e``, SmolLM2-135M (real weights, magnitude-pruned per Linear at 50/70/90%, converted with
``sparsify_model``) against the dense model in torch: 128-token prefill latency and decode tokens/s
(greedy ``generate`` with the KV cache, 32 new tokens after a 128-token prompt).

    python benchmarks/kernels.py                            # kernels, 2 threads (~5-10 min on 2 cores)
    python benchmarks/kernels.py --e2e                      # plus SmolLM2 end to end
    python benchmarks/kernels.py --quick                    # 64 MB stacks, 3 repetitions, 4096x4096 only
    python benchmarks/kernels.py --threads 1 --clock cpu    # one thread, timed in thread CPU time (noise-robust)
    python benchmarks/kernels.py --blocks --quant-stack-mb 32   # quantized 1-token GEMV: 1x4 block path vs bitmask path

``--blocks`` times SmolLM2-135M's shapes at ``--block-sparsity`` (0.7), int4 (group 128) and int8, on every vector
quantized path at 1 thread: unstructured masks, and random 1x4 masks on the bitmask path and on the block path
(docs/kernels-quantized.md, "1x4 blocks"); writes benchmarks/results/kernels-blocks-<UTC>.json and .md.

Needs ``pip install 'strataprune[bench]'`` (onnx, onnxruntime) for the ORT baseline; without it the
ORT rows are skipped and the ratios are against torch. Writes benchmarks/results/kernels-<timestamp>.json
and .md and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results_files import ResultFiles, cpu_flags, cpu_model, utc_stamp  # benchmarks/ is on sys.path when this script runs

HERE = Path(__file__).resolve().parent
SHAPES = {
    "576x576": (576, 576),
    "192x576": (192, 576),
    "1536x576": (1536, 576),
    "576x1536": (576, 1536),
    "4096x4096": (4096, 4096),
}
TARGETS = {1: 2.0, 128: 1.3}  # at 70%: kernel vs the fastest dense engine


# --------------------------------------------------------------------------- timing
def clock_for(name: str) -> Callable[[], float]:
    return time.thread_time if name == "cpu" else time.perf_counter


def race(engines: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float]) -> dict[str, dict]:
    """Best and median seconds of each engine, repetitions interleaved round-robin (one warm-up each first)."""
    for fn in engines.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = clock()
            engines[name]()
            times[name].append(clock() - start)
    return {name: {"best_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}


def stream_bandwidth(threads: int, reps: int, clock: Callable[[], float]) -> float:
    """GB/s of torch.sum over a 256 MB fp32 tensor: the memory ceiling a GEMV can reach here."""
    a = torch.ones(64 * 1024 * 1024)
    result = race({"sum": lambda: a.sum()}, max(3, reps), clock)["sum"]["best_s"]
    return a.numel() * 4 / result / 1e9


# --------------------------------------------------------------------------- engines
def ort_session(weights: list[torch.Tensor], threads: int):
    """One ONNX graph: the input times every weight of the stack (S MatMul nodes, S outputs), dynamic token count."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = weights[0].shape
    inits, nodes, outputs = [], [], []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.T.contiguous().numpy(), name=f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["tokens", rows]))
    graph = helper.make_graph(
        nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", cols])], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, inits
    return session


def prune_random(w: torch.Tensor, sparsity: float, seed: int) -> torch.Tensor:
    """Exactly round(sparsity * numel) zeros at uniformly random places (unstructured)."""
    g = torch.Generator().manual_seed(seed)
    out = w.clone()
    k = round(sparsity * w.numel())
    if k:
        out.view(-1)[torch.randperm(w.numel(), generator=g)[:k]] = 0
    return out


# --------------------------------------------------------------------------- kernel benchmark
def bench_shape(label: str, rows: int, cols: int, args, clock, have_ort: bool) -> list[dict]:
    from strataprune import kernels
    from strataprune.kernels.ops import launch_pointers

    dense_bytes = rows * cols * 4
    stack = max(2, math.ceil(args.stack_mb * 1e6 / dense_bytes))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, cols, generator=g) / math.sqrt(cols) for _ in range(stack)]
    inputs = {tokens: torch.randn(tokens, cols, generator=g) for tokens in args.tokens}
    out: list[dict] = []

    def row(engine, tokens, sparsity, timing, weight_bytes, nnz):
        t = timing["best_s"]
        return {
            "shape": label,
            "rows": rows,
            "cols": cols,
            "stack": stack,
            "tokens": tokens,
            "engine": engine,
            "sparsity": sparsity,
            "best_s": t,
            "median_s": timing["median_s"],
            "weight_bytes": weight_bytes,
            "GBps": weight_bytes / t / 1e9,
            "dense_GFLOPs": 2 * tokens * rows * cols * stack / t / 1e9,
            "useful_GFLOPs": 2 * tokens * nnz / t / 1e9,
        }

    # dense engines (values do not change their speed)
    session = ort_session(weights, args.threads) if have_ort else None
    for tokens, x in inputs.items():
        engines = {"torch dense": lambda x=x, weights=weights: [torch.nn.functional.linear(x, w) for w in weights]}
        if session is not None:
            feed = {"x": x.numpy()}
            engines["onnxruntime dense"] = lambda feed=feed, session=session: session.run(None, feed)
        for engine, timing in race(engines, args.reps, clock).items():
            out.append(row(engine, tokens, 0.0, timing, dense_bytes * stack, rows * cols * stack))
    del session
    gc.collect()

    # sparse engines, one sparsity at a time (pruned copies are dropped once packed)
    isas = (kernels.isas()[1:] or ["portable"]) if args.isas == "all" else [kernels.best_isa()]
    for sparsity in args.sparsities:
        packs, csrs = [], []
        for i, w in enumerate(weights):
            pruned = prune_random(w, sparsity, seed=i)
            packs.append(kernels.pack(pruned))
            if sparsity > 0 and not args.no_csr:
                csrs.append(pruned.to_sparse_csr())
            del pruned
        nnz = sum(p.nnz for p in packs)
        packed_bytes = sum(p.nbytes for p in packs)
        pointers = [(p.masks.data_ptr(), p.values.data_ptr(), p.offsets.data_ptr(), None) for p in packs]
        for tokens, x in inputs.items():
            engines = {}
            for isa in isas:

                def run(x=x, isa=isa, pointers=pointers):
                    with kernels.use_isa(isa):
                        return [launch_pointers(x, ptr, rows, cols) for ptr in pointers]

                engines[f"sparse-cpu ({isa})"] = run
            if csrs:
                xt = x.T.contiguous()
                engines["torch CSR"] = lambda xt=xt, csrs=csrs: [torch.sparse.mm(c, xt) for c in csrs]
            for engine, timing in race(engines, args.reps, clock).items():
                weight_bytes = packed_bytes if engine.startswith("sparse-cpu") else nnz * 12 + (rows + 1) * 8 * stack
                out.append(row(engine, tokens, sparsity, timing, weight_bytes, nnz))
        del packs, csrs, pointers
        gc.collect()
    del weights
    gc.collect()
    return out


def add_ratios(rows: list[dict]) -> None:
    """speedup = fastest dense engine's time / this engine's time, per (shape, tokens)."""
    fastest: dict[tuple, float] = {}
    for r in rows:
        if "dense" in r["engine"]:
            key = (r["shape"], r["tokens"])
            fastest[key] = min(fastest.get(key, math.inf), r["best_s"])
    for r in rows:
        r["vs_fastest_dense"] = fastest[(r["shape"], r["tokens"])] / r["best_s"]


# --------------------------------------------------------------------------- quantized sparse kernels (--quantized)
QUANT_SHAPES = ("576x576", "1536x576", "576x1536", "4096x4096")
QUANT_FORMATS = {"int8": (8, None), "int4-g128": (4, 128)}  # bits, group size (None: one scale per row)
ORT_INT4_BLOCK = 128


def race_both(engines: dict[str, Callable[[], object]], reps: int) -> dict[str, dict]:
    """race() with both clocks read around every repetition: wall (perf_counter) and this thread's CPU time."""
    for fn in engines.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            w0, c0 = time.perf_counter(), time.thread_time()
            engines[name]()
            c1, w1 = time.thread_time(), time.perf_counter()
            wall[name].append(w1 - w0)
            cpu[name].append(c1 - c0)
    return {
        name: {
            "wall_s": min(wall[name]),
            "wall_median_s": statistics.median(wall[name]),
            "cpu_s": min(cpu[name]),
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name in names
    }


def int4_grid(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense min-max INT4 grid per (row, block of columns): codes q [rows, cols] in 0..15, scales, zeros [rows, blocks]."""
    rows, cols = w.shape
    blocks = -(-cols // block)
    g = torch.nn.functional.pad(w, (0, blocks * block - cols)).view(rows, blocks, block)
    low, high = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = torch.where(high > low, (high - low) / 15, torch.ones_like(high))
    zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.round(g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15).view(rows, -1)[:, :cols]
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def ort_matmulnbits_session(grids: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cols: int, threads: int):
    """ONNX Runtime's dense INT4 MatMul (com.microsoft MatMulNBits, block 128, accuracy_level 4: int8 activations)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows = grids[0][0].shape[0]
    blocks = -(-cols // ORT_INT4_BLOCK)
    inits, nodes, outputs = [], [], []
    for i, (q, scale, zero) in enumerate(grids):
        padded = (
            torch.nn.functional.pad(q, (0, blocks * ORT_INT4_BLOCK - cols)).view(rows, blocks, ORT_INT4_BLOCK).to(torch.int32)
        )
        packed = (padded[..., 0::2] | (padded[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
        z = torch.nn.functional.pad(zero.to(torch.int32), (0, blocks % 2))
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).to(torch.uint8).flatten()
        inits += [
            numpy_helper.from_array(packed.numpy(), f"b{i}"),
            numpy_helper.from_array(scale.flatten().numpy(), f"s{i}"),
            numpy_helper.from_array(zp.numpy(), f"z{i}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"b{i}", f"s{i}", f"z{i}"],
                [f"y{i}"],
                domain="com.microsoft",
                K=cols,
                N=rows,
                bits=4,
                block_size=ORT_INT4_BLOCK,
                accuracy_level=4,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["tokens", rows]))
    return _ort_run_session(
        helper,
        TensorProto,
        nodes,
        inits,
        outputs,
        cols,
        threads,
        [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ort,
    )


def ort_dynamic_int8_session(weights: list[tuple[torch.Tensor, torch.Tensor]], cols: int, threads: int):
    """ONNX Runtime's dense int8 MatMul (com.microsoft DynamicQuantizeMatMul: input quantized per call, per-column
    weight scales)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows = weights[0][0].shape[0]
    inits, nodes, outputs = [], [], []
    for i, (q, scale) in enumerate(weights):
        inits += [numpy_helper.from_array(q.T.contiguous().numpy(), f"b{i}"), numpy_helper.from_array(scale.numpy(), f"s{i}")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["tokens", rows]))
    return _ort_run_session(
        helper,
        TensorProto,
        nodes,
        inits,
        outputs,
        cols,
        threads,
        [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ort,
    )


def _ort_run_session(helper, TensorProto, nodes, inits, outputs, cols, threads, opsets, ort):
    graph = helper.make_graph(
        nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", cols])], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _check_reference(name: str, got, x: torch.Tensor, dense: torch.Tensor) -> None:
    """A baseline must compute the product it claims (int8-activation engines agree to a few percent)."""
    ref = x.double() @ dense.double().T
    err = (torch.as_tensor(got).double() - ref).norm() / ref.norm()
    if not err < 0.05:
        raise RuntimeError(f"{name} disagrees with its dequantized weights: relative error {err:.3g}")


def bench_quantized_shape(label: str, rows: int, cols: int, args, have_ort: bool) -> list[dict]:
    from strataprune import kernels
    from strataprune.kernels import quantized as Q
    from strataprune.kernels.ops import launch_pointers

    out: list[dict] = []
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    inputs = {tokens: torch.randn(tokens, cols, generator=g) for tokens in args.tokens}

    def count(bytes_per_matrix: float, target_mb: float) -> int:
        return max(2, math.ceil(target_mb * 1e6 / bytes_per_matrix))

    def variant(i: int) -> torch.Tensor:  # distinct buffers and values per stack member (values do not change speed)
        return base * (1 + 0.01 * i)

    def record(engine, kind, tokens, sparsity, timing, stack, weight_bytes, nnz):
        per = {clock: timing[f"{clock}_s"] / stack for clock in ("wall", "cpu")}
        return {
            "shape": label,
            "rows": rows,
            "cols": cols,
            "tokens": tokens,
            "engine": engine,
            "kind": kind,
            "sparsity": sparsity,
            "stack": stack,
            "weight_bytes_per_matrix": weight_bytes / stack,
            "bytes_per_weight": weight_bytes / stack / (rows * cols),
            **timing,
            "us_per_matrix_wall": per["wall"] * 1e6,
            "us_per_matrix_cpu": per["cpu"] * 1e6,
            "GBps_wall": weight_bytes / timing["wall_s"] / 1e9,
            "GBps_cpu": weight_bytes / timing["cpu_s"] / 1e9,
            "useful_GFLOPs_cpu": 2 * tokens * nnz / timing["cpu_s"] / 1e9,
        }

    # dense references: fp32 (torch, ORT MatMul), int4 (ORT MatMulNBits), int8 (ORT DynamicQuantizeMatMul)
    s_fp32 = count(rows * cols * 4, args.stack_mb)
    dense = [variant(i) for i in range(s_fp32)]
    fp32_session = ort_session(dense, 1) if have_ort else None
    int4_session = int8_session = None
    s_int4 = count(rows * cols * (0.5 + 4.5 / ORT_INT4_BLOCK), args.quant_stack_mb)
    s_int8 = count(rows * cols, args.quant_stack_mb)
    if have_ort:
        grids = [int4_grid(variant(i), ORT_INT4_BLOCK) for i in range(s_int4)]
        int4_session = ort_matmulnbits_session(grids, cols, 1)
        q, scale, zero = grids[0]
        deq = (q.float().view(rows, -1) - zero.float().repeat_interleave(ORT_INT4_BLOCK, 1)[:, :cols]) * scale.repeat_interleave(
            ORT_INT4_BLOCK, 1
        )[:, :cols]
        _check_reference(
            "ORT MatMulNBits", int4_session.run(["y0"], {"x": inputs[args.tokens[0]].numpy()})[0], inputs[args.tokens[0]], deq
        )
        del grids
        int8_weights = []
        for i in range(s_int8):
            w = variant(i)
            sc = w.abs().amax(1) / 127
            int8_weights.append((torch.round(w / sc.unsqueeze(1)).clamp(-127, 127).to(torch.int8), sc))
        int8_session = ort_dynamic_int8_session(int8_weights, cols, 1)
        q8, sc8 = int8_weights[0]
        _check_reference(
            "ORT DynamicQuantizeMatMul",
            int8_session.run(["y0"], {"x": inputs[args.tokens[0]].numpy()})[0],
            inputs[args.tokens[0]],
            q8.float() * sc8.unsqueeze(1),
        )
        del int8_weights
    for tokens, x in inputs.items():
        engines = {"torch dense fp32": lambda x=x, dense=dense: [torch.nn.functional.linear(x, w) for w in dense]}
        stacks = {"torch dense fp32": (s_fp32, rows * cols * 4 * s_fp32, "dense fp32")}
        if have_ort:
            feed = {"x": x.numpy()}
            engines["onnxruntime MatMul fp32"] = lambda feed=feed, s=fp32_session: s.run(None, feed)
            engines["onnxruntime MatMulNBits int4 (dense)"] = lambda feed=feed, s=int4_session: s.run(None, feed)
            engines["onnxruntime DynamicQuantizeMatMul int8 (dense)"] = lambda feed=feed, s=int8_session: s.run(None, feed)
            stacks["onnxruntime MatMul fp32"] = (s_fp32, rows * cols * 4 * s_fp32, "dense fp32")
            int4_bytes = rows * cols * (0.5 + 4.5 / ORT_INT4_BLOCK) * s_int4
            stacks["onnxruntime MatMulNBits int4 (dense)"] = (s_int4, int4_bytes, "dense int4")
            stacks["onnxruntime DynamicQuantizeMatMul int8 (dense)"] = (s_int8, (rows * cols + rows * 4) * s_int8, "dense int8")
        for engine, timing in race_both(engines, args.reps).items():
            stack, nbytes, kind = stacks[engine]
            out.append(record(engine, kind, tokens, 0.0, timing, stack, nbytes, rows * cols * stack))
    dense = fp32_session = int4_session = int8_session = None  # free the dense stacks before the sparse ones
    gc.collect()

    # sparse: fp32 bitmask (best ISA, for reference) and the quantized formats on every quantized path
    paths = Q.quantized_isas()
    for sparsity in args.sparsities:
        for fmt, (bits, group) in QUANT_FORMATS.items():
            est = rows * cols * (2 / 16 + (1 - sparsity) * bits / 8 + (5 if bits == 4 else 4) / (group or cols))
            stack = count(est, args.quant_stack_mb)
            packs = []
            for i in range(stack):
                pruned = prune_random(variant(i), sparsity, seed=i)
                packs.append(Q.pack_int8(pruned, group_size=group) if bits == 8 else Q.pack_int4(pruned, group_size=group))
                del pruned
            ptrs = [Q.pointers(p) for p in packs]
            nbytes, nnz = sum(p.nbytes for p in packs), sum(p.nnz for p in packs)
            for tokens, x in inputs.items():
                engines = {}
                for path in paths:
                    if path == "portable" and tokens > Q_PORTABLE_MAX_TOKENS:
                        continue  # the scalar reference path: minutes per repetition at 128 tokens

                    def run(x=x, path=path, ptrs=ptrs):
                        with Q.use_quantized_isa(path):
                            return [Q.launch_pointers(x, ptr) for ptr in ptrs]

                    engines[f"sparse-cpu {fmt} ({path})"] = run
                for engine, timing in race_both(engines, args.reps).items():
                    out.append(record(engine, f"sparse {fmt}", tokens, sparsity, timing, stack, nbytes, nnz))
            del packs, ptrs
            gc.collect()
        # the fp32 bitmask format of the same sparsity, best path, as the step from fp32 to quantized values
        stack = count(rows * cols * (2 / 16 + (1 - sparsity) * 4), args.quant_stack_mb)
        fp = [kernels.pack(prune_random(variant(i), sparsity, seed=i)) for i in range(stack)]
        fptrs = [(p.masks.data_ptr(), p.values.data_ptr(), p.offsets.data_ptr(), None) for p in fp]
        for tokens, x in inputs.items():
            timing = race_both({"f": lambda x=x, fptrs=fptrs: [launch_pointers(x, ptr, rows, cols) for ptr in fptrs]}, args.reps)[
                "f"
            ]
            out.append(
                record(
                    f"sparse-cpu fp32 ({kernels.best_isa()})",
                    "sparse fp32",
                    tokens,
                    sparsity,
                    timing,
                    stack,
                    sum(p.nbytes for p in fp),
                    sum(p.nnz for p in fp),
                )
            )
        del fp, fptrs
        gc.collect()
    # ratios per clock: against the fastest dense fp32 engine, and against the dense engine of the same width
    for clock in ("wall", "cpu"):
        key = f"us_per_matrix_{clock}"
        for r in out:
            same = [d for d in out if d["shape"] == r["shape"] and d["tokens"] == r["tokens"]]
            fp32 = min(d[key] for d in same if d["kind"] == "dense fp32")
            r[f"vs_dense_fp32_{clock}"] = fp32 / r[key]
            width = "dense int4" if "int4" in r["kind"] else "dense int8" if "int8" in r["kind"] else None
            ref = [d[key] for d in same if d["kind"] == width]
            r[f"vs_dense_same_width_{clock}"] = ref[0] / r[key] if ref else None
    return out


Q_PORTABLE_MAX_TOKENS = 1


def quantized_markdown(rows: list[dict], meta: dict) -> str:
    setup = (
        f"{meta['cpu']} ({meta['cpu_flags']}); caches: {meta['caches']}; 1 thread; best of {meta['reps']} round-robin "
        f"repetitions, both clocks read around every repetition (wall: perf_counter; CPU: this thread's CPU time); "
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}. Load average at start {meta['load_start']}, at end "
        f"{meta['load_end']} (2 cores shared by several people: trust the CPU-clock ratios within one shape first)."
    )
    legend = (
        "Per engine a stack of S distinct [out x in] matrices is multiplied by the same input (dense fp32 stacks "
        f"{meta['stack_mb']:.0f} MB, quantized stacks >= {meta['quant_stack_mb']:.0f} MB of their own bytes); times are "
        "per matrix. B/w: bytes read per weight (ours: masks + codes + scales [+ zeros] + row offsets; MatMulNBits: "
        "4-bit codes + fp32 scale + 4-bit zero per 128; DynamicQuantizeMatMul: int8 + fp32 scale per column). "
        "x fp32: the fastest dense fp32 engine's time / this time; x same width: the dense ORT int4 (for int4) or "
        "int8 (for int8) engine's time / this time. The sparse engines quantize the input to int8 per token and "
        "128-column block on every call (time included), as MatMulNBits accuracy_level 4 and DynamicQuantizeMatMul do. "
        "The portable path is run for GEMV only: it is the scalar reference, minutes per repetition at 128 tokens."
    )
    lines = [f"# Quantized sparse kernels benchmark ({meta['timestamp']})", "", setup, "", legend, ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for tokens in dict.fromkeys(r["tokens"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["tokens"] == tokens]
            if not sel:
                continue
            lines += [
                f"## {shape}, {'GEMV (1 token)' if tokens == 1 else f'GEMM ({tokens} tokens)'}",
                "",
                (
                    "| engine | sparsity | B/w | us/matrix CPU | us/matrix wall | GB/s CPU | GB/s wall | x fp32 (CPU) | "
                    "x fp32 (wall) | x same width (CPU) | x same width (wall) |"
                ),
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                same = (
                    "-"
                    if r["vs_dense_same_width_cpu"] is None
                    else f"{r['vs_dense_same_width_cpu']:.2f} | {r['vs_dense_same_width_wall']:.2f}"
                )
                if r["vs_dense_same_width_cpu"] is None:
                    same = "- | -"
                lines.append(
                    f"| {r['engine']} | {r['sparsity']:.0%} | {r['bytes_per_weight']:.3f} | {r['us_per_matrix_cpu']:.1f} | "
                    f"{r['us_per_matrix_wall']:.1f} | {r['GBps_cpu']:.1f} | {r['GBps_wall']:.1f} | "
                    f"{r['vs_dense_fp32_cpu']:.2f} | {r['vs_dense_fp32_wall']:.2f} | {same} |"
                )
            lines.append("")
    return "\n".join(lines)


def isa_flags() -> str:
    """The SIMD flags the kernels can use that this CPU has, as one line."""
    flags = cpu_flags()
    if flags is None:
        return "flags unknown"
    wanted = (
        "avx2",
        "fma",
        "avx_vnni",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vbmi",
        "avx512_vbmi2",
        "avx512_vnni",
        "amx_int8",
    )
    return ", ".join(f for f in wanted if f in flags)


def cache_sizes() -> str:
    try:
        import subprocess

        text = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip().startswith(("L1d", "L2", "L3")))
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_quantized(args, have_ort: bool, ort_version: str) -> int:
    from strataprune import kernels

    stamp = utc_stamp()
    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    meta = {
        "timestamp": stamp,
        "cpu": cpu_model(),
        "cpu_flags": isa_flags(),
        "caches": cache_sizes(),
        "threads": 1,
        "reps": args.reps,
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "stack_mb": args.stack_mb,
        "quant_stack_mb": args.quant_stack_mb,
        "load_start": load_average(),
        "python": platform.python_version(),
    }
    from strataprune.kernels.quantized import quantized_isas

    meta["quantized_isas"] = quantized_isas()
    rows: list[dict] = []
    shapes = [s for s in args.shapes.split(",")]
    for label in shapes:
        r, c = SHAPES[label]
        print(f"{label} (quantized) ...", flush=True)
        rows += bench_quantized_shape(label, r, c, args, have_ort)
    meta["load_end"] = load_average()
    md = quantized_markdown(rows, meta)
    return write_kernel_results(args.out, f"kernels-quantized-{stamp}", {"meta": meta, "kernels": rows}, md)


# --------------------------------------------------------------------------- 1x4 block path (--blocks)
BLOCK_SHAPES = ("576x576", "192x576", "1536x576", "576x1536")  # SmolLM2-135M's Linears
BLOCK_FORMATS = {"int4-g128": (4, 128), "int8": (8, None)}  # as sparse-cpu packs a run without a grid


def prune_blocks(w: torch.Tensor, sparsity: float, seed: int) -> torch.Tensor:
    """Exactly round(sparsity * blocks) aligned 1x4 blocks zeroed at uniformly random places (cols % 4 == 0)."""
    g = torch.Generator().manual_seed(seed)
    out = w.clone()
    blocks = out.view(w.shape[0], -1, 4).view(-1, 4)
    k = round(sparsity * blocks.shape[0])
    if k:
        blocks[torch.randperm(blocks.shape[0], generator=g)[:k]] = 0
    return out


def bench_block_shape(label: str, rows: int, cols: int, args) -> list[dict]:
    """GEMV (``--block-tokens``, 1 to 4), 1 thread: per format, unstructured masks on the bitmask path and 1x4 masks on
    the bitmask path (block path off) and the block path, on every vector quantized path, raced round-robin in one
    group per token count."""
    from strataprune.kernels import quantized as Q

    out: list[dict] = []
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    inputs = {tokens: torch.randn(tokens, cols, generator=g) for tokens in args.block_tokens}
    paths = [p for p in Q.quantized_isas() if p != "portable"]
    sparsity = args.block_sparsity
    for fmt, (bits, group) in BLOCK_FORMATS.items():
        est = rows * cols * (2 / 16 + (1 - sparsity) * bits / 8 + (5 if bits == 4 else 4) / (group or cols))
        stack = max(2, math.ceil(args.quant_stack_mb * 1e6 / est))
        engines: dict[int, dict[str, Callable[[], object]]] = {}
        facts: dict[str, tuple] = {}
        keep = []
        for mask, prune in (("unstructured", prune_random), ("1x4", prune_blocks)):
            packs = []
            for i in range(stack):
                pruned = prune(base * (1 + 0.01 * i), sparsity, seed=i)
                packs.append(Q.pack_int8(pruned, group_size=group) if bits == 8 else Q.pack_int4(pruned, group_size=group))
            ptrs = [Q.pointers(p) for p in packs]
            keep.append((packs, ptrs))
            blocked = all(p.index_blocks for p in packs)
            assert blocked == (mask == "1x4"), f"{mask} masks: index_blocks {blocked}"
            bitmask_bytes = sum(p.nbytes for p in packs)
            # the block path reads the block index (1 bit per 4 columns) instead of the 16-bit mask words
            block_bytes = bitmask_bytes - sum(p.masks.numel() * 2 - Q.block_index(p).numel() for p in packs) if blocked else 0
            nnz = sum(p.nnz for p in packs)
            for tokens, x in inputs.items():
                for path in paths:
                    for index in ("bitmask", "blocks") if blocked else ("bitmask",):

                        def run(path=path, ptrs=ptrs, on=index == "blocks", x=x):
                            with Q.use_quantized_isa(path), Q.use_block_path(on):
                                return [Q.launch_pointers(x, ptr) for ptr in ptrs]

                        name = f"{fmt} {mask} {index} ({path}) x{tokens}"
                        engines.setdefault(tokens, {})[name] = run
                        facts[name] = (mask, index, path, tokens, block_bytes if index == "blocks" else bitmask_bytes, nnz)
        for tokens in inputs:
            for name, timing in race_both(engines[tokens], args.reps).items():
                mask, index, path, tokens, nbytes, nnz = facts[name]
                out.append(_block_record(label, rows, cols, fmt, mask, index, path, tokens, sparsity, stack, nbytes, nnz, timing))
        del engines, keep
        gc.collect()
    for r in out:  # speedups against the bitmask path on the same path, format and tokens: unstructured, the same 1x4 masks
        same = [
            d
            for d in out
            if (d["shape"], d["format"], d["path"], d["tokens"]) == (r["shape"], r["format"], r["path"], r["tokens"])
        ]
        for clock in ("cpu", "wall"):
            key = f"us_per_matrix_{clock}"
            unstructured = next(d for d in same if d["mask"] == "unstructured")
            r[f"vs_unstructured_{clock}"] = unstructured[key] / r[key]
            r[f"vs_bitmask_same_mask_{clock}"] = (
                next(d for d in same if d["mask"] == r["mask"] and d["index"] == "bitmask")[key] / r[key]
            )
    return out


def _block_record(label, rows, cols, fmt, mask, index, path, tokens, sparsity, stack, nbytes, nnz, timing) -> dict:
    return {
        "shape": label,
        "rows": rows,
        "cols": cols,
        "tokens": tokens,
        "format": fmt,
        "mask": mask,
        "index": index,
        "path": path,
        "sparsity": sparsity,
        "stack": stack,
        "bytes_per_weight": nbytes / stack / (rows * cols),
        **timing,
        "us_per_matrix_cpu": timing["cpu_s"] / stack * 1e6,
        "us_per_matrix_wall": timing["wall_s"] / stack * 1e6,
        "GBps_cpu": nbytes / timing["cpu_s"] / 1e9,
        "GBps_wall": nbytes / timing["wall_s"] / 1e9,
        "useful_GFLOPs_cpu": 2 * tokens * nnz / timing["cpu_s"] / 1e9,
    }


def blocks_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Quantized kernels: the 1x4 block path ({meta['utc']})",
        "",
        f"{meta['cpu']} ({meta['cpu_flags']}); caches: {meta['caches']}; 1 thread, GEMV of {meta['tokens']} token(s); "
        f"{meta['sparsity']:.0%} sparsity; best of {meta['reps']} round-robin repetitions, both clocks read around each "
        f"(wall: perf_counter; CPU: this thread's CPU time); load average at start {meta['load_start']}, at end "
        f"{meta['load_end']} (2 cores shared by several people: trust the CPU clock first). torch {meta['torch']}.",
        "",
        "Per row a stack of distinct matrices (>= "
        f"{meta['quant_stack_mb']:.0f} MB of packed bytes) multiplied by one input, time per matrix. mask: unstructured "
        "(random single weights) or 1x4 (random aligned 4-column blocks); index: bitmask = today's path (for 1x4 masks "
        "with the block path turned off), blocks = the block path. B/w: bytes the kernel reads per weight (bitmask: 16-bit "
        "mask words + codes + scales [+ zeros] + row offsets; blocks: the block index's 1 bit per 4 columns instead of the "
        "mask words); GB/s of those bytes. x unstr.: the unstructured bitmask row's time / this time (same format, same "
        "path); x bitmask: the same masks on the bitmask path / this time. Results of the two paths are bit-identical "
        "(tests/kernels/test_kernels_quantized_blocks.py).",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [
            f"## {shape}",
            "",
            "| tokens | format | mask | index | path | B/w | us/matrix CPU | us/matrix wall | GB/s CPU | GB/s wall "
            "| x unstr. (CPU) | x unstr. (wall) | x bitmask (CPU) | x bitmask (wall) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["shape"] == shape):
            lines.append(
                f"| {r['tokens']} | {r['format']} | {r['mask']} | {r['index']} | {r['path']} | {r['bytes_per_weight']:.3f} | "
                f"{r['us_per_matrix_cpu']:.1f} | {r['us_per_matrix_wall']:.1f} | {r['GBps_cpu']:.1f} | {r['GBps_wall']:.1f} | "
                f"{r['vs_unstructured_cpu']:.2f} | {r['vs_unstructured_wall']:.2f} | {r['vs_bitmask_same_mask_cpu']:.2f} | "
                f"{r['vs_bitmask_same_mask_wall']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def run_blocks(args) -> int:
    from strataprune import kernels
    from strataprune.kernels.quantized import quantized_isas

    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    meta = {
        "utc": utc_stamp(),
        "cpu": cpu_model(),
        "cpu_flags": isa_flags(),
        "caches": cache_sizes(),
        "threads": 1,
        "tokens": ",".join(map(str, args.block_tokens)),
        "reps": args.reps,
        "sparsity": args.block_sparsity,
        "torch": torch.__version__,
        "quant_stack_mb": args.quant_stack_mb,
        "quantized_isas": quantized_isas(),
        "load_start": load_average(),
        "python": platform.python_version(),
    }
    rows: list[dict] = []
    for label in args.shapes.split(","):
        print(f"{label} (1x4 blocks) ...", flush=True)
        rows += bench_block_shape(label, *SHAPES[label], args)
    meta["load_end"] = load_average()
    md = blocks_markdown(rows, meta)
    return write_kernel_results(args.out, f"kernels-blocks-{meta['utc']}", {"meta": meta, "kernels": rows}, md)


# --------------------------------------------------------------------------- end to end (SmolLM2)
def magnitude_prune_linears(model: torch.nn.Module, sparsity: float) -> None:
    """Per decoder Linear (not lm_head): zero the smallest |w| (values do not change latency, the pattern does)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                k = int(sparsity * w.numel())
                if k:
                    w.view(-1)[w.abs().flatten().argsort()[:k]] = 0


def bench_e2e(args, clock) -> list[dict]:
    from strataprune import kernels
    from strataprune.models.loading import load_model

    loaded = load_model("smollm2-135m")
    dense = loaded.model.float().eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 128), generator=g)
    new_tokens = 32
    results = []

    def measure(model) -> dict:
        def prefill():
            with torch.no_grad():
                model(prompt, use_cache=False)

        def generate(n):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

        reps = max(3, args.reps // 2)
        t_prefill = race({"p": prefill}, reps, clock)["p"]
        t_first = race({"g": lambda: generate(1)}, reps, clock)["g"]
        t_all = race({"g": lambda: generate(new_tokens + 1)}, reps, clock)["g"]
        decode_s = (t_all["best_s"] - t_first["best_s"]) / new_tokens
        return {
            "prefill_128_ms": t_prefill["best_s"] * 1e3,
            "decode_ms_per_token": decode_s * 1e3,
            "decode_tokens_per_s": 1 / decode_s,
        }

    base = measure(dense)
    results.append({"model": "SmolLM2-135M", "engine": "torch dense", "sparsity": 0.0, **base, "converted": 0})
    print(f"  e2e dense: prefill {base['prefill_128_ms']:.1f} ms, decode {base['decode_tokens_per_s']:.1f} tok/s", flush=True)
    for sparsity in args.e2e_sparsities:
        model = copy.deepcopy(dense)
        magnitude_prune_linears(model, sparsity)
        report = kernels.sparsify_model(model, min_sparsity=min(0.5, sparsity), threads=args.threads)
        m = measure(model)
        results.append(
            {
                "model": "SmolLM2-135M",
                "engine": "sparse-cpu (sparsify_model)",
                "sparsity": sparsity,
                **m,
                "converted": len(report.converted),
                "packed_over_dense_bytes": report.packed_bytes / report.dense_bytes,
            }
        )
        print(
            f"  e2e {sparsity:.0%}: prefill {m['prefill_128_ms']:.1f} ms, decode {m['decode_tokens_per_s']:.1f} tok/s", flush=True
        )
        del model
        gc.collect()
    for r in results:
        r["prefill_speedup"] = base["prefill_128_ms"] / r["prefill_128_ms"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return results


# --------------------------------------------------------------------------- report
def verdicts(rows: list[dict], meta: dict) -> list[str]:
    """The targets at 70% and, where missed, by how much and a profile of why."""
    lines = []
    gemv_dense = [r["GBps"] for r in rows if r["tokens"] == 1 and "dense" in r["engine"]]
    # the memory ceiling: the faster of a plain streaming read and the best dense GEMV of this run
    stream = max([meta["stream_read_GBps"], *gemv_dense])
    meta["read_ceiling_GBps"] = stream
    for tokens, target in TARGETS.items():
        for shape in dict.fromkeys(r["shape"] for r in rows):
            ours = [
                r
                for r in rows
                if r["shape"] == shape and r["tokens"] == tokens and r["sparsity"] == 0.7 and r["engine"].startswith("sparse-cpu")
            ]
            dense = [r for r in rows if r["shape"] == shape and r["tokens"] == tokens and "dense" in r["engine"]]
            if not ours or not dense:
                continue
            best = max(ours, key=lambda r: r["vs_fastest_dense"])
            fastest = min(dense, key=lambda r: r["best_s"])
            ratio = best["vs_fastest_dense"]
            kind = "GEMV" if tokens == 1 else f"{tokens}-token GEMM"
            head = (
                f"- {shape} {kind} at 70%: {ratio:.2f}x {fastest['engine']} (target {target}x; "
                f"{best['best_s'] / best['stack'] * 1e6:.1f} us per matrix): "
                f"{'met' if ratio >= target else f'missed by {target / ratio:.2f}x'}"
            )
            if tokens == 1:
                detail = (
                    f"reads {best['weight_bytes'] / fastest['weight_bytes']:.3f} of the dense bytes at {best['GBps']:.1f} GB/s "
                    f"({best['GBps'] / stream:.0%} of the {stream:.1f} GB/s best read bandwidth measured in this run; "
                    f"{fastest['engine']} streams {fastest['GBps']:.1f} GB/s = {fastest['GBps'] / stream:.0%})"
                )
                if ratio < target:
                    ideal = (fastest["weight_bytes"] / best["weight_bytes"]) * (best["GBps"] / fastest["GBps"])
                    detail += (
                        f"; at the dense engine's bandwidth the byte ratio alone would give "
                        f"{fastest['weight_bytes'] / best['weight_bytes']:.2f}x, the kernel reaches {ideal:.2f}x because "
                        f"it streams {best['GBps'] / fastest['GBps']:.0%} as fast (per-16-column mask/expand work and "
                        f"short per-row streams, not DRAM bandwidth, bound it)"
                    )
            else:
                detail = (
                    f"{best['useful_GFLOPs']:.0f} GFLOP/s on the nonzeros vs {fastest['dense_GFLOPs']:.0f} GFLOP/s dense "
                    f"({best['useful_GFLOPs'] / fastest['dense_GFLOPs']:.0%} of the dense engine's FLOP rate on 30% of the "
                    f"FLOPs)"
                )
                if ratio < target:
                    detail += (
                        "; each nonzero costs a broadcast, an index load and four 16-token loads of the input "
                        "(gathered from L1: no input vector is reused across rows) where a dense GEMM reuses "
                        "registers, and the masks are decoded once per 128 tokens"
                    )
            lines.append(f"{head}; {detail}.")
    return lines


def markdown(rows: list[dict], e2e: list[dict], meta: dict) -> str:
    targets = verdicts(rows, meta)
    setup = (
        f"{meta['cpu']}, {meta['threads']} thread(s), clock: {meta['clock']}, best of {meta['reps']} round-robin "
        f"repetitions; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}; kernels ISA {meta['isa']}. "
        f"Load average at start {meta['load_start']}, at end {meta['load_end']} (the machine is shared: "
        f"compare ratios within this run). Streaming read (torch.sum over 256 MB) measured here: "
        f"{meta['stream_read_GBps']:.1f} GB/s; the read ceiling used below is the faster of it and the best dense "
        f"GEMV: {meta.get('read_ceiling_GBps', meta['stream_read_GBps']):.1f} GB/s."
    )
    legend = (
        "Each row multiplies a stack of S [out x in] fp32 weights (>= the stack size below in dense bytes) by the "
        "same input. GB/s: weight bytes read per second (dense 4 B/weight, packed format 0.14 + 4 x density "
        "B/weight, CSR 12 B/nonzero); dense-eq GFLOP/s: 2 x tokens x out x in / time; useful: 2 x tokens x nnz "
        "/ time; x fastest dense: the fastest dense engine's time for the same shape and tokens / this time."
    )
    lines = [f"# CPU sparse kernels benchmark ({meta['timestamp']})", "", setup, "", legend, ""]
    lines += ["## Targets (70% unstructured)", ""] + targets + [""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for tokens in dict.fromkeys(r["tokens"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["tokens"] == tokens]
            if not sel:
                continue
            lines += [
                f"## {shape}, {tokens} token{'s' if tokens > 1 else ''} (stack of {sel[0]['stack']})",
                "",
                "| engine | sparsity | ms / stack | median ms | us / matrix | GB/s | dense-eq GFLOP/s | useful GFLOP/s "
                "| x fastest dense |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                lines.append(
                    f"| {r['engine']} | {r['sparsity']:.0%} | {r['best_s'] * 1e3:.2f} | {r['median_s'] * 1e3:.2f} | "
                    f"{r['best_s'] / r['stack'] * 1e6:.1f} | "
                    f"{r['GBps']:.1f} | {r['dense_GFLOPs']:.1f} | {r['useful_GFLOPs']:.1f} | {r['vs_fastest_dense']:.2f} |"
                )
            lines.append("")
    if e2e:
        how = (
            "Magnitude-pruned per decoder Linear, converted with `sparsify_model` (lm_head, tied to the "
            "embeddings, stays dense). Prefill: one forward of 128 tokens; decode: greedy generate, 32 new "
            "tokens after a 128-token prompt, (time(33) - time(1)) / 32."
        )
        lines += [
            "## SmolLM2-135M end to end (torch + transformers generate, KV cache)",
            "",
            how,
            "",
            "| engine | sparsity | Linears converted | prefill 128 (ms) | x dense | decode (ms/token) | tokens/s | x dense |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in e2e:
            lines.append(
                f"| {r['engine']} | {r['sparsity']:.0%} | {r['converted']} | {r['prefill_128_ms']:.1f} | "
                f"{r['prefill_speedup']:.2f} | {r['decode_ms_per_token']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['decode_speedup']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_kernel_results(folder: str, name: str, payload: dict, md: str) -> int:
    """``<folder>/<name>.json`` (indent 1) and ``.md``, the Markdown printed too; the exit status of a finished run."""
    files = ResultFiles(folder, name)
    files.write_json(payload, indent=1)
    files.write_markdown(md)
    print(md)
    print(f"wrote {files.path('.md')} and .json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9")
    parser.add_argument("--tokens", default="1,128")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--stack-mb", dest="stack_mb", type=float, default=256.0, help="dense MB per stack")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (only with --threads 1)")
    parser.add_argument("--isas", choices=("best", "all"), default="best", help="all: every SIMD path of this CPU")
    parser.add_argument("--no-csr", dest="no_csr", action="store_true", help="skip torch's CSR matmul")
    parser.add_argument("--e2e", action="store_true", help="also SmolLM2-135M end to end")
    parser.add_argument("--e2e-sparsities", dest="e2e_sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--no-kernels", dest="no_kernels", action="store_true", help="only the end-to-end part")
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, 64 MB stacks, 3 repetitions")
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="the int8/int4 sparse kernels (1 thread, every path) against dense fp32, int4 and int8 engines; "
        f"default shapes {','.join(QUANT_SHAPES)}, sparsities 0.5,0.7,0.9",
    )
    parser.add_argument(
        "--quant-stack-mb",
        dest="quant_stack_mb",
        type=float,
        default=64.0,
        help="quantized stacks: at least this many MB of their own bytes",
    )
    parser.add_argument(
        "--blocks",
        action="store_true",
        help="the quantized 1-token GEMV on 1x4-blocked masks: block path vs bitmask path vs unstructured masks, "
        f"1 thread, every vector path; default shapes {','.join(BLOCK_SHAPES)}",
    )
    parser.add_argument("--block-sparsity", dest="block_sparsity", type=float, default=0.7, help="--blocks: sparsity")
    parser.add_argument("--block-tokens", dest="block_tokens", default="1", help="--blocks: token counts, 1 to 4 (the GEMV)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.blocks and args.shapes == ",".join(SHAPES):
        args.shapes = ",".join(BLOCK_SHAPES)
    if args.quantized:
        if args.shapes == ",".join(SHAPES):
            args.shapes = ",".join(QUANT_SHAPES)
        if args.sparsities == "0,0.5,0.7,0.8,0.9":
            args.sparsities = "0.5,0.7,0.9"
    try:
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        args.sparsities = [float(s) for s in args.sparsities.split(",")]
        args.tokens = [int(t) for t in args.tokens.split(",")]
        args.e2e_sparsities = [float(s) for s in args.e2e_sparsities.split(",")]
        args.block_tokens = [int(t) for t in args.block_tokens.split(",")]
        if any(not 1 <= t <= 4 for t in args.block_tokens):
            raise ValueError(f"--block-tokens {args.block_tokens}: 1 to 4")
        if not 0 < args.block_sparsity < 1:
            raise ValueError(f"--block-sparsity {args.block_sparsity}: above 0 and below 1")
    except (KeyError, ValueError) as exc:
        print(
            f"error: bad --shapes/--sparsities/--tokens/--block-tokens/--block-sparsity value {exc}; "
            f"shapes allowed: {', '.join(SHAPES)}",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        shapes, args.stack_mb, args.reps = {"4096x4096": SHAPES["4096x4096"]}, 64.0, 3
    if args.clock == "cpu" and args.threads != 1:
        print("error: --clock cpu measures the calling thread only: use it with --threads 1", file=sys.stderr)
        return 2

    from strataprune import kernels

    if not kernels.available():
        print(f"error: {kernels.available().reason}", file=sys.stderr)
        return 2
    try:
        import onnxruntime

        have_ort, ort_version = True, onnxruntime.__version__
    except ImportError:
        have_ort, ort_version = False, "not installed (pip install 'strataprune[bench]')"
        print("warning: onnxruntime missing: dense ratios are against torch only", file=sys.stderr)

    if args.quantized:
        return run_quantized(args, have_ort, ort_version)
    if args.blocks:
        return run_blocks(args)
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    clock = clock_for(args.clock)
    stamp = utc_stamp()
    meta = {
        "timestamp": stamp,
        "cpu": cpu_model(),
        "threads": args.threads,
        "clock": args.clock,
        "reps": args.reps,
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "isa": kernels.best_isa(),
        "isas": kernels.isas(),
        "stack_mb": args.stack_mb,
        "load_start": load_average(),
        "python": platform.python_version(),
    }
    meta["stream_read_GBps"] = stream_bandwidth(args.threads, args.reps, clock)
    print(f"streaming read: {meta['stream_read_GBps']:.1f} GB/s ({args.threads} threads)", flush=True)

    rows: list[dict] = []
    if not args.no_kernels:
        for label, (r, c) in shapes.items():
            print(f"{label} ...", flush=True)
            rows += bench_shape(label, r, c, args, clock, have_ort)
        add_ratios(rows)
    e2e = bench_e2e(args, clock) if args.e2e else []
    meta["load_end"] = load_average()

    md = markdown(rows, e2e, meta)
    return write_kernel_results(args.out, f"kernels-{stamp}", {"meta": meta, "kernels": rows, "e2e": e2e}, md)


if __name__ == "__main__":
    raise SystemExit(main())
