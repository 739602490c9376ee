"""Hostile but realistic input, table-driven: every case exits with status 2, prints exactly one line
(``error: ...``) naming the bad value and no traceback, and writes or loses nothing (an earlier output given
as ``--output ... --overwrite`` stays byte-identical, and so does everything else in the workspace, the model
cache included: no temporary folder, no lock left behind), in bounded time.

Groups: recipes and flags; files that are not what they seem (FIFOs, devices, huge, YAML bombs: bounded
size, depth, alias expansion, duplicate keys); text; outputs (names too long, empty, the cache); models;
limits (context, activation and training memory, threads); eval; deploy and bench (backend specs, image
models, parity steps).

Cases run in-process through ``strataprune.cli.main`` (most fail in milliseconds, before any model is
loaded: ``load_model`` and the deploy loader are replaced by a tripwire for them); the ones that need a real
process (a FIFO nobody writes to, process substitution, a memory cap with ``RLIMIT_AS``, imports before
torch) run as subprocesses with a timeout, the slower of them marked ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from strataprune.cli import main
from strataprune.runtime.reports import atomic_output_dir

#: the checkout under test (the child processes import it, not whatever strataprune is installed)
REPOSITORY = Path(__file__).resolve().parents[2]


TINY_RUN = [
    "--model",
    "{tiny}",
    "--calibration",
    "{text}",
    "--eval-data",
    "{text}",
    "--nsamples",
    "2",
    "--seqlen",
    "16",
    "--eval-seqlen",
    "16",
    "--eval-windows",
    "1",
    "--quiet",
    "--output",
    "{prior}",
    "--overwrite",
]


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # a fragment of the one error line
    files: dict[str, object] = field(default_factory=dict)  # workspace path -> bytes, "dir", or ("model", edit)
    loads_model: bool = False  # the error can only be known once the model is loaded
    root_can_do_it: bool = True  # False: the case does not apply when running as root
    env: dict[str, str] = field(default_factory=dict)  # environment variables ({ws} is filled in)


def run(*extra: str, base: list[str] = TINY_RUN) -> list[str]:
    return ["run", *base, *extra]


def allocate(*extra: str) -> list[str]:
    return ["allocate", *TINY_RUN, *extra]


def deploy(*extra: str, backend: str = "onnxruntime") -> list[str]:
    return ["deploy", "{ws}/run", "--backend", backend, "--output", "{ws}/deployed", *extra]


def image_run(folder: Path) -> None:  # a run folder whose model is an image classifier
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["ViTForImageClassification"], model_type="vit")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "report.json").write_text("{}")
    (folder / "allocation.json").write_text("{}")


def causal_run(folder: Path) -> None:  # a run folder of the tiny causal LM (what deploy reads first)
    (folder / "report.json").write_text("{}")
    (folder / "allocation.json").write_text("{}")


RUN_FOLDER = {"run": ("model", causal_run)}

#: 519 bytes of YAML, nine levels of nine aliases each: 9^9 = 387 million strings once expanded
BILLION_LAUGHS = b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + b"".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n".encode() for p, n in zip("abcdefgh", "bcdefghi")
)
DEEP_YAML = b"[" * 5000 + b"]" * 5000
LONG_LIST = b"evaluation: {tasks: [" + b", ".join([b"x"] * 12_000) + b"]}\n"
MANY_VALUES = b"allocator: {name: x, v: [" + b"], v2: [".join([b", ".join([b"1"] * 5000)] * 6) + b"]}\n"


def tiny_model_with(edit):  # a copy of the tiny model with one thing changed
    return ("model", edit)


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def unknown_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "frobnitz"
    (folder / "config.json").write_text(json.dumps(config))


LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50
BINARY = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4

CASES = [
    # recipes and flags
    Case("recipe_missing", ["run", "{ws}/nope.yaml"], "recipe file '{ws}/nope.yaml' does not exist"),
    Case("recipe_is_a_directory", ["run", "{ws}/adir"], "is a directory, not a file", {"adir": "dir"}),
    Case("recipe_binary", ["run", "{ws}/r.yaml"], "is a binary file, not text", {"r.yaml": BINARY}),
    Case(
        "recipe_not_utf8",
        ["run", "{ws}/r.yaml"],
        "is not valid utf-8 text (byte 0xe9 at offset 10)",
        {"r.yaml": b"model: caf\xe9\n"},
    ),
    Case(
        "recipe_yaml_syntax",
        ["run", "{ws}/r.yaml"],
        "is not valid YAML: line 3, column 1",
        {"r.yaml": b"sparsity: 0.5\nmodel: {source: x\n"},
    ),
    Case("recipe_not_a_mapping", ["run", "{ws}/r.yaml"], "must be a mapping", {"r.yaml": b"- a\n- b\n"}),
    Case("recipe_unknown_key", ["run", "{ws}/r.yaml"], "did you mean 'sparsity'", {"r.yaml": b"sparsty: 0.5\n"}),
    Case("recipe_unquoted_nm", ["run", "{ws}/r.yaml"], "quote it ('2:4')", {"r.yaml": b"sparsity: 2:4\n"}),
    Case("set_yaml_syntax", run("--set", "sparsity=["), "--set 'sparsity=[': the value '[' is not valid YAML"),
    Case("set_without_equals", run("--set", "sparsity"), "must look like key.path=value"),
    Case("set_unknown_key", run("--set", "calibration.nsample=3"), "did you mean 'nsamples'"),
    Case("sparsity_out_of_range", run("--sparsity", "1.5"), "must be in [0, 1)"),
    Case("sparsity_not_a_number", run("--sparsity", "lots"), "must be a number in [0, 1) or an N:M pattern"),
    Case("nm_pattern_invalid", run("--sparsity", "4:4"), "0 < n < m"),
    Case("nsamples_zero", run("--nsamples", "0"), "calibration.nsamples: 0 must be an integer >= 1"),
    Case("nsamples_not_an_integer", run("--nsamples", "abc"), "argument --nsamples: invalid int value: 'abc'"),
    Case("seqlen_one", run("--seqlen", "1"), "calibration.seqlen: 1 must be an integer >= 2"),
    Case("eval_windows_zero", run("--eval-windows", "0"), "evaluation.max_windows: 0 must be an integer >= 1"),
    Case("unknown_flag", run("--frobnicate"), "unrecognized arguments: --frobnicate"),
    Case("unknown_command", ["frob"], "invalid choice: 'frob'"),
    Case("no_command", [], "the following arguments are required: command"),
    Case("encoding_unknown", run("--set", "calibration.encoding=klingon"), "'klingon' is not a known text encoding"),
    Case("protocol_unknown", run("--set", "evaluation.protocol=paper"), "protocol='paper' must be one of"),
    Case("allocator_unknown", run("--allocator", "owll"), "unknown allocator 'owll' (did you mean 'owl'?)"),
    Case("pruner_unknown", run("--pruner", "wandaa"), "unknown pruner 'wandaa' (did you mean 'wanda'?)"),
    Case("allocator_parameter", run("--allocator", "alpha", "--set", "allocator.epsilon=2"), "epsilon"),
    Case("pruner_block_invalid", run("--pruner", "wanda", "--set", "pruner.block=3x1"), "block='3x1' is invalid; allowed:"),
    Case("pruner_block_not_a_string", run("--pruner", "magnitude", "--set", "pruner.block=4"), "block=4 is invalid"),
    Case(
        "pruner_block_with_nm",
        run("--pruner", "sparsegpt", "--set", "pruner.block=1x4", "--sparsity", "2:4"),
        "block=1x4 keeps or removes whole 1x4 blocks",
    ),
    Case(
        "dsnot_blocked_base",
        run("--pruner", "dsnot", "--set", "pruner.base_params={{block: 4x1}}"),
        "DSnoT swaps single weights",
    ),
    Case("device_unknown", run("--device", "tpu"), "model.device 'tpu'"),
    Case("allocate_named_twice", allocate("--allocators", "alpha,alpha"), "alpha named twice"),
    Case("allocate_yaml_syntax", allocate("--allocators", "atp:beta=["), "the value '[' is not valid YAML"),
    Case("allocate_pair_without_value", allocate("--allocators", "atp:beta"), "must look like key=value"),
    Case("allocate_unknown", allocate("--allocators", "uniform,owll"), "did you mean 'owl'"),
    # text
    Case("text_missing", run("--calibration", "{ws}/none.txt"), "text file '{ws}/none.txt' does not exist"),
    Case("text_is_a_directory", run("--calibration", "{ws}/adir"), "text file '{ws}/adir' is a directory", {"adir": "dir"}),
    Case("text_binary", run("--calibration", "{ws}/bin.txt"), "is a binary file, not text", {"bin.txt": BINARY}),
    Case(
        "text_not_utf8",
        run("--eval-data", "{ws}/latin.txt"),
        "is not valid utf-8 text (byte 0xe9 at offset 3)",
        {"latin.txt": LATIN1},
    ),
    Case("text_empty", run("--eval-data", "{ws}/empty.txt"), "has no text", {"empty.txt": b"\n \n\n"}),
    Case("dataset_unknown", run("--calibration", "bcc"), "unknown dataset 'bcc' (did you mean 'bbc'?)"),
    Case("c4_protocol_on_a_file", run("--set", "calibration.protocol=c4"), "protocol 'c4' draws whole documents"),
    # outputs
    Case("output_in_proc", run("--output", "/proc/strataprune-x"), "cannot create files in '/proc'"),
    Case("output_is_a_file", run("--output", "{ws}/file.txt"), "exists and is not a folder", {"file.txt": b"x"}),
    Case("output_under_a_file", run("--output", "{ws}/file.txt/sub"), "which is a file, not a folder", {"file.txt": b"x"}),
    Case("output_read_only", run("--output", "{ws}/ro/out"), "cannot create files in", {"ro": "readonly"}, root_can_do_it=False),
    Case("output_not_ours", run("--output", "{ws}/home"), "not written by strataprune", {"home/thesis.tex": b"precious"}),
    Case("output_ours_without_overwrite", ["run", *TINY_RUN[:-1]], "already holds strataprune run; pass --overwrite"),
    Case("output_with_added_files", run(), "holds files strataprune did not write (notes.txt)", {"prior/notes.txt": b"mine"}),
    Case("output_locked_by_another_run", run(), "is being written by another strataprune run", {"prior": "locked"}),
    # models
    Case("model_missing", run("--model", "{ws}/none"), "is not a model folder"),
    Case("model_unknown_name", run("--model", "smolm2-135m"), "did you mean 'smollm2-135m'"),
    Case("model_without_config", run("--model", "{ws}/adir"), "has no config.json", {"adir": "dir"}),
    Case(
        "model_config_not_json",
        run("--model", "{ws}/m"),
        "config.json is not valid JSON",
        {"m/config.json": b"{", "m/model.safetensors": b""},
    ),
    Case(
        "model_without_weights", run("--model", "{ws}/m"), "has config.json but no weights", {"m": tiny_model_with(drop_weights)}
    ),
    Case(
        "model_truncated",
        run("--model", "{ws}/m"),
        "model.safetensors is truncated: it holds",
        {"m": tiny_model_with(truncate_weights)},
    ),
    Case(
        "model_not_safetensors",
        run("--model", "{ws}/m"),
        "truncated or not a safetensors file",
        {"m": tiny_model_with(lambda f: (f / "model.safetensors").write_bytes(b"GIF89a" * 3))},
    ),
    Case(
        "model_fake_gguf",
        run("--model", "{ws}/fake.gguf"),
        "is not a GGUF file (it starts with b'<htm'",
        {"fake.gguf": b"<html>404</html>"},
    ),
    Case(
        "model_type_unknown",
        run("--model", "{ws}/m"),
        "model_type 'frobnitz' is not known to transformers",
        {"m": tiny_model_with(unknown_model_type)},
        loads_model=True,
    ),
    # limits
    Case(
        "seqlen_beyond_context",
        run("--seqlen", "300"),
        "calibration.seqlen 300 is longer than the model's context (max_position_embeddings = 256)",
    ),
    Case("eval_seqlen_beyond_context", run("--eval-seqlen", "300"), "evaluation.seqlen 300 is longer than the model's context"),
    Case(
        "nsamples_beyond_memory",
        run("--nsamples", "1000000000"),
        "for its activations (2 x nsamples 1000000000 x seqlen 16 x hidden 64",
    ),
    # eval
    Case("eval_cmd_seqlen_negative", ["eval", "{tiny}", "--seqlen", "-3"], "argument --seqlen: '-3' must be an integer >= 2"),
    Case("eval_cmd_seqlen_one", ["eval", "{tiny}", "--seqlen", "1"], "argument --seqlen: '1' must be an integer >= 2"),
    Case(
        "eval_cmd_windows_negative",
        ["eval", "{tiny}", "--windows", "-1"],
        "argument --windows: '-1' must be an integer >= 1 or 'all'",
    ),
    Case("eval_cmd_windows_zero", ["eval", "{tiny}", "--windows", "0"], "argument --windows: '0' must be an integer >= 1"),
    Case(
        "eval_cmd_seqlen_beyond_context",
        ["eval", "{tiny}", "--data", "{text}", "--seqlen", "300"],
        "--seqlen 300 is longer than the model's context",
    ),
    Case(
        "eval_cmd_text_binary",
        ["eval", "{tiny}", "--seqlen", "16", "--data", "{ws}/bin.txt"],
        "is a binary file",
        {"bin.txt": BINARY},
    ),
    Case(
        "eval_cmd_text_not_utf8",
        ["eval", "{tiny}", "--seqlen", "16", "--data", "{ws}/latin.txt"],
        "not valid utf-8",
        {"latin.txt": LATIN1},
    ),
    Case(
        "eval_cmd_encoding_unknown",
        ["eval", "{tiny}", "--seqlen", "16", "--data", "{text}", "--encoding", "klingon"],
        "'klingon' is not a known text encoding",
    ),
    Case("eval_cmd_model_missing", ["eval", "{ws}/none", "--data", "{text}"], "is not a model folder"),
    Case(
        "eval_cmd_c4_protocol_on_a_file",
        ["eval", "{tiny}", "--seqlen", "16", "--data", "{text}", "--protocol", "c4"],
        "protocol 'c4' draws whole documents",
    ),
    # ---- hostile files: bounded before any work
    Case(
        "recipe_billion_laughs",
        ["run", "{ws}/r.yaml"],
        "values once its aliases (*name) are expanded",
        {"r.yaml": BILLION_LAUGHS},
    ),
    Case("recipe_deep_nesting", ["run", "{ws}/r.yaml"], "nesting deeper than 32 levels at line 1", {"r.yaml": DEEP_YAML}),
    Case("recipe_long_list", ["run", "{ws}/r.yaml"], "a list of 12,000 items at line 1", {"r.yaml": LONG_LIST}),
    Case("recipe_many_values", ["run", "{ws}/r.yaml"], "more than 20,000 values (line 1)", {"r.yaml": MANY_VALUES}),
    Case("recipe_alias_cycle", ["run", "{ws}/r.yaml"], "an alias refers to a node that contains it", {"r.yaml": b"a: &x [*x]\n"}),
    Case(
        "recipe_huge",
        ["run", "{ws}/r.yaml"],
        "is 50,000,000 bytes; the most read as recipe file is 1,048,576",
        {"r.yaml": ("sparse", 50_000_000)},
    ),
    Case("recipe_device", ["run", "/dev/zero"], "recipe file '/dev/zero' is a character device"),
    Case("recipe_fifo_unwritten", ["run", "{ws}/fifo"], "is a pipe that gave no data", {"fifo": "fifo"}),
    Case(
        "recipe_duplicate_key",
        ["run", "{ws}/r.yaml"],
        "key 'sparsity' appears twice (lines 1 and 3)",
        {"r.yaml": b"sparsity: 0.5\npruner: wanda\nsparsity: 0.7\n"},
    ),
    Case(
        "recipe_nested_duplicate_key",
        ["run", "{ws}/r.yaml"],
        "key 'seqlen' appears twice (lines 2 and 3)",
        {"r.yaml": b"calibration:\n  seqlen: 16\n  seqlen: 32\n"},
    ),
    Case("set_deep_nesting", run("--set", "allocator.x=" + "[" * 100 + "]" * 100), "nesting deeper than 32 levels"),
    Case(
        "text_huge",
        run("--calibration", "{ws}/huge.txt"),
        "is 2,147,483,648 bytes; the most read as text file",
        {"huge.txt": ("sparse", 2**31)},
    ),
    Case("text_device", run("--calibration", "/dev/urandom"), "text file '/dev/urandom' is a character device"),
    Case(
        "text_fifo_unwritten",
        run("--eval-data", "{ws}/fifo"),
        "text file '{ws}/fifo' is a pipe that gave no data",
        {"fifo": "fifo"},
    ),
    Case("text_fifo_stalled", run("--eval-data", "{ws}/fifo"), "is a pipe that gave no data for", {"fifo": "stalled-fifo"}),
    Case(
        "grid_billion_laughs",
        ["leaderboard", "{ws}/g.yaml"],
        "values once its aliases (*name) are expanded",
        {"g.yaml": BILLION_LAUGHS},
    ),
    Case("grid_duplicate_key", ["leaderboard", "{ws}/g.yaml"], "key 'name' appears twice", {"g.yaml": b"name: a\nname: b\n"}),
    Case("grid_device", ["leaderboard", "/dev/zero"], "grid file '/dev/zero' is a character device"),
    # ---- limits: memory, context, threads
    Case(
        "recovery_seqlen_beyond_context",
        run("--recovery", "lora", "--set", "recovery.seqlen=100000"),
        "recovery 'lora': seqlen 100000 is longer than the model's context",
    ),
    Case(
        "recovery_batch_beyond_memory",
        run("--recovery", "lora", "--set", "recovery.batch=100000000"),
        "recovery 'lora': batch 100000000 x seqlen 128 needs at least",
    ),
    Case(
        "recovery_lr_negative_exponent_form",  # YAML reads -1e30 as text: it is read as the number it is, then refused
        run("--recovery", "lora", "--set", "recovery.lr=-1e30"),
        "lr=-1e+30 is invalid; allowed: a finite number > 0",
    ),
    Case("recovery_lr_not_a_number", run("--recovery", "lora", "--set", "recovery.lr=fast"), "lr='fast' must be float"),
    Case("threads_too_many_run", run("--threads", "100000"), "argument --threads: 100000 threads is more than"),
    Case("threads_too_many_recipe", run("--set", "threads=100000"), "threads: 100000 threads is more than"),
    Case("threads_too_many_eval", ["eval", "{tiny}", "--threads", "100000"], "argument --threads: 100000 threads is more than"),
    Case("threads_too_many_deploy", deploy("--threads", "100000"), "argument --threads: 100000 threads is more than"),
    Case(
        "threads_too_many_bench", ["bench", "{ws}/run", "--threads", "100000"], "argument --threads: 100000 threads is more than"
    ),
    Case(
        "seqlen_flag_and_set_conflict",
        run("--set", "calibration.seqlen=32"),
        "--seqlen 16 and --set calibration.seqlen=32 both set calibration.seqlen",
    ),
    # ---- outputs and the cache: checked before any work, nothing created
    Case("output_name_too_long", run("--output", "{ws}/" + "a" * 230), "is 230 bytes; with the temporary name"),
    Case("output_component_too_long", run("--output", "{ws}/" + "b" * 300 + "/out"), "is 300 bytes; this file system allows"),
    Case("output_empty", run("--output", ""), "output_dir (--output): '' is empty"),
    Case("output_empty_in_recipe", ["run", "{ws}/r.yaml"], "output_dir (--output): '' is empty", {"r.yaml": b"output_dir: ''\n"}),
    Case(
        "cache_is_a_file",
        run(),
        "the cache '{ws}/cachefile' ($STRATAPRUNE_CACHE) is not a folder",
        {"cachefile": b"x"},
        env={"STRATAPRUNE_CACHE": "{ws}/cachefile"},
    ),
    Case(
        "cache_under_a_file",
        ["eval", "{tiny}", "--data", "{text}", "--seqlen", "16"],
        "lies under '{ws}/cachefile', which is a file",
        {"cachefile": b"x"},
        env={"STRATAPRUNE_CACHE": "{ws}/cachefile/sub"},
    ),
    # ---- eval
    Case(
        "eval_cmd_task_yaml_syntax",
        ["eval", "{tiny}", "--tasks", "mytask", "--include-path", "{ws}/tasks"],
        "task file '{ws}/tasks/t.yaml' is not valid YAML: line 3, column 6",
        {"tasks/t.yaml": b"task: mytask\ndataset_path: json\n  bad: [\n"},
    ),
    # ---- deploy and bench: specs and the run's model, before anything is loaded
    Case(
        "deploy_spec_pair_without_value",
        deploy(backend="sparse-cpu:threads"),
        "backend spec 'sparse-cpu:threads': 'threads' is not key=value; the form is NAME or NAME:key=value",
        RUN_FOLDER,
    ),
    Case(
        "deploy_spec_two_colons",
        deploy(backend="sparse-cpu:isa:bogus"),
        "backend spec 'sparse-cpu:isa:bogus': 'isa' is not key=value",
        RUN_FOLDER,
    ),
    Case(
        "deploy_sparse_cpu_threads_zero",
        deploy(backend="sparse-cpu:threads=0"),
        "backend 'sparse-cpu': threads 0; allowed: an integer >= 1",
        RUN_FOLDER,
    ),
    Case(
        "deploy_sparse_cpu_threads_negative",
        deploy(backend="sparse-cpu:threads=-3"),
        "backend 'sparse-cpu': threads -3",
        RUN_FOLDER,
    ),
    Case(
        "deploy_sparse_cpu_threads_too_many",
        deploy(backend="sparse-cpu:threads=100000"),
        "threads: 100000 threads is more than",
        RUN_FOLDER,
    ),
    Case(
        "deploy_sparse_cpu_min_sparsity",
        deploy(backend="sparse-cpu:min_sparsity=2"),
        "backend 'sparse-cpu': min_sparsity 2.0; allowed: a number in (0, 1]",
        RUN_FOLDER,
    ),
    Case("deploy_sparse_cpu_isa_unknown", deploy(backend="sparse-cpu:isa=bogus"), "isa='bogus' must be one of", RUN_FOLDER),
    Case(
        "deploy_parity_steps_negative",
        deploy("--parity-steps", "-5", backend="sparse-cpu"),
        "--parity-steps -5 must be >= 1",
        RUN_FOLDER,
    ),
    Case("deploy_prompt_len_zero", deploy("--prompt-len", "0"), "argument --prompt-len: '0' must be an integer >= 1", RUN_FOLDER),
    Case("deploy_output_empty", ["deploy", "{ws}/run", "--output", ""], "--output '' is empty", RUN_FOLDER),
    Case(
        "deploy_output_name_too_long",
        ["deploy", "{ws}/run", "--output", "{ws}/" + "d" * 230],
        "is 230 bytes; with the temporary name",
        RUN_FOLDER,
    ),
    Case("deploy_text_binary", deploy("--text", "{ws}/bin.txt"), "is a binary file", {**RUN_FOLDER, "bin.txt": BINARY}),
    *[
        Case(
            f"deploy_image_model_{name.replace('-', '_')}",
            deploy(backend=name),
            f"backend '{name}' deploys causal language models; this run's model is ViTForImageClassification",
            {"run": ("model", image_run)},
        )
        for name in ("onnxruntime", "sparse-cpu", "torch")
    ],
    Case(
        "bench_image_model",
        ["bench", "{ws}/run", "--backends", "torch"],
        "bench deploys causal language models; this run's model is ViTForImageClassification",
        {"run": ("model", image_run)},
    ),
    Case(
        "bench_spec_pair_without_value",
        ["bench", "{ws}/run", "--backends", "sparse-cpu:threads"],
        "'threads' is not key=value",
        RUN_FOLDER,
    ),
    Case(
        "bench_parity_steps_negative",
        ["bench", "{ws}/run", "--parity-steps", "-1"],
        "--parity steps -1 must be >= 0",
        RUN_FOLDER,
    ),
    Case(
        "bench_output_name_too_long",
        ["bench", "{ws}/run", "--output", "{ws}/" + "e" * 240],
        "is 240 bytes; with the temporary name",
        RUN_FOLDER,
    ),
]

HOLD_LOCK = textwrap.dedent("""
    import sys
    from strataprune.runtime.reports import check_output_dir
    check_output_dir(sys.argv[1], overwrite=True, command="run")
    print("locked", flush=True)
    sys.stdin.read()
""")


def snapshot(root: Path) -> dict[str, object]:
    """Every file (its bytes; size and mtime for large ones) and folder (and FIFO) under ``root``."""

    def state(p: Path) -> object:
        if not p.is_file():
            return None
        info = p.stat()
        return (info.st_size, info.st_mtime_ns) if info.st_size > 1 << 20 else p.read_bytes()

    return {str(p.relative_to(root)): state(p) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def workspace(tmp_path, monkeypatch, text_file):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("STRATAPRUNE_CACHE", str(ws / "cache"))
    (ws / "cache").mkdir()
    shutil.copy(text_file, ws / "text.txt")
    with atomic_output_dir(ws / "prior", False, command="run") as out:  # an earlier result that must survive
        (out / "report.json").write_text(json.dumps({"environment": {"strataprune": "0.1.0"}, "ppl": 12.5}))
        (out / "model.safetensors").write_bytes(b"\1" * 1000)
    return ws


def prepare(case: Case, ws: Path, tiny: Path, writers: list[int]) -> subprocess.Popen | None:
    holder = None
    for rel, content in case.files.items():
        path = ws / rel
        if content == "dir":
            path.mkdir(parents=True)
        elif content == "readonly":
            path.mkdir()
            path.chmod(0o555)
        elif content == "locked":
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert holder.stdout.readline().strip() == "locked"
        elif content == "fifo":
            os.mkfifo(path)
        elif content == "stalled-fifo":  # a writer that holds the FIFO open and never writes
            os.mkfifo(path)
            fd = os.open(path, os.O_RDWR)  # O_RDWR: opens without waiting for a reader
            writers.append(fd)
        elif isinstance(content, tuple) and content[0] == "sparse":
            with open(path, "wb") as handle:
                handle.truncate(content[1])  # a hole: the size without the disk space
        elif isinstance(content, tuple):
            shutil.copytree(tiny, path)
            content[1](path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return holder


def tripwires(monkeypatch) -> None:
    """Loading a model raises: the bad input must be found before."""

    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr("strataprune.engine.session.load_model", tripwire)  # first: importing the session binds load_model
    monkeypatch.setattr("strataprune.models.loading.load_model", tripwire)
    monkeypatch.setattr("strataprune.deploy.deployment.load_causal_lm", tripwire)
    monkeypatch.setattr("strataprune.deploy.rundir.load_causal_lm", tripwire)


#: a hang guard, not a speed claim: every case fails before any work, in well under a second on a quiet machine
CASE_SECONDS = 60


def fill(items: list[str], ws: Path, tiny: Path) -> list[str]:
    return [a.format(ws=ws, tiny=tiny, text=ws / "text.txt", prior=ws / "prior") for a in items]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, workspace, tiny_llama_dir, capsys, monkeypatch):
    if not case.root_can_do_it and os.geteuid() == 0:
        pytest.skip("root may write into read-only folders")
    if not case.loads_model:  # a tripwire: these must fail before any model is loaded
        tripwires(monkeypatch)
    monkeypatch.setattr("strataprune.data.textfile.PIPE_WRITER_WAIT_SECONDS", 0.2)  # the subprocess cases keep the 5 s
    monkeypatch.setattr("strataprune.data.textfile.PIPE_IDLE_SECONDS", 0.5)
    monkeypatch.setattr("strataprune.data.textfile._PIPE_CONTENTS", {})
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(ws=workspace))
    writers: list[int] = []
    holder = prepare(case, workspace, tiny_llama_dir, writers)
    before = snapshot(workspace)
    capsys.readouterr()
    started = time.monotonic()
    try:
        status = main(fill(case.argv, workspace, tiny_llama_dir))
    finally:
        for fd in writers:
            os.close(fd)
        if holder is not None:
            holder.communicate("")
        if (workspace / "ro").exists():
            (workspace / "ro").chmod(0o755)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fill([case.expect], workspace, tiny_llama_dir)[0] in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(workspace) == before  # nothing written, nothing lost (the earlier output included)
    assert time.monotonic() - started < CASE_SECONDS


SUBPROCESS = textwrap.dedent("""
    import sys
    from strataprune.cli import main
    status = main(sys.argv[1:])
    print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    raise SystemExit(status)
""")


@pytest.mark.parametrize(
    "argv, imported",
    [
        (["run", "--set", "sparsity=["], []),
        (["allocate", "--allocators", "alpha,alpha"], []),
        (["run", "--output", "/proc/strataprune-x"], []),
        (["run", "--allocator", "owll"], ["torch"]),  # plugin names need the plugin modules, not transformers
    ],
)
def test_argument_errors_come_before_heavy_imports_and_never_as_a_traceback(argv, imported, tmp_path):
    env = {**os.environ, "STRATAPRUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPOSITORY)}
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == str(imported)
    assert list(tmp_path.iterdir()) == []


def test_internal_errors_are_one_line_with_status_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("strataprune.contract.registry.get_registry", bug)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: internal error: ZeroDivisionError: division by zero")
    assert "STRATAPRUNE_DEBUG=1" in err[0]
    monkeypatch.setenv("STRATAPRUNE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["plugins"])


def test_nm_notation_warning_is_one_line_not_an_error(capsys):
    assert main(["run", "--sparsity", "1:4", "--output", "/proc/strataprune-x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("error: ")
    assert (
        lines[0].startswith("warning: sparsity 1:4 keeps 1 of every 4 weights here (75% sparse")
        and "which is 3:4 here" in lines[0]
    )
    assert main(["run", "--sparsity", "2:4", "--output", "/proc/strataprune-x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # 2:4 means the same in both notations


# --------------------------------------------------------------------------- in real processes
def _limit_memory(megabytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    return apply


def cli(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, memory_mb: int | None = None, shell: bool = False):
    """The CLI in a child process, bounded in wall time (and, with ``memory_mb``, address space)."""
    command = ["bash", "-c", " ".join(argv)] if shell else [sys.executable, "-m", "strataprune", *argv]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env},
        timeout=timeout,
        preexec_fn=_limit_memory(memory_mb) if memory_mb else None,
    )


def one_error_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_memory_and_time_bombs_in_a_capped_process(tmp_path, tiny_llama_dir, text_file):
    """The YAML bomb, a huge recipe, a huge training batch and 100000 threads, each in a process capped at
    3 GiB of address space (torch alone maps ~1.5 GiB) and 120 s: each ends with one error line, nothing written."""
    (tmp_path / "bomb.yaml").write_bytes(BILLION_LAUGHS)
    with open(tmp_path / "huge.yaml", "wb") as handle:
        handle.truncate(50_000_000)
    env = {"STRATAPRUNE_CACHE": str(tmp_path / "cache")}
    tiny = ["--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    tiny += ["--seqlen", "16", "--eval-seqlen", "16"]
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["run", "bomb.yaml"], "values once its aliases"),
        (["run", "huge.yaml"], "the most read as recipe file"),
        (["run", *tiny, "--recovery", "lora", "--set", "recovery.batch=100000000", "--output", "o"], "needs at least"),
        (["eval", str(tiny_llama_dir), "--threads", "100000"], "100000 threads is more than"),
        (["deploy", str(tiny_llama_dir), "--output", "d", "--threads", "100000"], "100000 threads is more than"),
    ]
    for argv, fragment in cases:
        one_error_line(cli(argv, tmp_path, env, timeout=120, memory_mb=3072), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_fifo_nobody_writes_to_ends_in_seconds_and_process_substitution_works(tmp_path, tiny_llama_dir):
    """A FIFO without a writer used to block forever; ``<(...)`` (a pipe) is read once, within its size cap."""
    os.mkfifo(tmp_path / "recipe.yaml")
    env = {"STRATAPRUNE_CACHE": str(tmp_path / "cache")}
    proc = cli(["run", "recipe.yaml"], tmp_path, env, timeout=60)
    one_error_line(proc, "recipe file 'recipe.yaml' is a pipe that gave no data in 5 s")
    # process substitution: the recipe arrives through a pipe; its bad sparsity proves it was read and checked
    proc = cli(["python", "-m", "strataprune", "run", "<(printf 'sparsity: 3\\n')"], tmp_path, env, timeout=60, shell=True)
    one_error_line(proc, "sparsity: 3 must be in [0, 1)")
    proc = cli(
        ["python", "-m", "strataprune", "run", "<(head -c 2000000 /dev/zero | tr '\\\\0' x)"],
        tmp_path,
        env,
        timeout=60,
        shell=True,
    )
    one_error_line(proc, "is a pipe that gave more than 1,048,576 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_pipe_is_read_once_and_both_readers_get_the_text(tmp_path, monkeypatch):
    """The checks before the work and the work read a text source separately; a pipe gives its bytes once."""
    from strataprune.data.textfile import TextFile

    monkeypatch.setattr("strataprune.data.textfile._PIPE_CONTENTS", {})
    fifo = tmp_path / "text"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "w") as handle:
            handle.write("one line of text\nanother line\n")

    thread = threading.Thread(target=writer)
    thread.start()
    first = TextFile(fifo)
    thread.join(10)
    assert TextFile(fifo).text == first.text == "one line of text\nanother line\n"


def test_yaml_loader_keeps_merges_and_reads_1e30_style_floats():
    from strataprune.contract.base import build_config
    from strataprune.contract.errors import ConfigError
    from strataprune.engine.recipe import parse_yaml
    from strataprune.plugins.recovery.lora import LoRAConfig

    data = parse_yaml("base: &b {a: 1, b: 2}\nderived: {<<: *b, b: 3}\n", "test")
    assert data["derived"] == {"a": 1, "b": 3}  # a merge key overriding is not a duplicate key
    assert build_config(LoRAConfig, {"lr": "2e-4"}, "recovery 'lora'").lr == 2e-4  # YAML 1.1 reads 2e-4 as a string
    assert build_config(LoRAConfig, {"lr": "1e30"}, "recovery 'lora'").lr == 1e30  # accepted; a diverged run is refused after
    with pytest.raises(ConfigError, match="must be float"):
        build_config(LoRAConfig, {"lr": "1e30x"}, "recovery 'lora'")


def test_device_auto_is_the_best_device_here():
    import torch

    from strataprune.models.loading import resolve_device

    device, device_map = resolve_device("auto")
    if torch.cuda.is_available():
        assert (device, device_map) == (None, "auto")
    else:
        assert (device, device_map) == (torch.device("cpu"), None)


def test_memory_messages_use_units_that_show_the_numbers(monkeypatch, tiny_llama_dir):
    """Small needs and small free memory (a cgroup at its limit) used to print as 0.0 GiB vs 0.0 GiB."""
    from strataprune.contract.errors import ConfigError
    from strataprune.engine.limits import check_activation_memory, human_bytes

    assert [human_bytes(n) for n in (512, 3 * 2**20 + 2**19, 21 * 2**30, 150 * 2**30)] == [
        "512 bytes",
        "3.5 MiB",
        "21.0 GiB",
        "150 GiB",
    ]
    monkeypatch.setattr("strataprune.engine.limits.available_memory_bytes", lambda: 1000)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"needs about 16.0 KiB .* more than the 1000 bytes of memory available"):
        check_activation_memory(config, 2, 16, "float32")


def test_full_disk_during_the_save_keeps_the_old_output_and_says_so(workspace, tiny_llama_dir, capsys, monkeypatch):
    """ENOSPC while the model is written: status 1, one line that names the space needed and says the earlier
    output is intact; the earlier output is byte-identical and no temporary folder or lock is left."""
    from transformers import PreTrainedModel

    def full_disk(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    before = snapshot(workspace)
    status = main(fill(run(), workspace, tiny_llama_dir))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]  # after the run's log
    assert status == 1
    assert len(err) == 1 and err[0].startswith("error: the disk is full (no space left on the device) while writing")
    assert "nothing was replaced: an earlier output is intact" in err[0]
    assert f"'{workspace / 'prior'}' needs about" in err[0]
    assert snapshot(workspace) == before


def test_merged_leaderboard_records_left_out_are_counted(tmp_path):
    """A submitted cell without a field every cell has is left out and counted, never dropped unannounced."""
    from strataprune.leaderboard.merge import CELL_FIELDS, merge_submission

    assert CELL_FIELDS == ("key", "status", "model")
    header = {"record": "header", "format": "x"}
    path = tmp_path / "theirs.jsonl"
    path.write_text(json.dumps(header) + "\n")
    messages: list[str] = []

    class Results:
        def models(self):
            return {}

        def cells(self):
            return {}

        def append(self, record):
            pass

    class Grid:
        name = "g"
        models = ()

        def protocol(self):
            return {}

    import strataprune.leaderboard.merge as merge

    records = [
        {"record": "header", "format": merge.FORMAT_NAME, "protocol": {}},
        {"record": "cell", "key": "k1", "model": "m"},  # no status
        {"record": "cell", "status": "ok", "model": "m"},  # no key
        {"record": "cell", "key": "k3", "status": "failed", "model": "m"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert merge_submission(Results(), Grid(), path, echo=messages.append) == 0
    assert messages[0] == f"merged 0 cells from {path}"
    assert "left out 1 cell(s)" in messages[1] and "did not finish" in messages[1]
    assert "left out 2 cell record(s)" in messages[2] and "line 2 (status)" in messages[2] and "line 3 (key)" in messages[2]
