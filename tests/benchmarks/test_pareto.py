"""benchmarks/pareto.py's pure logic: the Pareto front, point specs, run recipes, the table, bad arguments."""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("pareto_benchmark", ROOT / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pareto = _load()


def front_by_definition(points: list[tuple[float, float]]) -> list[bool]:
    """A point is on the front iff no other is at least as good on both (lower ppl, higher speed) and better on one."""
    out = []
    for i, (p, s) in enumerate(points):
        if math.isnan(p) or math.isnan(s):
            out.append(False)
            continue
        dominated = False
        for j, (q, t) in enumerate(points):
            if j != i and not (math.isnan(q) or math.isnan(t)) and q <= p and t >= s and (q < p or t > s):
                dominated = True
        out.append(not dominated)
    return out


def test_the_front_matches_the_definition_on_random_sets_with_ties_and_nans() -> None:
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(0, 12)
        # few distinct values so that equal perplexities, equal speeds and exact duplicates are common
        points = [(float(rng.randint(1, 6)), float(rng.randint(1, 6))) for _ in range(n)]
        if n and rng.random() < 0.3:
            points[rng.randrange(n)] = (float("nan"), 3.0)
        assert pareto.pareto_front(points) == front_by_definition(points), points


def test_the_front_on_a_hand_made_case() -> None:
    # (ppl, tok/s): the fast-but-bad, the slow-but-good and the knee are on it; the dominated middle one is not
    points = [(400.0, 80.0), (32.0, 17.0), (35.0, 54.0), (40.0, 50.0), (35.0, 54.0)]
    assert pareto.pareto_front(points) == [True, True, True, False, True]


@pytest.mark.parametrize(
    ("text", "engine", "model"),
    [
        ("llama.cpp:Q4_0@dense", "llama.cpp:Q4_0", "dense"),
        ("sparse-cpu:bits=4@s70-int4", "sparse-cpu:bits=4", "s70-int4"),
        ("sparse-cpu:engine=native:bits=8@s50", "sparse-cpu:engine=native:bits=8", "s50"),
        ("onnxruntime@s0-int4", "onnxruntime", "s0-int4"),
        ("onnxruntime-int4@dense", "onnxruntime-int4", "dense"),
        ("sparse-cpu:bits=4:lm_head=int8@s60-int4", "sparse-cpu:bits=4:lm_head=int8", "s60-int4"),
    ],
)
def test_point_specs_parse(text: str, engine: str, model: str) -> None:
    point = pareto.parse_point(text)
    assert (point.engine, point.model, point.spec) == (engine, model, text)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("llama.cpp:Q4_0", "ENGINE@MODEL"),
        ("llama.cpp:Q5_K@dense", "Q8_0"),
        ("llama.cpp:Q4_0@s70", "dense"),
        ("sparse-cpu@s700", "sNN"),
        ("sparse-cpu@/nowhere/run", "report.json"),
        ("Sparse CPU@s70", "backend spec"),
        ("@s70", "ENGINE@MODEL"),
        ("onnxruntime-int4@s70-int4", "dense"),
    ],
)
def test_bad_point_specs_name_the_value_and_what_is_allowed(text: str, names: str) -> None:
    with pytest.raises(ValueError, match="--point") as err:
        pareto.parse_point(text)
    assert names in str(err.value)


def test_the_default_grid_times_the_default_engine_and_the_flags_add_eager_and_ort_runs() -> None:
    plain = [p.spec for p in pareto.default_points()]
    assert plain[:5] == ["llama.cpp:F32@dense", "llama.cpp:Q8_0@dense", "llama.cpp:Q4_0@dense", "onnxruntime@dense",
                         "onnxruntime-int4@dense"]  # fmt: skip
    # every sparse point leaves the engine to the backend's default (the native decoder), none names eager
    assert set(plain[5:]) == {f"sparse-cpu{b}@s{s}{r}" for s in (50, 60, 70)
                              for b, r in (("", ""), (":bits=8", ""), (":bits=8:lm_head=int8", ""), (":bits=4", "-int4"),
                                           (":bits=4:lm_head=int8", "-int4"))}  # fmt: skip
    assert len(plain) == len(set(plain)) == 5 + 3 * 5
    eager = [p.spec for p in pareto.default_points(eager=True)]
    assert set(eager) - set(plain) == {f"sparse-cpu:engine=eager{b}@s{s}{r}" for s in (50, 60, 70)
                                       for b, r in (("", ""), (":bits=8", ""), (":bits=4", "-int4"))}  # fmt: skip
    ort = [p.spec for p in pareto.default_points(ort_runs=True)]
    assert set(ort) - set(plain) == {f"onnxruntime@s{s}-int4" for s in (50, 60, 70)}
    assert [p.spec for p in pareto.default_points(sparsities=(70,))][5:] == [
        "sparse-cpu@s70", "sparse-cpu:bits=8@s70", "sparse-cpu:bits=8:lm_head=int8@s70", "sparse-cpu:bits=4@s70-int4",
        "sparse-cpu:bits=4:lm_head=int8@s70-int4"]  # fmt: skip
    assert all(pareto.parse_point(spec).spec == spec for spec in eager + ort)


def test_a_label_names_the_engine_the_default_resolved_to() -> None:
    point = pareto.parse_point("sparse-cpu:bits=4@s70-int4")
    assert pareto.label_with_engine(point, "sparse-cpu:bits=4 70%", {"1": {"engine": "native"}}) == (
        "sparse-cpu:bits=4 70% (native)"
    )
    assert pareto.label_with_engine(point, "x", {"1": {"engine": "native"}, "2": {"engine": "native"}}) == "x (native)"
    assert pareto.label_with_engine(point, "x", {"1": {"error": "boom"}}) == "x"
    named = pareto.parse_point("sparse-cpu:engine=eager:bits=4@s70-int4")
    assert pareto.label_with_engine(named, "y", {"1": {"engine": "eager"}}) == "y"
    ort = pareto.parse_point("onnxruntime-int4@dense")
    assert pareto.label_of(ort, {}) == "ORT INT4 dense (MatMulNBitsQuantizer)"


def test_run_recipes() -> None:
    args = pareto.run_args("s70-int4", "atp", "sparsegpt", 32, 512)
    joined = " ".join(args)
    assert "--sparsity 0.7" in joined and "pruner.wbits=4" in joined and "allocator.beta=0.01" in joined
    assert "--allocator atp" in joined and "--nsamples 32 --seqlen 512" in joined
    dense_int4 = " ".join(pareto.run_args("s0-int4", "atp", "sparsegpt", 32, 512))
    assert "--allocator uniform" in dense_int4 and "allocator.beta" not in dense_int4 and "pruner.wbits=4" in dense_int4
    assert "wbits" not in " ".join(pareto.run_args("s50", "owl", "wanda", 8, 128))
    with pytest.raises(ValueError, match="sNN"):
        pareto.run_args("dense", "atp", "sparsegpt", 32, 512)


def test_weights_of_each_engine() -> None:
    cases = {"llama.cpp:Q8_0@dense": "Q8_0", "sparse-cpu@s70": "fp32", "sparse-cpu:bits=8@s70": "int8",
             "sparse-cpu:bits=4@s70-int4": "int4", "onnxruntime@s70-int4": "int4", "onnxruntime@dense": "fp32",
             "onnxruntime:weights=fp32@s70-int4": "fp32", "onnxruntime-int4@dense": "int4",
             "sparse-cpu:bits=4:lm_head=int8@s70-int4": "int4"}  # fmt: skip
    for spec, weights in cases.items():
        assert pareto.weights_of(pareto.parse_point(spec)) == weights, spec


def test_window_nll_is_the_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (9,), generator=gen)
    expected = float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))
    assert pareto.window_nll(logits.numpy(), ids.numpy()) == pytest.approx(expected, rel=1e-12)


def _row(label: str, sparsity: float, ppl: float, ms: float) -> dict:
    timing = {"decode_ms_per_token": {"wall": ms, "cpu": ms * 0.9}, "prefill_ms": {"wall": 300.0, "cpu": 290.0}}
    return {"label": label, "engine": label.split()[0], "sparsity": sparsity, "weights": "int4", "load_before": 2.5,
            "perplexity": {"ppl": ppl}, "threads": {"1": timing}}  # fmt: skip


def _report() -> dict:
    rows = [_row("llama.cpp Q4_0", 0.0, 33.0, 20.0), _row("ORT dense", 0.0, 31.0, 60.0),
            _row("sparse-cpu 70%", 0.7, 90.0, 25.0), _row("sparse-cpu 50%", 0.5, 32.0, 40.0),
            {"label": "broken", "engine": "x", "sparsity": 0.6, "weights": "int8", "load_before": 1.0, "threads": {},
             "error": "RuntimeError: boom"}]  # fmt: skip
    report = {"utc": "T", "machine": {"cpu": "Some CPU", "isa": ["avx2"], "cpus": 2, "load_average": (2.0, 1.0, 1.0)},
              "load_after": (3.0, 1.0, 1.0), "threads": [1], "prompt_len": 128, "decode_tokens": 32, "warmup": 1,
              "repeats": 3, "evaluation": {"text": "BBC test", "protocol": "documents", "windows": 40, "seqlen": 512},
              "recipe": {"allocator": "atp", "pruner": "sparsegpt", "nsamples": 32, "seqlen": 512}, "rows": rows,
              "clock": "wall"}  # fmt: skip
    return report


def test_the_table_marks_the_front_and_the_verdict_compares_at_equal_perplexity() -> None:
    report = _report()
    rows = report["rows"]
    text = pareto.markdown(report)
    table = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| yes |" in table["llama.cpp Q4_0"] and "| yes |" in table["ORT dense"]
    assert "| yes |" not in table["sparse-cpu 70%"] and "| yes |" in table["sparse-cpu 50%"]
    assert "| 50.0 | 55.6 |" in table["llama.cpp Q4_0"]  # 1000 / 20 ms per token wall, 1000 / 18 CPU
    assert "error: RuntimeError: boom" in table["broken"]
    assert "Some CPU; ISA avx2" in text and "load average before 2.0, after 3.0" in text
    verdict = pareto.verdict(rows, 1, "wall")
    assert any(v.startswith("sparse-cpu 70%") and "vs llama.cpp Q4_0" in v and "0.80x" in v for v in verdict)
    # at ppl 32 only the dense ORT (31) is at least as good: 25 -> 16.7 tok/s, 1.50x
    assert any(v.startswith("sparse-cpu 50%") and "vs ORT dense" in v and "1.50x" in v for v in verdict)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--threads", "0"], "--threads '0'"),
        (["--threads", "one"], "--threads 'one'"),
        (["--point", "llama.cpp:Q3@dense"], "llama.cpp:Q3@dense"),
        (["--windows", "0"], "--windows 0"),
        (["--text", "/nowhere/wiki.test.raw"], "--text '/nowhere/wiki.test.raw'"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], names: str, capsys: pytest.CaptureFixture) -> None:
    assert pareto.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0]


def test_bad_arguments_from_the_command_line_exit_2_without_a_traceback() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--point", "nonsense"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_perplexity_of_windows_from_given_logits() -> None:
    windows = np.array([[1, 2, 3], [0, 1, 2]])
    uniform = pareto.perplexity_of(lambda row: np.zeros((3, 4), dtype=np.float32), windows, "test")
    assert uniform["ppl"] == pytest.approx(4.0) and uniform["tokens"] == 4


def test_the_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pareto.plot(_report(), tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_facts_read_a_run_folder(tmp_path: Path) -> None:
    import json

    report = {"recipe": {"allocator": {"name": "atp", "beta": 0.01}, "pruner": {"name": "sparsegpt", "wbits": 4},
                         "calibration": {"source": "bbc", "nsamples": 16, "seqlen": 512}},
              "sparsity": {"target": "0.7", "realised_prunable": 0.6999}}  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "quantization.json").write_text(json.dumps({"bits": 4, "groupsize": 128}))
    facts = pareto.run_facts(tmp_path)
    assert facts["allocator"] == "atp" and facts["pruner"] == "sparsegpt" and facts["target_sparsity"] == 0.7
    assert facts["wbits"] == 4 and facts["calibration"]["nsamples"] == 16
    assert (
        pareto.describe_run("s70-int4", facts) == "s70-int4: atp + sparsegpt (joint INT4), realised 70.0%, calibration 16 x 512"
    )
    assert pareto.label_of(pareto.Point("onnxruntime", "s70-int4"), facts) == "ORT 70% (joint INT4 run)"
    assert pareto.run_facts(tmp_path / "nowhere") == {}
