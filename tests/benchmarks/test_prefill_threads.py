"""benchmarks/prefill_threads.py: bad arguments give one `error:` line and exit 2, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "names"),
    [(["--bits", "4,5"], "--bits '4,5'"), (["--lm-head", "int4"], "--lm-head int4"), (["--repeats", "0"], "--repeats")],
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], names: str, tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prefill_threads.py"), "--run", str(tmp_path), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0]


def test_a_folder_that_is_not_a_run_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prefill_threads.py"), "--run", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith(f"error: --run '{tmp_path}'") and "report.json" in done.stderr
