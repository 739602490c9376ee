"""Bad input, table-driven: every case exits with status 2, prints exactly one line (``error: ...``) and no
traceback, and writes or loses nothing (an earlier output given as ``--output ... --overwrite`` stays
byte-identical, and so does everything else in the workspace, the model cache included).

Cases run in-process through ``strataprune.cli.main`` (most fail in milliseconds, before any model is
loaded: ``load_model`` is replaced by a tripwire for them); a few run as subprocesses to show that no
traceback reaches the terminal and that argument errors come before torch and transformers are imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from strataprune.cli import main
from strataprune.runtime.reports import atomic_output_dir

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


def run(*extra: str, base: list[str] = TINY_RUN) -> list[str]:
    return ["run", *base, *extra]


def allocate(*extra: str) -> list[str]:
    return ["allocate", *TINY_RUN, *extra]


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
]

HOLD_LOCK = textwrap.dedent("""
    import sys
    from strataprune.runtime.reports import check_output_dir
    check_output_dir(sys.argv[1], overwrite=True, command="run")
    print("locked", flush=True)
    sys.stdin.read()
""")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


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


def prepare(case: Case, ws: Path, tiny: Path) -> subprocess.Popen | None:
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
        elif isinstance(content, tuple):
            shutil.copytree(tiny, path)
            content[1](path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return holder


def fill(items: list[str], ws: Path, tiny: Path) -> list[str]:
    return [a.format(ws=ws, tiny=tiny, text=ws / "text.txt", prior=ws / "prior") for a in items]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, workspace, tiny_llama_dir, capsys, monkeypatch):
    if not case.root_can_do_it and os.geteuid() == 0:
        pytest.skip("root may write into read-only folders")
    if not case.loads_model:  # a tripwire: these must fail before any model is loaded

        def tripwire(*args, **kwargs):
            raise AssertionError("a model was loaded before the bad input was found")

        monkeypatch.setattr("strataprune.engine.session.load_model", tripwire)  # first: importing the session binds load_model
        monkeypatch.setattr("strataprune.models.loading.load_model", tripwire)
    holder = prepare(case, workspace, tiny_llama_dir)
    before = snapshot(workspace)
    capsys.readouterr()
    try:
        status = main(fill(case.argv, workspace, tiny_llama_dir))
    finally:
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
    env = {**os.environ, "STRATAPRUNE_CACHE": str(tmp_path / "cache")}
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
