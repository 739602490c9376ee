"""Separate virtual environments for engines that cannot share strataprune's (DeepSparse).

    strataprune backends install deepsparse      # once: a venv in the strataprune cache

DeepSparse 1.8.0 (the last real release; end of life since 2025-06-02, evaluation-only licence)
has wheels for Python <= 3.11 only and pins numpy < 2 and onnx 1.14, so it lives in its own venv
under ``<cache>/venvs/deepsparse-1.8.0`` (``$STRATAPRUNE_CACHE``, see strataprune/models/loading.py). The venv is
built in a temporary sibling folder and renamed into place only when the install and an import
check succeeded, so a failed install leaves nothing behind. Installing needs the package registry;
running never touches the network (telemetry is disabled in the worker).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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
        from strataprune.models.loading import cache_dir

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


def install(name: str, log=print) -> Path:  # type: ignore[no-untyped-def]
    """Create the engine's venv (idempotent); returns its folder."""
    if name not in ENVS:
        raise ConfigError(f"no separate environment is known for '{name}'; known: {', '.join(ENVS)}")
    env = ENVS[name]
    if env.installed():
        log(f"{name} is already installed in {env.folder}")
        return env.folder
    python = find_python(env.python_max)
    if python is None:
        raise DataError(
            f"{name} needs Python <= {env.python_max[0]}.{env.python_max[1]}; none was found on PATH (e.g. python3.11)"
        )
    env.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.folder.name}.tmp-", dir=env.folder.parent))
    try:
        log(f"creating a venv for {name} with {python} ...")
        subprocess.run([python, "-m", "venv", str(tmp)], check=True, capture_output=True, text=True)
        log(f"installing {' '.join(env.requirements)} (a few minutes) ...")
        pip = subprocess.run(
            [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", *env.requirements], capture_output=True, text=True
        )
        if pip.returncode != 0:
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"pip could not install {name}: {tail[0]}")
        check = subprocess.run(
            [str(tmp / "bin" / "python"), "-I", "-c", env.import_check],
            capture_output=True,
            text=True,
            env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
        )
        if check.returncode != 0:
            tail = check.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"{name} installed but does not import: {tail[0]}")
        (tmp / ".complete").write_text(check.stdout.strip() + "\n")
        # a venv records its own path in its scripts; moving it keeps `bin/python` working (we call it directly)
        _relocate(tmp, env.folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name} {check.stdout.strip()} installed in {env.folder}")
    return env.folder


def _relocate(tmp: Path, target: Path) -> None:
    cfg = tmp / "pyvenv.cfg"
    text = cfg.read_text()
    cfg.write_text(text.replace(str(tmp), str(target)))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
