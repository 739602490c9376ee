"""tox plugin (loaded by tox from the project root): one environment for the tests, their fast subset and the main job.

tox 4 records the name of the environment that built a folder and rebuilds the folder (~70 s here) whenever an
environment of another name uses it, even when nothing it would install differs. ``tox -e run`` followed by ``tox`` would
rebuild .tox/strataprune at each switch. The environments that set ``runner = strataprune-shared`` in tox.ini install the
same thing (their sections only add a description and commands; tests/test_tooling.py checks), so they record one
identity: that of ``tests``, the environment the folder was first made for. Everything else tox compares before reusing
a folder (the interpreter, ``deps``, the package's dependencies) is still compared and still triggers a reinstall.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from tox.plugin import impl
from tox.tox_env.info import Info
from tox.tox_env.python.virtual_env.runner import VirtualEnvRunner
from tox.tox_env.register import ToxEnvRegister

SHARED_IDENTITY = {"name": "tests", "type": VirtualEnvRunner.__name__}


class _SharedInfo(Info):
    def compare(self, value: Any, section: str, sub_section: str | None = None) -> AbstractContextManager[tuple[bool, Any]]:
        if section == "ToxEnv" and sub_section is None:
            value = dict(SHARED_IDENTITY)
        return super().compare(value, section, sub_section)


class SharedVirtualEnvRunner(VirtualEnvRunner):
    """A virtualenv environment that several tox environment names use as one."""

    @staticmethod
    def id() -> str:
        return "strataprune-shared"

    @property
    def cache(self) -> Info:
        return _SharedInfo(self.env_dir)


@impl
def tox_register_tox_env(register: ToxEnvRegister) -> None:
    register.add_run_env(SharedVirtualEnvRunner)
