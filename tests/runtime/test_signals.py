"""SIGTERM (timeout, kill, systemd, docker) cleans up like Ctrl-C: no temporary output, no lock, exit 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

#: `strataprune run`, with a save that stops (after writing the weights into the temporary folder) until killed
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import transformers
    original = transformers.PreTrainedModel.save_pretrained
    def slow(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        print("saving", folder, flush=True)
        time.sleep(120)
    transformers.PreTrainedModel.save_pretrained = slow
    from strataprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"no '{prefix}' line within {timeout} s: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_save_removes_the_temporary_output_and_the_lock(tiny_llama_dir, text_file, tmp_path, signum):
    outs = tmp_path / "outs"
    outs.mkdir()
    args = ["run", "--model", str(tiny_llama_dir), "--calibration", str(text_file), "--eval-data", str(text_file)]
    args += ["--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *args, "--output", str(outs / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "STRATAPRUNE_PROGRESS": "0"},
    )
    line = wait_for_line(proc, "saving", timeout=120)
    temporary = Path(line.split(None, 1)[1].strip())
    assert (temporary / "model.safetensors").is_file() and any(p.name.endswith("strataprune-lock") for p in outs.iterdir())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted (stopped by {signal.Signals(signum).name})" in err
    assert list(outs.iterdir()) == []  # no temporary folder, no lock file, no output
