"""Uniform allocation: every prunable matrix gets the target sparsity.

The baseline every non-uniform allocator is compared with (Wanda and SparseGPT as published).

    strataprune run --allocator uniform --sparsity 0.5
"""

from __future__ import annotations

from strataprune.contract.allocation import Allocation
from strataprune.contract.allocator import AllocationContext, Allocator


class Uniform(Allocator):
    name = "uniform"
    version = "1"
    summary = "the same ratio for every matrix"

    def allocate(self, ctx: AllocationContext) -> Allocation:
        allocation = Allocation.uniform(ctx.layout, ctx.target.ratio, allocator=self.name)
        if ctx.target.pattern is not None:
            allocation.patterns = {name: ctx.target.pattern for name in ctx.layout.names}
        return allocation
