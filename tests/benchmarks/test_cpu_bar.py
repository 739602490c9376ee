"""benchmarks/cpu_bar.py: the model choice, ONNX Runtime's fp32 and INT4 (MatMulNBits) rows, the targets, the packed-run
cache, bad arguments (one `error:` line and exit 2, before any model loads).

A tiny random Llama (the ~1B builder of benchmarks/bench_models.py with small shapes) stands in for the real models.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cpu_bar = _load("cpu_bar")
bench_models = _load("bench_models")
#: the ~1B Llama's config at toy sizes (same vocabulary, tokenizer and special tokens)
TINY = {**bench_models.LLAMA_1B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bench_models.ensure_llama1b(tmp_path_factory.mktemp("tiny") / "dense", TINY)


@pytest.fixture(scope="module")
def tiny_onnx(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return cpu_bar.ort_fp32(tiny, tmp_path_factory.mktemp("onnx") / "onnx-fp32")


def test_the_random_llama_has_the_given_shapes_and_is_built_once(tiny: Path) -> None:
    import json

    config = json.loads((tiny / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads")} == {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
    }
    assert (tiny / "tokenizer.json").is_file() and not tiny.with_name("dense.tmp").exists()
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    assert bench_models.ensure_llama1b(tiny, TINY) == tiny and (tiny / "model.safetensors").stat().st_mtime_ns == stamp
    # the default shapes are TinyLlama-1.1B's with SmolLM2's vocabulary
    big = bench_models.LLAMA_1B
    assert (big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"], big["vocab_size"]) == (2048, 5632, 22, 49152)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(path: Path, info: dict, ids: np.ndarray) -> np.ndarray:
    session = _session(path)
    feeds = {"input_ids": ids[None, :].astype(np.int64)}
    for i in range(info["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, info["kv_heads"], 0, info["head_dim"]), np.float32)
    return session.run(["logits"], feeds)[0][0]


def test_ort_int4_packs_every_weight_matmul_head_included_in_blocks_of_32(tiny: Path, tiny_onnx: tuple, tmp_path: Path) -> None:
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    fp32 = tiny_onnx
    path, info = cpu_bar.ort_int4(fp32, tmp_path / "onnx-int4")
    # 7 Linears per layer and the tied lm_head (reached through a Transpose of the embedding until it is folded)
    assert info["matmulnbits"] == 7 * TINY["num_hidden_layers"] + 1 and info["folded_transposes"] == 1
    graph = onnx.load(str(path))
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["block_size"], attrs["bits"], attrs["accuracy_level"]) == (32, 4, 4)
    # no MatMul left multiplies by a constant weight (those left: attention's QK^T and PV, RoPE's frequencies)
    constants = {i.name for i in graph.graph.initializer}
    assert all(n.input[1] not in constants for n in graph.graph.node if n.op_type == "MatMul")
    ids = np.arange(1, 17)
    exact = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.no_grad():
        reference = exact(torch.as_tensor(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(_logits(*fp32, ids), reference, atol=1e-4 * np.abs(reference).max())
    # 4-bit weights move the logits, but stay close: random N(0, 0.02) weights, per-block scales
    int4 = _logits(path, info, ids)
    assert np.corrcoef(int4.ravel(), reference.ravel())[0, 1] > 0.98
    assert not np.allclose(int4, reference, atol=1e-6)
    # cached: a second call reads the facts back without quantizing again
    stamp = path.stat().st_mtime_ns
    assert cpu_bar.ort_int4(fp32, tmp_path / "onnx-int4") == (path, info) and path.stat().st_mtime_ns == stamp


def test_folding_a_transposed_constant_keeps_the_product(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 3)).astype(np.float32)  # (out, in), as an lm_head
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert cpu_bar.fold_transposed_weights(model) == 1
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    folded = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == matmul.input[1]))
    np.testing.assert_array_equal(folded, weight.T)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(_session(tmp_path / "m.onnx").run(None, {"x": x})[0], x @ weight.T, rtol=1e-5)


def test_ort_rows_time_a_cached_export(tiny: Path, tiny_onnx: tuple) -> None:
    stamp = tiny_onnx[0].stat().st_mtime_ns
    assert cpu_bar.ort_fp32(tiny, tiny_onnx[0].parent) == tiny_onnx and tiny_onnx[0].stat().st_mtime_ns == stamp  # cached
    row = cpu_bar.ort_engine(tiny_onnx, np.arange(1, 9), 1, 2, 0, 1)
    assert row["file_bytes"] > 4 * 49152 * 64 and row["decode_ms_per_token"]["wall"] > 0 and row["prefill_ms"]["cpu"] >= 0


def _row(decode: float, prefill: float | None) -> dict:
    return {
        "decode_ms_per_token": {"wall": decode, "cpu": decode},
        "prefill_ms": {"wall": prefill, "cpu": prefill} if prefill else None,
    }


def test_the_targets_compare_the_native_rows_with_their_baselines() -> None:
    rows = {
        "llama.cpp F32": _row(400.0, 5000.0),
        "llama.cpp Q8_0": _row(150.0, 4000.0),
        "llama.cpp Q4_0": _row(100.0, 3000.0),
        "onnxruntime fp32 dense": _row(420.0, 4500.0),
        "onnxruntime int4 dense": _row(120.0, 2000.0),
        "native int4 lm_head int8 s70": _row(50.0, 1000.0),
        "native int4 lm_head int8 s70 isa avx2": _row(10.0, 10.0),  # forced paths and batches are not the target rows
        "native int4 lm_head int8 s70 batch 4": _row(1.0, None),
        "native int8 lm_head fp32 s70": _row(125.0, 4000.0),
        "native fp32 lm_head fp32 s70": _row(200.0, 4000.0),
    }
    lines = cpu_bar.target_lines(rows)
    table = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in lines[2:]}
    assert set(table) == {("int4 vs llama.cpp Q4_0", "int8"), ("int8 vs llama.cpp Q8_0", "fp32"),
                          ("fp32 vs onnxruntime fp32 dense", "fp32")}  # fmt: skip
    # int4: 100 / 50 = 2.00x decode; prefill against the faster of Q4_0 (3000) and ORT int4 (2000): 2.00x
    assert "2.00x (target 1.3x: met)" in table[("int4 vs llama.cpp Q4_0", "int8")]
    assert "2.00x (target 1.3x: met) vs onnxruntime int4 dense" in table[("int4 vs llama.cpp Q4_0", "int8")]
    # int8: 150 / 125 = 1.20x, 1 - 1.2 / 1.5 = 20% short; prefill 4000 / 4000 = 1.00x, 23% short of 1.3x
    assert "1.20x (target 1.5x: missed by 20%)" in table[("int8 vs llama.cpp Q8_0", "fp32")]
    assert "1.00x (target 1.3x: missed by 23%) vs llama.cpp Q8_0" in table[("int8 vs llama.cpp Q8_0", "fp32")]
    # fp32: 420 / 200 = 2.10x (12.5% short of 2.4x); prefill against ORT fp32 (4500 < F32's 5000): 1.12x
    assert "2.10x (target 2.4x: missed by 12%)" in table[("fp32 vs onnxruntime fp32 dense", "fp32")]
    assert "1.12x (target 1.3x: missed by 13%) vs onnxruntime fp32 dense" in table[("fp32 vs onnxruntime fp32 dense", "fp32")]
    assert cpu_bar.target_lines({"llama.cpp Q4_0": _row(1.0, 1.0)}) == []


def test_the_table_has_ratios_against_ort_int4() -> None:
    rows = {
        "llama.cpp Q4_0": _row(100.0, 3000.0),
        "onnxruntime int4 dense": _row(120.0, 2000.0),
        "native int4 lm_head int8 s70": _row(40.0, 1000.0),
    }
    report = {
        "utc": "T",
        "model": "llama1b",
        "machine": {"cpu": "x", "isa": ["avx2"], "cpus": 2, "load_average": (1.0, 1.0, 1.0)},
        "load_after": (2.0, 2.0, 2.0),
        "prompt_len": 128,
        "decode_tokens": 32,
        "repeats": 3,
        "warmup": 1,
        "threads": {"1": rows},
    }
    text = cpu_bar.markdown(report)
    assert "llama1b" in text.splitlines()[0] and "| vs ORT int4 |" in text
    line = next(line for line in text.splitlines() if line.startswith("| native int4 lm_head int8 s70 |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    # decode vs Q4_0, Q8_0 (absent), ORT fp32 (absent), ORT int4; then prefill the same four
    assert cells[4:8] == ["2.50x", "-", "-", "3.00x"] and cells[10:14] == ["3.00x", "-", "-", "2.00x"]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--model", "llama7b"], "--model 'llama7b'"),
        (["--ort", "fp32,int3"], "--ort 'fp32,int3'"),
        (["--native-bits", "16"], "--native-bits '16'"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], names: str, capsys: pytest.CaptureFixture) -> None:
    assert cpu_bar.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0]


def test_bad_arguments_from_the_command_line_exit_2_without_a_traceback() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_bar.py"), "--model", "gpt2"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "smollm2-135m or llama1b" in done.stderr


def test_a_pruned_run_is_reused_and_a_failed_one_says_why(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "report.json").write_text("{}")
    assert bench_models.prune_run(tmp_path / "no-such-model", done, ["--sparsity", "0.7"]) == done  # nothing run
    with pytest.raises(SystemExit, match="pruning broken failed"):
        bench_models.prune_run(tmp_path / "no-such-model", tmp_path / "broken", ["--sparsity", "0.7"])
    assert not (tmp_path / "broken" / "report.json").exists()


def test_packed_runs_are_cached_per_run_and_repacked_when_the_run_is_newer(tiny: Path, tmp_path: Path) -> None:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != TINY["vocab_size"]:
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0.0
    run = tmp_path / "run70"
    model.save_pretrained(run)
    (run / "report.json").write_text("{}")
    work = tmp_path / "work"
    packed = cpu_bar.packed_model(run, 8, 1, work)
    folders = sorted(p.name for p in work.iterdir())
    assert len(folders) == 1 and folders[0].startswith(f"packed-v{cpu_bar.PACKING}-8-run70-")  # no temporary folder left
    weights = work / folders[0] / "model.safetensors"
    inode = weights.stat().st_ino
    assert cpu_bar.packed_model(run, 8, 1, work) is not None and weights.stat().st_ino == inode  # reused
    later = weights.stat().st_mtime + 10
    os.utime(run / "report.json", (later, later))
    cpu_bar.packed_model(run, 8, 1, work)
    assert weights.stat().st_ino != inode and sorted(p.name for p in work.iterdir()) == folders  # repacked in place
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        got, want = packed(ids).logits, model(ids).logits
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.99  # int8 codes of the same weights


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_bar.py"), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--llama-lib-avx2", "/nonexistent/llama-avx2"], ["/nonexistent/llama-avx2", "libllama.so"]),
        (["--native-isas", "avx2,sse9"], ["avx2,sse9", "avx2-novnni"]),
        (["--native-batch", "-1"], ["--native-batch -1", ">= 0"]),
    ],
)
def test_bad_options_are_one_error_line(args: list[str], names: list[str], tmp_path: Path) -> None:
    done = run(*args, "--results", str(tmp_path / "results"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in names), done.stderr
    assert not (tmp_path / "results").exists()


def test_an_empty_library_folder_is_refused(tmp_path: Path) -> None:
    done = run("--llama-lib-avx2", str(tmp_path), "--results", str(tmp_path / "results"))
    assert done.returncode == 2 and "holds no libllama.so" in done.stderr
