"""Built-in pruners, registered through the same hook as third-party ones."""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_pruners(register):  # type: ignore[no-untyped-def]
    from .admm import ADMM
    from .dsnot import DSnoT
    from .magnitude import Magnitude
    from .sparsegpt import SparseGPT
    from .wanda import Wanda

    register(Magnitude)
    register(SparseGPT)
    register(Wanda)
    register(DSnoT)
    register(ADMM)
