"""strataprune's CPU sparse kernels: a packed bitmask format, GEMV/GEMM kernels in C++ (AVX-512, AVX2,
portable; OpenMP), a ``torch.library`` op and an ``nn.Linear`` replacement.

    from strataprune import kernels
    kernels.available()                      # Availability(ok=True) or the reason the library is missing
    kernels.isas()                           # ['portable', 'avx2', 'avx512'] on this CPU
    layer = kernels.SparseLinear.from_dense(linear)          # or: kernels.sparsify_model(model, 0.5)
    with kernels.use_isa("avx2"): y = layer(x)               # force a path (tests, benchmarks)
    kernels.set_num_threads(2)

    q = kernels.pack_int4(weight, group_size=128)            # int8/int4 codes under the same bitmask index
    y = kernels.sparse_linear_quantized(x, q)                # docs/kernels-quantized.md
    engine = kernels.NativeDecoder(packed_llama, max_slots=4)  # the whole decoder in C++ (docs/kernels.md)

Imported lazily: ``import strataprune`` does not load this package, and ``available()`` needs no torch.
Format: format.py, quantized.py; op: ops.py, quantized.py; modules: modules.py; C++: csrc/; benchmark: benchmarks/kernels.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._library import (
    ISA_NAMES,
    Availability,
    KernelInputError,
    KernelUnavailableError,
    available,
    best_isa,
    get_isa,
    get_num_threads,
    isas,
    set_isa,
    set_num_threads,
    use_isa,
)

_LAZY = {
    "PackedWeight": "format",
    "pack": "format",
    "unpack": "format",
    "sparse_linear": "ops",
    "SparseLinear": "modules",
    "SparsifyReport": "modules",
    "sparsify_model": "modules",
    "QuantizedWeight": "quantized",
    "QuantizedSparseLinear": "quantized",
    "pack_int8": "quantized",
    "pack_int4": "quantized",
    "pack_from_grid": "quantized",
    "sparse_linear_quantized": "quantized",
    "quantized_isas": "quantized",
    "use_quantized_isa": "quantized",
    "NativeDecoder": "decoder",
}
__all__ = [
    "ISA_NAMES",
    "Availability",
    "KernelInputError",
    "KernelUnavailableError",
    "available",
    "best_isa",
    "get_isa",
    "get_num_threads",
    "isas",
    "set_isa",
    "set_num_threads",
    "use_isa",
    *_LAZY,
]

if TYPE_CHECKING:  # pragma: no cover
    from .decoder import NativeDecoder  # noqa: F401
    from .format import PackedWeight, pack, unpack  # noqa: F401
    from .modules import SparseLinear, SparsifyReport, sparsify_model  # noqa: F401
    from .ops import sparse_linear  # noqa: F401
    from .quantized import (  # noqa: F401
        QuantizedSparseLinear,
        QuantizedWeight,
        pack_from_grid,
        pack_int4,
        pack_int8,
        quantized_isas,
        sparse_linear_quantized,
        use_quantized_isa,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
