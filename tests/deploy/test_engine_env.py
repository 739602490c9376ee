"""`strataprune backends install`: atomic and clean, with a small local install step in place of DeepSparse's
485 MB download (the mechanism is the same: a venv, a pip child that may start children of its own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

#: runs `strataprune backends install deepsparse` with a fake engine; argv[1] = "slow" (pip waits for a signal,
#: after starting a grandchild and writing both pids to argv[2]) or "quick"; argv[3] = "pip" for a real venv with pip
INSTALL = textwrap.dedent("""
    import sys
    from pathlib import Path
    import strataprune.deploy.engine_env as engine_env
    mode, pids, with_pip = sys.argv[1], sys.argv[2], sys.argv[3] == "pip"
    engine_env.ENVS["deepsparse"] = engine_env.EngineEnv("deepsparse", ("fake==1.0",), (3, 99), "print('1.0')")
    SLOW = (
        "import os, subprocess, sys, time, pathlib\\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\\n"
        "pathlib.Path(sys.argv[1]).write_text(f'{os.getpid()} {child.pid}')\\n"
        "time.sleep(300)\\n"
    )
    def pip_command(python, requirements):
        return [str(python), "-c", SLOW, pids] if mode == "slow" else [str(python), "-c", "pass"]
    def venv_command(python, folder):
        return [python, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(folder)]
    engine_env._pip_command, engine_env._venv_command = pip_command, venv_command
    from strataprune.cli import main
    sys.exit(main(["backends", "install", "deepsparse"]))
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def install(cache: Path, mode: str, pids: Path, pip: str = "no-pip", **kwargs) -> subprocess.Popen:
    env = {**os.environ, "STRATAPRUNE_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", INSTALL, mode, str(pids), pip], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_interrupted_install_kills_pip_and_its_children_and_leaves_nothing(tmp_path):
    cache, pids = tmp_path / "cache", tmp_path / "pids"
    proc = install(cache, "slow", pids)
    deadline = time.time() + 120
    while time.time() < deadline and not pids.exists() and proc.poll() is None:
        time.sleep(0.1)
    started: list[int] = []
    try:
        assert pids.exists(), proc.communicate()[1][-2000:]
        time.sleep(0.2)
        started = [int(p) for p in pids.read_text().split()]
        assert (cache / "venvs" / "deepsparse-1.0" / "bin" / "python").exists()  # built at its final path
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(pid) for pid in started):
            time.sleep(0.1)
        assert not any(alive(pid) for pid in started), "pip or its child survived"
        assert [p.name for p in (cache / "venvs").iterdir() if not p.name.endswith(".install-lock")] == []
    finally:
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_next_install_removes_leftovers_and_builds_a_venv_whose_scripts_point_to_it(tmp_path):
    cache, pids = tmp_path / "cache", tmp_path / "pids"
    venvs = cache / "venvs"
    left = venvs / "deepsparse-1.0"  # what an install killed outright (SIGKILL) leaves
    (left / "lib").mkdir(parents=True)
    (left / ".strataprune-venv").write_text("pid 1\n")
    (left / "lib" / "half-a-wheel").write_bytes(b"\0" * 1000)
    legacy = venvs / ".deepsparse-1.0.tmp-ab12cd34"  # an earlier version's temporary
    legacy.mkdir()
    (legacy / "pyvenv.cfg").write_text("home = /usr/bin\n")
    proc = install(cache, "quick", pids, pip="pip")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert f"removing {left}, left by an interrupted install" in err and f"removing {legacy}" in err
    assert not legacy.exists() and not (left / "lib" / "half-a-wheel").exists() and not (left / ".strataprune-venv").exists()
    assert (left / ".complete").read_text() == "1.0\n"
    assert (left / "bin" / "pip").read_text().splitlines()[0].startswith(f"#!{left}/bin/python")
    assert sorted(p.name for p in venvs.iterdir()) == [".deepsparse-1.0.install-lock", "deepsparse-1.0"]
    # installed: a second install does nothing
    proc = install(cache, "slow", pids)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "already installed" in err and not pids.exists()
