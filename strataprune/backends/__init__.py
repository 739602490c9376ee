"""Built-in inference backends, registered through the same hook as third-party ones.

One engine per file; each imports its engine lazily, so registering them costs nothing.
"""

from strataprune.core.hookspecs import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from .deepsparse import DeepSparseBackend
    from .onnxruntime import OnnxRuntimeBackend
    from .sparse_cpu import SparseCpuBackend
    from .torch import TorchBackend
    from .torch_24 import TorchSemiStructured

    register(TorchBackend)
    register(OnnxRuntimeBackend)
    register(DeepSparseBackend)
    register(TorchSemiStructured)
    register(SparseCpuBackend)
