"""An example strataprune plugin: the ``depth_ramp`` allocator.

Sparsity grows linearly with depth from ``target - spread`` to ``target + spread``, then the
shared clip-and-redistribute helper makes the parameter-weighted mean exactly the target.

    pip install ./examples/strataprune-example-plugin
    strataprune plugins                       # lists depth_ramp, provided by strataprune-example-plugin
    strataprune run --allocator depth_ramp --set allocator.spread=0.1
"""

from __future__ import annotations

from dataclasses import dataclass

from strataprune import Allocation, AllocationContext, Allocator, hookimpl, redistribute


@dataclass
class DepthRampConfig:
    #: half the difference between the last and the first block's sparsity
    spread: float = 0.05


class DepthRamp(Allocator):
    name = "depth_ramp"
    version = "0.1.0"
    summary = "linear in depth, target +- spread (example plugin)"
    Config = DepthRampConfig

    def allocate(self, ctx: AllocationContext) -> Allocation:
        layout, target = ctx.layout, ctx.target.ratio
        steps = max(layout.num_blocks - 1, 1)
        raw = [target + self.config.spread * (2 * b / steps - 1) for b in range(layout.num_blocks)]
        sizes = [layout.block_numel(b) for b in range(layout.num_blocks)]
        return Allocation.from_blocks(layout, list(redistribute(raw, sizes, target)), target, allocator=self.name)


@hookimpl
def register_allocators(register):  # type: ignore[no-untyped-def]
    register(DepthRamp)
