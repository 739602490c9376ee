"""Loading the compiled kernels (ctypes) and the settings every call reads: instruction set and threads.

The shared library ``_sparse_cpu*.so`` is built by setup.py next to this file when the package is
installed with a C++ compiler; without one the install still succeeds and :func:`available` says why
the kernels cannot run. Nothing here imports torch, so the sparse-cpu backend can ask ``available()``
cheaply.

    python -c "from strataprune import kernels; print(kernels.available(), kernels.isas())"

Settings (also from the environment, read once at first use):
``STRATAPRUNE_KERNELS_ISA`` = auto | portable | avx2 | avx512, ``STRATAPRUNE_KERNELS_THREADS`` = N.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from strataprune.contract.errors import StrataPruneError

#: instruction-set paths of the library, in the order of its ``isa`` argument (sparse_kernels.h: enum Isa)
ISA_NAMES = ("portable", "avx2", "avx512")
_STATUS = {
    -1: "the CPU or this build lacks the instruction set",
    -2: "a negative size, or a weight too large for 32-bit offsets",
    -3: "out of memory for the GEMM scratch buffers",
    -4: "masks, offsets and values disagree (not produced by strataprune.kernels.pack?)",
}
_HERE = Path(__file__).resolve().parent


class KernelUnavailableError(StrataPruneError):
    """The compiled kernels are missing or cannot run here (the message says why and how to fix it)."""


class KernelInputError(StrataPruneError, ValueError):
    """A tensor handed to the kernels has the wrong dtype, shape, layout or device."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, and how to get the kernels

    def __bool__(self) -> bool:
        return self.ok


def library_candidates(folder: Path = _HERE) -> list[Path]:
    """Files in ``folder`` that can be the built library (any Python's extension suffix)."""
    return sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in folder.glob(f"_sparse_cpu{suffix}"))


def load_library(folder: Path = _HERE) -> tuple[ctypes.CDLL | None, Availability]:
    """Load the library from ``folder``; never raises: a failure comes back as an Availability with a reason."""
    candidates = library_candidates(folder)
    if not candidates:
        return None, Availability(
            False,
            f"the compiled kernels are missing from {folder} (the package was installed "
            "without a working C++ compiler or OpenMP; install g++ or clang++ and reinstall "
            "strataprune, e.g. `pip install -e .`)",
        )
    try:
        import torch  # noqa: F401  -- first, so the library shares torch's OpenMP runtime (same soname libgomp.so.1)
    except ImportError:
        pass
    try:
        lib = ctypes.CDLL(str(candidates[0]))
    except OSError as exc:
        return None, Availability(False, f"cannot load {candidates[0].name}: {exc}")
    if lib.sp_abi_version() != 1:
        return None, Availability(False, f"{candidates[0].name} has ABI version {lib.sp_abi_version()}, expected 1: reinstall")
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sp_linear.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, i32, i32]
    lib.sp_linear.restype = i32
    lib.sp_validate.argtypes = [ptr, ptr, i64, i64, i64]
    lib.sp_validate.restype = i32
    for name in ("sp_isa_supported",):
        getattr(lib, name).argtypes = [i32]
    return lib, Availability(True)


class _State:
    lib: ctypes.CDLL | None = None
    availability: Availability | None = None
    isa: int = -1  # -1: the best the CPU has
    threads: int = 0  # 0: torch's intra-op thread count when torch is loaded, else OpenMP's default
    lock = threading.Lock()


def _ensure() -> None:
    if _State.availability is not None:
        return
    with _State.lock:
        if _State.availability is None:
            _State.lib, availability = load_library()
            if availability.ok:
                isa = os.environ.get("STRATAPRUNE_KERNELS_ISA", "auto")
                threads = os.environ.get("STRATAPRUNE_KERNELS_THREADS", "0")
                try:
                    _State.isa = _isa_index(isa)
                    _State.threads = int(threads)
                except (KernelInputError, ValueError) as exc:
                    availability = Availability(False, f"bad STRATAPRUNE_KERNELS_ISA/THREADS ({isa!r}, {threads!r}): {exc}")
            _State.availability = availability


def available() -> Availability:
    """Whether the kernels can run here; if not, ``reason`` says why and how to fix it."""
    _ensure()
    return _State.availability  # type: ignore[return-value]


def library() -> ctypes.CDLL:
    """The loaded library, or KernelUnavailableError with the reason."""
    _ensure()
    if _State.lib is None or not _State.availability:
        raise KernelUnavailableError(f"strataprune CPU sparse kernels unavailable: {_State.availability.reason}")  # type: ignore[union-attr]
    return _State.lib


def isas() -> list[str]:
    """Instruction-set paths this CPU and build can run, slowest first (``portable`` always, when built)."""
    lib = library()
    return [name for i, name in enumerate(ISA_NAMES) if lib.sp_isa_supported(i)]


def best_isa() -> str:
    return ISA_NAMES[library().sp_best_isa()]


def _isa_index(name: str) -> int:
    if name == "auto":
        return -1
    if name not in ISA_NAMES:
        raise KernelInputError(f"unknown instruction set {name!r}; allowed: auto, {', '.join(ISA_NAMES)}")
    return ISA_NAMES.index(name)


def set_isa(name: str) -> None:
    """Force one path (``portable``, ``avx2``, ``avx512``) for every later call, or ``auto`` for the best."""
    index = _isa_index(name)
    if index >= 0 and name not in isas():
        raise KernelInputError(f"instruction set {name!r} is not supported on this CPU; supported: {', '.join(isas())}")
    _State.isa = index


def get_isa() -> str:
    """The path calls use now (``auto`` resolved to the CPU's best)."""
    _ensure()
    return best_isa() if _State.isa < 0 else ISA_NAMES[_State.isa]


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """``with use_isa("avx2"): ...`` forces a path inside the block (tests, benchmarks)."""
    _ensure()
    previous = _State.isa
    set_isa(name)
    try:
        yield
    finally:
        _State.isa = previous


#: more threads than any CPU these kernels target; each thread costs per-thread buffers and a KV score row
MAX_THREADS = 1024


def set_num_threads(threads: int | None) -> None:
    """Threads per kernel call; ``None`` or 0 follows ``torch.get_num_threads()``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS):
        raise KernelInputError(f"threads must be an integer from 0 to {MAX_THREADS} or None, got {threads!r}")
    _ensure()
    _State.threads = threads or 0


def get_num_threads() -> int:
    """Threads the next call will use."""
    _ensure()
    if _State.threads > 0:
        return _State.threads
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return library().sp_default_threads()


def isa_index() -> int:
    _ensure()
    return _State.isa


def status_message(code: int) -> str:
    return _STATUS.get(code, f"error code {code}")
