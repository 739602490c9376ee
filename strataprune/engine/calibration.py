"""Block-sequential calibration (docs/algorithms.md §1).

The inputs of block l are the outputs of blocks < l as they are *now*: during a pruning pass
that means already pruned, so each block's statistics see the errors of the blocks before it.
One block runs at a time; statistics are collected only when a plugin asks for them, with one
accumulator per distinct input tensor: q/k/v (and gate/up) share theirs, so their Hessian is computed
and stored once, and ``stats.hessians`` / ``stats.input_norms`` map each of them to the SAME tensor
(consumers treat statistics as read-only). A dense pass runs every block once; a pruning pass runs
it twice (measure, then recompute the pruned outputs) and keeps no outputs from the first run.
A pass that needs no statistic (magnitude pruning after a weight-only allocator) runs no block at all:
its visitor and pruner see each block's weights, which is all they read.

    calibrator = Calibrator(loaded, windows)
    calibrator.run({"input_norms"}, visit=allocator.observe_block)         # dense pass
    calibrator.run(pruner.needs, prune=prune_one_block)                    # pruning pass

Memory: hidden states are kept in ``activation_dtype`` (default: the model's dtype; fp32, bf16 or
fp16) and, with ``activation_dir``, in files memory-mapped from that folder instead of anonymous
memory (the kernel can write them out and evict them, so they need not fit in RAM). With an
offloaded model (strataprune/models/offload.py) each block is loaded from disk only while it is processed and
written back when it was pruned.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.layout import STATISTICS, BlockInputs, BlockStats, LoadedModel, ModelLayout
from strataprune.models.offload import offloader_of
from strataprune.runtime.progress import progress


class _Accumulator:
    """Running sums over all calibration tokens of one input tensor stream."""

    def __init__(self, dim: int, hessian: bool, norms: bool, device: torch.device, means: bool = False) -> None:
        self.tokens = 0
        self.sq = torch.zeros(dim, dtype=torch.float64, device=device) if norms else None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device) if means else None
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.sq is not None:
            self.sq += (x.double() ** 2).sum(0)
        if self.sum is not None:
            self.sum += x.double().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)


class Calibrator:
    def __init__(
        self,
        loaded: LoadedModel,
        input_ids: torch.Tensor,
        *,
        activation_dtype: torch.dtype | None = None,
        activation_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.input_ids = input_ids
        self.blocks = self.adapter.blocks(self.model)
        self.layout: ModelLayout = self.adapter.layout(self.model)
        self.modules = self.adapter.prunable(self.model)
        self.activation_dtype = activation_dtype
        self.activation_dir = Path(activation_dir) if activation_dir is not None else None
        if self.activation_dir is not None:
            self.activation_dir.mkdir(parents=True, exist_ok=True)
        self.offload = offloader_of(self.model)
        self.show = show_progress
        self._captured: BlockInputs | None = None
        self.passes = 0
        self._parent: Calibrator | None = None  # a subset counts its passes in the calibrator it came from

    def captured(self) -> BlockInputs:
        """Inputs of block 0: they do not depend on any pruning, so they are captured once per run."""
        if self._captured is None:
            captured = self.adapter.capture(self.model, self.input_ids)
            hidden = captured.hidden
            if self.activation_dtype is not None or self.activation_dir is not None:
                buffer = self.buffer(hidden.shape, self.activation_dtype or hidden.dtype, hidden.device)
                buffer.copy_(hidden)
                captured.hidden = buffer
            self._captured = captured
        return self._captured

    def subset(self, nsamples: int) -> Calibrator:
        """A calibrator over the first ``nsamples`` windows, sharing this one's captured block-0 inputs
        (a view: nothing is recaptured or copied). Cheap screening trials take their statistics from it."""
        part = copy.copy(self)
        inputs = self.captured()
        part.input_ids = self.input_ids[:nsamples]
        part._captured = BlockInputs(inputs.hidden[:nsamples], inputs.block_kwargs)
        part._parent = self
        return part

    @torch.no_grad()
    def run(
        self,
        needs: frozenset[str] | set[str],
        visit: Callable[[BlockStats], None] | None = None,
        prune: Callable[[BlockStats], None] | None = None,
        desc: str = "calibration",
    ) -> None:
        """One pass over the blocks; ``prune`` (if given) edits a block's weights before its outputs are recomputed.

        Each block runs once while its statistics are measured; its outputs become the next block's
        inputs, except in a pruning pass, where the measuring forward keeps no outputs and the block
        runs a second time, pruned (the only way to get the pruned outputs).
        """
        if not runs_blocks(needs):
            self._weights_only(visit, prune, desc)
            return
        (self._parent or self).passes += 1
        inputs = self.captured()
        hidden = inputs.hidden
        for index in progress(range(len(self.blocks)), desc=desc, unit="block", enable=self.show):
            block = self.blocks[index]
            if index in inputs.restarts:  # a new stack (CLIP's text tower, LLaVA's language model) starts here
                restart = inputs.restarts[index]
                hidden = restart() if callable(restart) else restart
            kwargs = inputs.block_kwargs[index]
            with self.hold(index):
                stats, outputs = self._measure(index, block, hidden, kwargs, needs, keep_outputs=prune is None)
                if visit is not None:
                    visit(stats)  # a visitor may drop stats.outputs (the stash does): the pass keeps its own reference
                if prune is not None:
                    prune(stats)
                    self.mark_modified(index)
                del stats  # the statistics go before the second forward allocates its outputs
                if prune is not None:
                    outputs = self._forward(block, hidden, kwargs)
                hidden = outputs

    def _weights_only(
        self, visit: Callable[[BlockStats], None] | None, prune: Callable[[BlockStats], None] | None, desc: str
    ) -> None:
        """A pass without statistics: each block's weights go to ``visit`` and ``prune``, no activation is computed
        (nothing downstream reads one), and it does not count as a calibration pass."""
        for index in progress(range(len(self.blocks)), desc=desc, unit="block", enable=self.show):
            with self.hold(index):
                stats = self._block_stats(index)
                if visit is not None:
                    visit(stats)
                if prune is not None:
                    prune(stats)
                    self.mark_modified(index)

    def _block_stats(self, index: int) -> BlockStats:
        """Block ``index``'s matrices and (out, in) views of their current weights, before any statistic."""
        matrices = self.layout.block(index)
        return BlockStats(index, matrices, {m.name: self.adapter.get_weight(self.modules[m.name]) for m in matrices})

    def hold(self, index: int) -> contextlib.AbstractContextManager:
        """Keep block ``index`` in memory (a no-op unless the model is offloaded)."""
        return self.offload.hold(index) if self.offload is not None else contextlib.nullcontext()

    def mark_modified(self, index: int) -> None:
        """Block ``index``'s weights were changed while held: an offloaded model writes them back."""
        if self.offload is not None:
            self.offload.mark_dirty(index)

    def buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised activation tensor: anonymous memory, or a memory-mapped file in ``activation_dir``."""
        if self.activation_dir is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(int(size) for size in shape)
        fd, path = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=self.activation_dir)
        os.close(fd)
        try:
            storage = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)
        finally:
            os.unlink(path)  # the mapping keeps the data; the file disappears with the last reference
        return storage[:numel].view(*shape)

    def _forward(self, block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out: torch.Tensor | None = None
        for i in range(hidden.shape[0]):
            result = self.adapter.run_block(block, hidden[i : i + 1].to(self._dtype(block)), kwargs)
            out = self._output_buffer(out, hidden, result)
            out[i : i + 1] = result.to(out.dtype)
        assert out is not None
        return out

    def _output_buffer(self, out: torch.Tensor | None, hidden: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The block's output buffer, shaped by its first output (vision stages change width and resolution)."""
        if out is None:
            out = self.buffer((hidden.shape[0], *result.shape[1:]), hidden.dtype, hidden.device)
        return out

    @staticmethod
    def _dtype(block: torch.nn.Module) -> torch.dtype:
        return next(block.parameters()).dtype

    def _measure(
        self,
        index: int,
        block: torch.nn.Module,
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        needs: frozenset[str] | set[str],
        keep_outputs: bool = True,
    ) -> tuple[BlockStats, torch.Tensor | None]:
        """Run the block once over every sample with the statistics' hooks; return them and (if kept) the outputs."""
        stats = self._block_stats(index)
        matrices = stats.matrices
        want_norms, want_hessian, want_means = "input_norms" in needs, "hessian" in needs, "input_means" in needs
        # matrices fed the same tensor (q/k/v, gate/up) share one accumulator; the groups are decided
        # on the first sample while every input is kept alive, so no freed address is ever reused
        group_of: dict[str, int] = {}
        accumulators: list[_Accumulator] = []
        first_inputs: dict[tuple[int, tuple[int, ...]], int] = {}
        alive: list[torch.Tensor] = []
        seen: set[int] = set()
        handles = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple, _out: Any) -> None:
                x = args[0]
                rows = self.adapter.matrix_inputs(module, x)  # [tokens, in_features]; convolutions: im2col patches
                if name not in group_of:
                    key = (x.data_ptr(), tuple(x.shape), tuple(rows.shape))
                    if key not in first_inputs:
                        first_inputs[key] = len(accumulators)
                        accumulators.append(_Accumulator(rows.shape[-1], want_hessian, want_norms, x.device, want_means))
                        alive.append(x)
                    group_of[name] = first_inputs[key]
                group = group_of[name]
                if group not in seen:
                    seen.add(group)
                    accumulators[group].add(rows)

            return hook

        if want_norms or want_hessian or want_means:
            handles = [self.modules[m.name].register_forward_hook(make_hook(m.name)) for m in matrices]
        outputs: torch.Tensor | None = None
        dtype = self._dtype(block)
        try:
            for i in range(hidden.shape[0]):
                seen.clear()
                out = self.adapter.run_block(block, hidden[i : i + 1].to(dtype), kwargs)
                if keep_outputs:
                    outputs = self._output_buffer(outputs, hidden, out)
                    outputs[i : i + 1] = out.to(outputs.dtype)
                del out
                alive.clear()
        finally:
            for h in handles:
                h.remove()
        # one tensor per accumulator, shared by every matrix it feeds (scaled in place: no copy)
        norms = [acc.sq.sqrt().float() if acc.sq is not None else None for acc in accumulators]
        means = [(acc.sum / max(acc.tokens, 1)).float() if acc.sum is not None else None for acc in accumulators]
        hessians = [acc.xtx.mul_(2.0 / max(acc.tokens, 1)) if acc.xtx is not None else None for acc in accumulators]
        for name, group in group_of.items():
            stats.ntokens = accumulators[group].tokens
            if norms[group] is not None:
                stats.input_norms[name] = norms[group]
            if means[group] is not None:
                stats.input_means[name] = means[group]
            if hessians[group] is not None:
                stats.hessians[name] = hessians[group]
        if "block_inputs" in needs:
            stats.inputs = hidden
        if "block_outputs" in needs:
            stats.outputs = outputs if outputs is not None else self._forward(block, hidden, kwargs)
        return stats, outputs


def runs_blocks(needs: frozenset[str] | set[str]) -> bool:
    """Whether a pass asked for ``needs`` must run the blocks: only statistics come from activations. Without one,
    the propagation (dense or pruned inputs) changes nothing either, since no activation is read."""
    return any(need in STATISTICS for need in needs)
