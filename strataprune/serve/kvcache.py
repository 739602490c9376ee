"""The KV cache of a batch of sequences of different lengths, left-padded to one width.

Every layer holds keys and values ``[rows, kv_heads, width, head_dim]``; row ``i`` keeps its
``lengths[i]`` real positions at the right end and ``pads[i]`` zero columns at the left, which the
attention mask hides. A decode step appends one column to every row at once (one batched forward),
each row with its own position id (its length), so a row's logits are those of the sequence alone:
masked columns get exactly zero attention weight. The cache is reshaped only when the membership
changes: a sequence whose prefill finished joins (the narrower side is padded), a finished one
leaves (its row is dropped and columns that every remaining row pads are cut off).
"""

from __future__ import annotations

from typing import Any

import torch


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(tensors):
        cache.update(keys, values, index)
    return cache


def cache_bytes(cache: Any) -> int:
    if cache is None:
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layer_tensors(cache) if k.numel())


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


class PaddedBatch:
    """Rows of sequences sharing one left-padded DynamicCache; ``keys`` name the rows."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.keys: list[Any] = []
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def __len__(self) -> int:
        return len(self.keys)

    def pads(self) -> list[int]:
        width = self.width
        return [width - length for length in self.lengths]

    def nbytes(self) -> int:
        return cache_bytes(self.cache)

    def add(self, key: Any, cache: Any, length: int) -> None:
        """Append a sequence whose own cache (batch 1) holds ``length`` positions."""
        if not self.keys:
            self.cache, self.keys, self.lengths = cache, [key], [length]
            return
        width = max(self.width, length)
        joined = []
        for (keys, values), (new_keys, new_values) in zip(layer_tensors(self.cache), layer_tensors(cache)):
            grow, pad = width - self.width, width - length
            joined.append(
                (
                    torch.cat([_left_pad(keys, grow), _left_pad(new_keys, pad)], dim=0),
                    torch.cat([_left_pad(values, grow), _left_pad(new_values, pad)], dim=0),
                )
            )
        self.cache = make_cache(joined)
        self.keys.append(key)
        self.lengths.append(length)

    def remove(self, key: Any) -> None:
        row = self.keys.index(key)
        old_width = self.width
        del self.keys[row], self.lengths[row]
        if not self.keys:
            self.cache = None
            return
        keep = torch.tensor([i for i in range(len(self.keys) + 1) if i != row])
        cut = old_width - self.width  # columns that every remaining row pads
        self.cache = make_cache(
            [
                (keys.index_select(0, keep)[:, :, cut:].contiguous(), values.index_select(0, keep)[:, :, cut:].contiguous())
                for keys, values in layer_tensors(self.cache)
            ]
        )

    def step_inputs(self, tokens: list[int], device: torch.device) -> dict[str, Any]:
        """The forward's keyword arguments for one decode step (``tokens``: the next input of each row)."""
        width = self.width
        mask = torch.ones(len(self.keys), width + 1, dtype=torch.long)
        for row, pad in enumerate(self.pads()):
            mask[row, :pad] = 0
        return {
            "input_ids": torch.tensor(tokens, dtype=torch.long, device=device)[:, None],
            "attention_mask": mask.to(device),
            "position_ids": torch.tensor(self.lengths, dtype=torch.long, device=device)[:, None],
            "past_key_values": self.cache,
        }

    def advance(self, cache: Any) -> None:
        """Take the cache a step returned (one more column on every row)."""
        self.cache = cache
        self.lengths = [length + 1 for length in self.lengths]
