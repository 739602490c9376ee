"""Built-in allocators, registered through the same hook as third-party ones.

uniform (baseline), atp (§3), alpha (AlphaPruning, §4), owl (§5), rmi (LoSA's allocation, §6.2),
hessian_cluster (reconstruction of arXiv 2409.20094, §7), evopress (§13), dlp (§14), saved (an earlier run's
allocation.json); section numbers refer to docs/algorithms.md.
"""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_allocators(register):  # type: ignore[no-untyped-def]
    # imported inside the hook so a broken optional dependency costs one plugin, not all of them
    from .alpha import AlphaPruning
    from .atp import ATP
    from .dlp import DLP
    from .evopress import EvoPress
    from .hessian_cluster import HessianCluster
    from .owl import OWL
    from .rmi import RMI
    from .saved import Saved
    from .uniform import Uniform

    for cls in (Uniform, ATP, AlphaPruning, OWL, RMI, HessianCluster, EvoPress, DLP, Saved):
        register(cls)
