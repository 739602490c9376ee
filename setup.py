"""Builds the optional C++ sparse kernels (strataprune/kernels/csrc) as a plain shared library with a C ABI.

Everything else about the package is in pyproject.toml. The extension is ``optional``: without a C++
compiler the install still succeeds and ``strataprune.kernels.available()`` says why the kernels are
missing. Without OpenMP (e.g. Apple clang) it is rebuilt single-threaded. torch is not needed to build:
Python calls the library through ctypes on tensor data pointers.

    pip install -e .            # or tox (package = editable): builds strataprune/kernels/_sparse_cpu*.so
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("strataprune/kernels/csrc")


class BuildSharedLibrary(build_ext):
    """Compiler flags per compiler family, an OpenMP-less retry, and no Python module init symbol."""

    def build_extension(self, ext: Extension) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        base = ["/O2", "/std:c++17"] if msvc else ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"]
        openmp = ["/openmp"] if msvc else ["-fopenmp"]
        try:
            ext.extra_compile_args, ext.extra_link_args = base + openmp, ([] if msvc else openmp)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 -- any compiler failure: try once more without OpenMP
            print(f"warning: building {ext.name} with OpenMP failed ({exc}); retrying single-threaded")
            ext.extra_compile_args, ext.extra_link_args = base, []
            super().build_extension(ext)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library, not a Python module: no PyInit_* to export


setup(
    ext_modules=[
        Extension(
            "strataprune.kernels._sparse_cpu",
            sources=sorted(str(p) for p in CSRC.glob("*.cpp")),
            depends=sorted(str(p) for pattern in ("*.h", "*.inc") for p in CSRC.glob(pattern)),
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildSharedLibrary},
)
