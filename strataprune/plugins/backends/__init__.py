"""Built-in inference backends, registered through the same hook as third-party ones.

One engine per file; each imports its engine lazily, so registering them costs nothing.
"""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    from strataprune.plugins.backends.deepsparse import DeepSparseBackend
    from strataprune.plugins.backends.onnxruntime import OnnxRuntimeBackend
    from strataprune.plugins.backends.sparse_cpu import SparseCpuBackend
    from strataprune.plugins.backends.torch import TorchBackend
    from strataprune.plugins.backends.torch_24 import TorchSemiStructured

    register(TorchBackend)
    register(OnnxRuntimeBackend)
    register(DeepSparseBackend)
    register(TorchSemiStructured)
    register(SparseCpuBackend)
