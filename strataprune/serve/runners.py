"""How the scheduler drives a prepared model: batched (PyTorch models, the native decoder) or one at a time.

:class:`NativeRunner` runs ``sparse-cpu`` models on the native C++ decoder (:mod:`strataprune.kernels.decoder`):
every running sequence owns one of the decoder's KV-cache slots, a prompt chunk is one ``prefill`` into its slot
and a decode step is one ``decode`` over all slots (the weights stream from memory once per step, whatever the batch).
:class:`BatchedRunner` runs any backend whose prepared model is a transformers module in PyTorch
(the ``torch`` backend and its subclasses, e.g. ``sparse-cpu:engine=eager``): prompts are prefilled in chunks
into a cache of their own, then the sequence joins a :class:`~strataprune.serve.kvcache.PaddedBatch`
and every decode step is one forward over all joined sequences. :class:`SequentialRunner` runs any
other engine through the Backend contract's ``prefill``/``decode`` (batch 1): a fixed-shape or
out-of-process engine cannot grow or shrink its batch between steps, so it serves one sequence at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strataprune.contract.backend import CompiledModel
from strataprune.serve.kvcache import PaddedBatch, cache_bytes


def can_batch(compiled: Any) -> bool:
    """Whether a prepared model is a transformers model driven in PyTorch (``model``, ``forward``, ``device``), as
    the ``torch`` backend and its subclasses prepare it: only such a model takes a padded batch cache."""
    model = getattr(compiled, "model", None)
    return (
        isinstance(model, torch.nn.Module)
        and hasattr(model, "config")
        and callable(getattr(compiled, "forward", None))
        and getattr(compiled, "device", None) is not None
    )


class BatchedRunner:
    batching = True

    def __init__(self, compiled: Any, prefill_chunk: int) -> None:
        self.compiled = compiled
        self.forward = compiled.forward
        self.device = compiled.device
        self.prefill_chunk = prefill_chunk
        self.batch = PaddedBatch()
        self.prefilling: dict[Any, Any] = {}  # key -> its own DynamicCache while its prompt is prefilled

    def _logits(self, out: Any) -> torch.Tensor:
        return out.logits[:, -1, :].float().cpu()

    def prefill(self, key: Any, ids: list[int]) -> torch.Tensor:
        """Run the next chunk of a prompt; the logits [vocab] after its last token."""
        from transformers import DynamicCache

        cache = self.prefilling.get(key)
        if cache is None:
            cache = DynamicCache()
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.forward(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.prefilling[key] = out.past_key_values
        return self._logits(out)[0]

    def join(self, key: Any, length: int) -> None:
        """A fully prefilled sequence enters the decode batch."""
        self.batch.add(key, self.prefilling.pop(key), length)

    def decode(self, inputs: dict[Any, int]) -> dict[Any, torch.Tensor]:
        """One decode step of every joined sequence (``inputs``: key -> last token); key -> logits [vocab]."""
        tokens = [inputs[key] for key in self.batch.keys]
        with torch.inference_mode():
            out = self.forward(**self.batch.step_inputs(tokens, self.device), use_cache=True, logits_to_keep=1)
        self.batch.advance(out.past_key_values)
        logits = self._logits(out)
        return {key: logits[row] for row, key in enumerate(self.batch.keys)}

    def release(self, key: Any) -> None:
        self.prefilling.pop(key, None)
        if key in self.batch.keys:
            self.batch.remove(key)

    def kv_bytes(self) -> int:
        return self.batch.nbytes() + sum(cache_bytes(c) for c in self.prefilling.values())


class SequentialRunner:
    """One sequence at a time through ``CompiledModel.prefill``/``decode`` (the whole prompt in one call)."""

    batching = False

    def __init__(self, compiled: CompiledModel) -> None:
        self.compiled = compiled
        self.prefill_chunk = None
        self.states: dict[Any, Any] = {}
        self.lengths: dict[Any, int] = {}

    def prefill(self, key: Any, ids: list[int]) -> torch.Tensor:
        logits, state = self.compiled.prefill(np.asarray([ids], dtype=np.int64))
        self.states[key] = state
        self.lengths[key] = len(ids)
        return torch.from_numpy(np.asarray(logits)[0, -1].astype(np.float32))

    def join(self, key: Any, length: int) -> None:
        self.lengths[key] = length

    def decode(self, inputs: dict[Any, int]) -> dict[Any, torch.Tensor]:
        result = {}
        for key, token in inputs.items():
            logits, self.states[key] = self.compiled.decode(np.asarray([[token]], dtype=np.int64), self.states[key])
            self.lengths[key] += 1
            result[key] = torch.from_numpy(np.asarray(logits)[0, -1].astype(np.float32))
        return result

    def release(self, key: Any) -> None:
        self.states.pop(key, None)
        self.lengths.pop(key, None)

    def kv_bytes(self) -> int:
        total = 0
        for state in self.states.values():  # engines keep their cache as arrays or tensors (or out of process: 0)
            for item in state if isinstance(state, (list, tuple)) else [state]:
                total += int(getattr(item, "nbytes", 0) or 0)
        return total


class NativeRunner:
    """Scheduler sequences on the slots of a :class:`~strataprune.kernels.decoder.NativeDecoder`.

    A sequence takes a free slot (reset) at its first prompt chunk and gives it back (reset) when it finishes, fails
    or its client goes away; ``max_slots`` caps the running sequences (the scheduler queues the rest). Each slot
    reserves ``max_context`` positions when first used, so ``kv_bytes`` counts the reservation of every occupied slot.
    """

    batching = True

    def __init__(self, compiled: Any, max_slots: int, max_context: int, prefill_chunk: int) -> None:
        from strataprune.contract.errors import ConfigError
        from strataprune.kernels.decoder import NativeDecoder

        self.compiled = compiled
        self.prefill_chunk = prefill_chunk
        if compiled.engine is not None:  # the backend's own engine, sized for one benchmark batch: replaced
            compiled.engine.close()
            compiled.engine = None
        try:
            self.engine = NativeDecoder(
                compiled.model,
                max_slots=max_slots,
                max_context=max_context,
                lm_head=compiled.lm_head,
                prefill_chunk=prefill_chunk,
            )
        except ConfigError as exc:
            compiled.close()
            raise ConfigError(f"{exc} (the server's slots are --max-running {max_slots})") from None
        compiled.engine = self.engine  # closed with the prepared model
        self.max_slots = max_slots
        self.max_context = self.engine.max_context
        self.slot_bytes = self.engine.kv_bytes // max_slots
        self.free = list(range(max_slots - 1, -1, -1))  # taken from the end: slot 0 first
        self.slots: dict[Any, int] = {}

    def prefill(self, key: Any, ids: list[int]) -> torch.Tensor:
        """Append the next chunk of a prompt to the sequence's slot (a free one, reset, at its first chunk)."""
        slot = self.slots.get(key)
        if slot is None:
            if not self.free:
                raise RuntimeError(f"all {self.max_slots} native decoder slots are taken")
            slot = self.free.pop()
            self.engine.reset(slot)
            self.slots[key] = slot
        return self.engine.prefill(slot, ids)

    def join(self, key: Any, length: int) -> None:
        """Nothing moves: the prompt is already in the slot that the decode steps use."""

    def decode(self, inputs: dict[Any, int]) -> dict[Any, torch.Tensor]:
        """One ``decode`` call for every joined sequence (``inputs``: key -> last token); key -> logits [vocab]."""
        keys = list(inputs)
        logits = self.engine.decode([self.slots[key] for key in keys], [inputs[key] for key in keys])
        return {key: logits[row] for row, key in enumerate(keys)}

    def release(self, key: Any) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.engine.reset(slot)
            self.free.append(slot)

    def kv_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)
