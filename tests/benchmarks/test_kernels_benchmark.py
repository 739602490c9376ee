"""benchmarks/kernels.py: bad arguments give one `error:` line and exit 2, before anything is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv", [["--block-sparsity", "0"], ["--block-sparsity", "1.5"], ["--block-tokens", "5"], ["--shapes", "nope"]]
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--blocks", *argv],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and argv[0] in lines[0], lines
