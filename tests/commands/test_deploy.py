"""`strataprune deploy` and `strataprune bench` on tiny runs: outputs, report format, verdicts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strataprune.cli import main
from strataprune.deploy.bench import _verdicts, amdahl_cap, format_markdown, format_table

pytestmark = pytest.mark.slow  # every test deploys or benchmarks tiny runs it prunes first

RUN_FLAGS = ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", "--quiet"]


def _onnxruntime_state():
    from strataprune.contract.registry import get_registry

    return get_registry().create("backend", "onnxruntime").available()


# the backend's own check (onnxruntime, onnx and onnxscript installed and importable), with its reason and install hint
_ORT = _onnxruntime_state()
needs_onnxruntime = pytest.mark.skipif(not _ORT.ok, reason=f"the onnxruntime backend is not available here: {_ORT.reason}")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=rng)) for _ in range(100)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def run70(tiny_llama_dir, text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run70"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_llama_dir),
                "--calibration",
                str(text),
                "--eval-data",
                str(text),
                "--sparsity",
                "0.7",
                "--output",
                str(out),
                *RUN_FLAGS,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def run_int4(tiny_llama_dir, text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run50q"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_llama_dir),
                "--calibration",
                str(text),
                "--eval-data",
                str(text),
                "--pruner",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--set",
                "pruner.wbits=4",
                "--set",
                "pruner.groupsize=32",
                "--output",
                str(out),
                *RUN_FLAGS,
            ]
        )
        == 0
    )
    return out


@needs_onnxruntime
def test_deploy_writes_a_compressed_checkpoint_an_engine_artifact_and_parity(run70, tmp_path, capsys):
    out = tmp_path / "deployed"
    assert main(["deploy", str(run70), "--backend", "onnxruntime", "--output", str(out), "--prompt-len", "24", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "strataprune-sparse checkpoint" in printed and "parity vs torch" in printed
    info = json.loads((out / "deploy.json").read_text())
    assert info["backend"] == "onnxruntime" and (out / info["artifact"]).is_file()
    assert info["parity"]["relative"] <= info["parity"]["tolerance"] == 1e-3 and info["parity"]["greedy_identical"]
    assert info["storage"]["format"] == "strataprune-sparse" and info["storage"]["encoded_matrices"] == 21
    assert info["storage"]["sparsity_of_encoded"] == pytest.approx(0.69, abs=0.02)
    assert {"tokenizer.json", "allocation.json", "report.json", "recipe.yaml", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }

    from strataprune.deploy.rundir import load_causal_lm, open_run

    open_run(out)  # the output is a run folder itself
    original, deployed = load_causal_lm(run70).state_dict(), load_causal_lm(out).state_dict()
    assert all(torch.equal(deployed[k], v) for k, v in original.items())


@needs_onnxruntime
def test_int4_run_deploys_as_matmulnbits_with_parity(run_int4, tmp_path, capsys):
    out = tmp_path / "deployed-int4"
    assert main(["deploy", str(run_int4), "--backend", "onnxruntime", "--output", str(out), "--prompt-len", "24", "--quiet"]) == 0
    info = json.loads((out / "deploy.json").read_text())
    assert info["engine"]["format"] == "onnx + MatMulNBits int4" and info["engine"]["int4"]["replaced"] == 21
    assert info["parity"]["greedy_identical"] and info["parity"]["relative"] <= 1e-3
    import onnx

    graph = onnx.load(str(out / info["artifact"]))
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == 21
    assert (out / "quantization.json").is_file()


@needs_onnxruntime
def test_bench_reports_dense_and_pruned_on_each_engine_with_speedups(run70, tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                str(run70),
                "--backends",
                "torch,onnxruntime",
                "--prompt-len",
                "16",
                "--decode-tokens",
                "3",
                "--repeats",
                "2",
                "--warmup",
                "0",
                "--parity-steps",
                "3",
                "--threads",
                "1",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "speedup prefill" in printed and "verdict" in printed
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["backend"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {("torch", "dense"), ("torch", "pruned"), ("onnxruntime", "dense"), ("onnxruntime", "pruned")}
    for row in rows.values():
        assert row["prefill_ms"]["min"] <= row["prefill_ms"]["median"] <= row["prefill_ms"]["max"]
        assert row["prefill_ms"]["n"] == 2 and row["decode_ms_per_token"]["n"] == 2
    fastest = min((r for r in rows.values() if r["variant"] == "dense"), key=lambda r: r["prefill_ms"]["median"])
    assert fastest["speedup_prefill"] == 1.0 and fastest["verdict"] == "baseline"
    pruned = rows[("onnxruntime", "pruned")]
    assert pruned["speedup_prefill"] == pytest.approx(fastest["prefill_ms"]["median"] / pruned["prefill_ms"]["median"])
    assert any("unstructured zeros on a dense engine" in why for why in pruned["why"])
    assert rows[("torch", "dense")]["parity"]["reference"] == "itself" and pruned["parity"]["reference"] == "torch"
    markdown = (out / "bench.md").read_text()
    assert markdown.count("| onnxruntime |") == 2 and "Speedup: median latency of the fastest dense engine" in markdown


def _row(backend, variant, prefill, decode, formats=()):
    return {
        "backend": backend,
        "engine": backend,
        "variant": variant,
        "batch": 1,
        "prompt_len": 128,
        "prefill_ms": {"median": prefill[1], "min": prefill[0], "max": prefill[2], "n": 3},
        "decode_ms_per_token": {"median": decode[1], "min": decode[0], "max": decode[2], "n": 3},
        "artifact_bytes": 1000,
        "checkpoint_bytes": 500,
        "format": "x",
        "sparse_formats": list(formats),
        "parity": {"relative": 1e-6, "tolerance": 1e-3, "reference": "torch"},
        "notes": {},
    }


def test_verdict_compares_with_the_fastest_dense_engine_and_ignores_overlapping_noise():
    facts = {
        "target": "0.7",
        "realised_sparsity": 0.7,
        "prunable_parameters": 900,
        "model_parameters": 1000,
        "lm_head_parameters": 100,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "quantized": False,
        "nm": False,
    }
    rows = [
        _row("onnxruntime", "dense", (9, 10, 11), (4, 5, 6)),
        _row("sparse", "dense", (14, 15, 16), (9, 10, 11), ("unstructured",)),
        _row("sparse", "pruned", (6, 7, 12), (4.6, 4.8, 5.5), ("unstructured",)),  # faster at prefill; decode inside the noise
        _row("onnxruntime", "pruned", (12, 13, 14), (4, 5, 6)),
    ]
    _verdicts(rows, {"pruned": facts})
    dense_ort, dense_sparse, sparse, ort = rows
    assert dense_ort["verdict"] == "baseline" and dense_sparse["verdict"] == "dense"
    assert sparse["speedup_prefill"] == pytest.approx(10 / 7) and sparse["baseline_prefill"] == "onnxruntime"
    assert sparse["verdict"] == "faster at prefill"
    assert ort["verdict"] == "slower at prefill" and any("dense engine" in w for w in ort["why"])
    assert not any("dense engine" in w for w in sparse["why"]) and any("too small" in w for w in sparse["why"])
    assert amdahl_cap(facts) == pytest.approx(1 / (0.1 + 0.9 * 0.3))
    report = {
        "rows": rows,
        "skipped": [{"backend": "deepsparse", "reason": "not installed"}],
        "run_dirs": ["r"],
        "dense_model": "d",
        "models": {"pruned": facts},
        "settings": {"batch": 1, "decode_tokens": 3, "warmup": 1, "repeats": 3},
        "machine": {"cpu": "cpu", "threads": 2, "load_average_1m": 0.5, "note": "n"},
        "speedup_rule": "s",
        "parity_rule": "p",
    }
    table = format_table(report)
    assert "1.43x" in table and "skipped deepsparse: not installed" in table
    assert format_markdown(report).count("\n| ") == 5


# --------------------------------------------------------------------------- bad input
def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_error_line_and_nothing_is_written(run70, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["deploy", str(empty), "--backend", "torch", "--output", str(out)]) == 2
    assert "not a strataprune run output" in _one_error(capsys)
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in _one_error(capsys)

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in run70.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["deploy", str(broken), "--backend", "torch", "--output", str(out)]) == 2
    assert "truncated" in _one_error(capsys)
    (broken / "report.json").write_text("{not json")
    assert main(["bench", str(broken)]) == 2
    assert "report.json' is corrupt" in _one_error(capsys)

    assert main(["bench", str(run70), "--prompt-len", "250", "--backends", "torch"]) == 2
    assert "exceeds the model's context of 256 tokens" in _one_error(capsys)
    assert main(["deploy", str(run70), "--backend", "torch", "--prompt-len", "300", "--output", str(out)]) == 2
    assert "context of 256 tokens" in _one_error(capsys)
    assert main(["bench", str(run70), "--backends", "onnxruntim"]) == 2
    assert "did you mean 'onnxruntime'" in _one_error(capsys)
    assert main(["deploy", str(run70), "--backend", "torch-2:4", "--output", str(out)]) == 2 or torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "not available here" in _one_error(capsys)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unavailable_engine_is_a_one_line_error_with_the_reason(run70, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STRATAPRUNE_CACHE", str(tmp_path / "empty-cache"))
    assert main(["bench", str(run70), "--backends", "deepsparse"]) == 2
    assert "strataprune backends install deepsparse" in _one_error(capsys)


def test_existing_output_is_kept_without_overwrite(run70, tmp_path, capsys):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(["deploy", str(run70), "--backend", "torch", "--output", str(out)]) == 2
    assert "not empty" in _one_error(capsys) and (out / "precious.txt").read_text() == "keep"
