"""Separate virtual environments for engines that cannot share strataprune's (DeepSparse).

    strataprune backends install deepsparse      # once: a venv in the strataprune cache

DeepSparse 1.8.0 (the last real release; end of life since 2025-06-02, evaluation-only licence)
has wheels for Python <= 3.11 only and pins numpy < 2 and onnx 1.14, so it lives in its own venv
under ``<cache>/venvs/deepsparse-1.8.0`` (``$STRATAPRUNE_CACHE``, see strataprune/models/loading.py). The venv is
built at that path (a venv moved after it was built keeps the old path in its scripts), under a lock,
and counts as installed only once ``.complete`` is written after an import check. A failed or
interrupted install (Ctrl-C, SIGTERM) kills pip with everything it started (its own process group)
and removes the folder; one killed outright (SIGKILL) leaves it, and the next install removes it first.
Installing needs the package registry; running never touches the network (telemetry is disabled in the worker).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from strataprune.contract.errors import ConfigError, DataError


@dataclass(frozen=True)
class EngineEnv:
    name: str
    requirements: tuple[str, ...]
    python_max: tuple[int, int]
    import_check: str

    @property
    def folder(self) -> Path:
        from strataprune.contract.cache import cache_dir

        return cache_dir() / "venvs" / f"{self.name}-{self.requirements[0].split('==')[1]}"

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    def installed(self) -> bool:
        return self.python.is_file() and (self.folder / ".complete").is_file()


ENVS = {
    "deepsparse": EngineEnv(
        "deepsparse",
        ("deepsparse==1.8.0", "numpy<2"),
        (3, 11),
        "import os; os.environ['NM_DISABLE_ANALYTICS'] = '1'; import deepsparse; print(deepsparse.__version__)",
    ),
}


def find_python(maximum: tuple[int, int]) -> str | None:
    """A Python interpreter no newer than ``maximum``: this one, or python3.11 / python3.10 on PATH."""
    if sys.version_info[:2] <= maximum:
        return sys.executable
    for minor in range(maximum[1], 8, -1):
        found = shutil.which(f"python{maximum[0]}.{minor}")
        if found:
            return found
    return None


#: written first into a venv folder this module builds; only such a folder is ever removed here
BUILDING = ".strataprune-venv"


def _pip_command(python: Path, requirements: tuple[str, ...]) -> list[str]:
    """The install step (tests replace it with a small local one)."""
    return [str(python), "-m", "pip", "install", "--quiet", *requirements]


def _venv_command(python: str, folder: Path) -> list[str]:
    return [python, "-m", "venv", str(folder)]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _run_child(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on any interruption (Ctrl-C, SIGTERM through
    strataprune/runtime/signals.py, an error) kill the whole group, pip's own children included, before going on.
    The child also gets SIGKILL if this process is killed outright (PR_SET_PDEATHSIG, Linux)."""
    import signal

    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _healthy(env: EngineEnv) -> bool:
    """Installed, and built where it is: its pip's interpreter line names this folder (a venv built
    elsewhere and moved keeps the old path in its scripts)."""
    if not env.installed():
        return False
    pip = env.folder / "bin" / "pip"
    try:
        first = pip.read_bytes()[:4096].split(b"\n", 1)[0].decode(errors="replace")
    except OSError:
        return True  # a venv without pip scripts: we run bin/python directly
    return first.startswith(f"#!{env.folder}/bin/")


def _remove_leftovers(env: EngineEnv, log) -> None:  # type: ignore[no-untyped-def]
    """Under the install lock: remove what an interrupted or moved install left (only folders this module made)."""
    folder = env.folder
    if folder.exists() and not _healthy(env):
        if (folder / BUILDING).is_file() or (folder / "pyvenv.cfg").is_file():
            why = "an interrupted install" if not env.installed() else "an install built elsewhere and moved"
            log(f"removing {folder}, left by {why}")
            shutil.rmtree(folder)
        else:
            raise DataError(f"'{folder}' exists and is not a venv strataprune built; move it away and install again")
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # the temporaries of earlier strataprune versions
        if stale.is_dir() and (stale / "pyvenv.cfg").is_file():
            log(f"removing {stale}, left by an interrupted install of an earlier strataprune")
            shutil.rmtree(stale, ignore_errors=True)


def install(name: str, log=print) -> Path:  # type: ignore[no-untyped-def]
    """Create the engine's venv (idempotent); returns its folder.

    The venv is built at its final path (so its scripts name the right interpreter), under an
    exclusive lock, with ``.complete`` written last; an interrupted install (Ctrl-C, SIGTERM, a
    failure) kills its pip and everything pip started and removes the folder; one killed outright
    leaves the folder, which the next install removes before building again.
    """
    import fcntl

    if name not in ENVS:
        raise ConfigError(f"no separate environment is known for '{name}'; known: {', '.join(ENVS)}")
    env = ENVS[name]
    if _healthy(env):
        log(f"{name} is already installed in {env.folder}")
        return env.folder
    python = find_python(env.python_max)
    if python is None:
        raise DataError(
            f"{name} needs Python <= {env.python_max[0]}.{env.python_max[1]}; none was found on PATH (e.g. python3.11)"
        )
    env.folder.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(env.folder.parent / f".{env.folder.name}.install-lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"another strataprune is installing {name} into {env.folder}; wait for it to finish") from None
        if _healthy(env):  # the other install finished meanwhile
            log(f"{name} is already installed in {env.folder}")
            return env.folder
        _remove_leftovers(env, log)
        version = _build(env, python, log)
    finally:
        os.close(lock)
    log(f"{name} {version} installed in {env.folder}")
    return env.folder


def _build(env: EngineEnv, python: str, log) -> str:  # type: ignore[no-untyped-def]
    folder = env.folder
    folder.mkdir()
    (folder / BUILDING).write_text(f"pid {os.getpid()}\n")
    try:
        log(f"creating a venv for {env.name} with {python} in {folder} ...")
        venv = _run_child(_venv_command(python, folder))
        if venv.returncode != 0:
            tail = (venv.stderr or venv.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"could not create a venv for {env.name}: {tail[0]}")
        log(f"installing {' '.join(env.requirements)} (a few minutes) ...")
        pip = _run_child(_pip_command(env.python, env.requirements))
        if pip.returncode != 0:
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"pip could not install {env.name}: {tail[0]}")
        check = _run_child([str(env.python), "-I", "-c", env.import_check], env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
        if check.returncode != 0:
            tail = check.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"{env.name} installed but does not import: {tail[0]}")
        (folder / ".complete").write_text(check.stdout.strip() + "\n")
        (folder / BUILDING).unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return check.stdout.strip()
