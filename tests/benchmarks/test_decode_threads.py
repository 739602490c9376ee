"""benchmarks/decode_threads.py: bad arguments give one `error:` line and exit 2, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [["--spin", "2000000"], ["--spin", "-1"], ["--threads", "0"], ["--threads", "5000"], ["--bits", "5"], ["--busy", "-1"]],
)
def test_bad_arguments_exit_2_with_one_error_line(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_threads.py"), "--run", str(tmp_path), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and argv[0] in lines[0]
