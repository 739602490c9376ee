"""Output folders: only our own outputs are replaced, one writer at a time, a commit that never loses data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from strataprune.contract.errors import OutputError
from strataprune.runtime import outputs
from strataprune.runtime.reports import atomic_output_dir, check_output_dir


def write_output(dest: Path, content: str = "new", overwrite: bool = False) -> None:
    with atomic_output_dir(dest, overwrite, command="test") as tmp:
        (tmp / "report.json").write_text(json.dumps({"content": content}))
        (tmp / "model.safetensors").write_bytes(b"\0" * 64)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (and its siblings' names), to show nothing changed."""
    out = {p.name: b"<sibling>" for p in folder.parent.iterdir() if p != folder}
    out.update(
        {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}
    )
    return out


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_fresh_output_has_marker_and_usual_permissions(tmp_path):
    dest = tmp_path / "a" / "b" / "out"
    old_umask = os.umask(0o022)
    try:
        with atomic_output_dir(dest, False, command="test") as tmp:
            (tmp / "report.json").write_text("{}")
            # writers that go through a private temporary file (safetensors does) leave 0600 behind
            fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"\0" * 64)
            os.close(fd)
            (tmp / "alpha").mkdir(mode=0o700)
            (tmp / "alpha" / "allocation.json").write_text("[]")
    finally:
        os.umask(old_umask)
    assert (dest.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    modes = {p.relative_to(dest).as_posix(): p.stat().st_mode & 0o777 for p in dest.rglob("*")}
    assert modes == {
        outputs.MARKER: 0o644,
        "report.json": 0o644,
        "model.safetensors": 0o644,
        "alpha": 0o755,
        "alpha/allocation.json": 0o644,
    }
    marker = json.loads((dest / outputs.MARKER).read_text())
    assert marker["tool"] == "strataprune" and marker["command"] == "test" and marker["state"] == "complete"
    assert marker["files"] == {
        name: {"size": (dest / name).stat().st_size, "sha256": hashlib.sha256((dest / name).read_bytes()).hexdigest()}
        for name in ("alpha/allocation.json", "model.safetensors", "report.json")
    }
    assert marker["folders"] == ["alpha"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out"]  # no lock file or temporary left beside it


def test_overwrite_replaces_only_what_strataprune_wrote(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    before = tree(foreign)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by strataprune.*left untouched"):
            write_output(foreign, overwrite=overwrite)
    assert tree(foreign) == before

    ours = tmp_path / "ours"
    write_output(ours, "first")
    with pytest.raises(OutputError, match="already holds strataprune test; pass --overwrite"):
        write_output(ours, "second")
    write_output(ours, "second", overwrite=True)
    assert json.loads((ours / "report.json").read_text())["content"] == "second"

    (ours / "notes.txt").write_text("added by hand")
    with pytest.raises(OutputError, match=r"holds files strataprune did not write \(notes.txt\); move them away"):
        write_output(ours, "third", overwrite=True)
    assert (ours / "notes.txt").read_text() == "added by hand"

    empty = tmp_path / "empty"
    empty.mkdir()
    write_output(empty)  # an empty folder holds nothing to lose
    assert (empty / "report.json").is_file()


def test_overwrite_is_decided_by_the_manifest_alone(tmp_path):
    """No heuristic stands in for the manifest: a copied report.json, an output without a marker, a marker
    that lists names only, a hand-added file one level down, an edited file: all refused, all named."""
    report = json.dumps({"format_version": 1, "environment": {"strataprune": "0.1.0"}})
    thesis = tmp_path / "thesis"  # a user's folder with a copied report in it
    thesis.mkdir()
    (thesis / "report.json").write_text(report)
    (thesis / "thesis.tex").write_text("precious")
    (thesis / "results.csv").write_text("1,2")
    legacy = tmp_path / "legacy"  # an output of an earlier version without a marker, with a hand-added note
    legacy.mkdir()
    (legacy / "report.json").write_text(report)
    (legacy / "NOTES.md").write_text("mine")
    for folder in (thesis, legacy):
        before = tree(folder)
        with pytest.raises(OutputError, match="not written by strataprune .*left untouched"):
            write_output(folder, overwrite=True)
        assert tree(folder) == before

    names_only = tmp_path / "names-only"  # a marker of the first format: top-level names, no hashes
    names_only.mkdir()
    (names_only / "report.json").write_text(report)
    (names_only / outputs.MARKER).write_text(json.dumps({"tool": "strataprune", "command": "run", "files": ["report.json"]}))
    with pytest.raises(OutputError, match="lists no file sizes and hashes.*delete it yourself"):
        write_output(names_only, overwrite=True)

    ours = tmp_path / "ours"
    with atomic_output_dir(ours, False, command="allocate") as tmp:
        (tmp / "alpha").mkdir()
        (tmp / "alpha" / "allocation.json").write_text("{}")
        (tmp / "summary.json").write_text("{}")
    (ours / "alpha" / "MY_ANALYSIS.md").write_text("hand-written")
    (ours / "plots").mkdir()
    (ours / "summary.json").write_text('{"edited": true}')
    before = tree(ours)
    with pytest.raises(OutputError) as info:
        write_output(ours, overwrite=True)
    assert (
        "holds files strataprune did not write (alpha/MY_ANALYSIS.md, plots/) "
        "and files changed since strataprune wrote them (summary.json)"
    ) in str(info.value)
    assert tree(ours) == before
    (ours / "alpha" / "MY_ANALYSIS.md").unlink()
    (ours / "plots").rmdir()
    (ours / "summary.json").write_text("{}")  # the same content again: nothing would be lost
    write_output(ours, overwrite=True)
    assert not (ours / "alpha").exists()


@pytest.mark.parametrize("relation", ["is", "inside", "contains", "via_symlink"])
def test_an_output_never_overlaps_an_input(tmp_path, relation):
    model = tmp_path / "model"
    write_output(model, "the model")
    link = tmp_path / "link"
    link.symlink_to(model)
    output = {"is": model, "inside": model / "sub", "contains": tmp_path, "via_symlink": link / "sub"}[relation]
    inputs = {"the model (--model)": link if relation == "is" else model, "the text": "bbc"}  # "bbc" is a name, skipped
    before = tree(model)
    with pytest.raises(
        OutputError, match=r"output '.*' (is|lies inside|contains) the model \(--model\) .*which this command reads"
    ):
        check_output_dir(output, overwrite=True, inputs=inputs)
    assert tree(model) == before and not outputs._held
    # an input that becomes the destination during the run (a link switched) is caught at the commit
    elsewhere = tmp_path / "elsewhere"
    switch = tmp_path / "switch"
    switch.symlink_to(elsewhere)
    with pytest.raises(OutputError, match="overlap its inputs.*the new output is kept in"):
        with atomic_output_dir(model, True, inputs={"--model": switch}) as tmp:
            (tmp / "report.json").write_text("{}")
            switch.unlink()
            switch.symlink_to(model)
    assert tree(model) == {**before, **{k: v for k, v in tree(model).items() if v == b"<sibling>"}}


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "root", "symlink"])
def test_unwritable_destinations_are_refused_before_work(tmp_path, where):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    dest = {
        "file": tmp_path / "f.txt",
        "under_file": tmp_path / "f.txt" / "out",
        "proc": Path("/proc/strataprune-x"),
        "root": Path("/"),
        "symlink": tmp_path / "link",
    }[where]
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    message = {
        "file": "exists and is not a folder",
        "under_file": "which is a file, not a folder",
        "proc": "cannot create files in '/proc'",
        "root": "filesystem root",
        "symlink": "is a symbolic link",
    }[where]
    with pytest.raises(OutputError, match=message):
        check_output_dir(dest, overwrite=True)
    assert (tmp_path / "f.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "link"]


def test_failed_work_leaves_the_old_output_and_no_temporary(tmp_path):
    dest = tmp_path / "out"
    write_output(dest, "old")
    before = tree(dest)
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest, True) as tmp:
            (tmp / "report.json").write_text("half")
            raise RuntimeError("pruning failed")
    assert tree(dest) == before


HOLD_LOCK = textwrap.dedent("""
    import sys
    from strataprune.runtime.reports import check_output_dir
    check_output_dir(sys.argv[1], overwrite=True, command="run")
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_second_writer_gets_one_clear_error_before_its_work(tmp_path):
    dest = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(dest)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"being written by another strataprune run \(pid {holder.pid} .*strataprune run"):
            check_output_dir(dest, overwrite=True)
    finally:
        holder.communicate("")
    write_output(dest)  # the lock died with its holder
    assert (dest / "report.json").is_file()


def test_a_commit_that_fails_mid_swap_loses_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    write_output(dest, "old")
    before = tree(dest)

    def broken_exchange(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(outputs, "_exchange", broken_exchange)
    with pytest.raises(OutputError, match="previous output is unchanged, the new one is kept in") as info:
        write_output(dest, "new", overwrite=True)
    assert tree(dest) == {**before, **{k: v for k, v in tree(dest).items() if v == b"<sibling>"}}
    kept = Path(str(info.value).rsplit("kept in '", 1)[1].rstrip("'"))
    assert json.loads((kept / "report.json").read_text())["content"] == "new"

    # no atomic exchange on this system: two renames, and the second one fails -> the first is undone
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if ".strataprune-tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(OutputError, match="previous output is back in place"):
        write_output(dest, "newer", overwrite=True)
    assert json.loads((dest / "report.json").read_text())["content"] == "old"
    monkeypatch.setattr(outputs.os, "rename", real_rename)
    write_output(dest, "newest", overwrite=True)  # the two-rename path itself works
    assert json.loads((dest / "report.json").read_text())["content"] == "newest"


KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, sys
    from strataprune.runtime.reports import atomic_output_dir
    with atomic_output_dir(sys.argv[1], overwrite=True, command="run") as tmp:
        (tmp / "model.safetensors").write_bytes(b"\\0" * 100000)
        os._exit(9)  # killed while saving: no cleanup runs
""")


def test_leftovers_of_killed_runs_are_cleaned_or_reported(tmp_path):
    dest = tmp_path / "out"
    write_output(dest, "old")
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(dest)])
    assert proc.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if ".strataprune-tmp-" in p.name]
    assert len(leftovers) == 1 and json.loads((dest / "report.json").read_text())["content"] == "old"

    # a commit killed between its two renames: the destination is gone, the old output sits aside
    pid = dead_pid()
    aside = tmp_path / f".other.strataprune-old-{pid}-0123abcd"
    write_output(aside, "aside")
    legacy = tmp_path / ".out.tmp-abcd1234"  # strataprune 0.1.0's mkdtemp name: not provably ours
    legacy.mkdir()
    notes: list[str] = []
    check_output_dir(dest, overwrite=True, log=notes.append)
    check_output_dir(tmp_path / "other", overwrite=True, log=notes.append)
    outputs.release_output_locks()
    assert not any(".strataprune-tmp-" in p.name for p in tmp_path.iterdir())
    assert json.loads((tmp_path / "other" / "report.json").read_text())["content"] == "aside" and not aside.exists()
    assert legacy.is_dir()
    assert any("removed" in n and "interrupted strataprune run" in n for n in notes)
    assert any("restored the previous output" in n for n in notes)
    assert any(".out.tmp-abcd1234" in n and "not removed" in n for n in notes)


def test_an_interrupt_while_the_manifest_is_hashed_removes_the_temporary(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    write_output(dest, "old")
    before = tree(dest)

    def interrupted(path, stat=None):
        raise KeyboardInterrupt  # what SIGTERM becomes (strataprune/runtime/signals.py)

    monkeypatch.setattr(outputs, "_sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_output(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and tree(dest) == before
