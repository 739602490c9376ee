"""benchmarks/cpu_bar.py's argument checks: bad values are one `error:` line and exit 2, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
