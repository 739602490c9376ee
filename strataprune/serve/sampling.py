"""Turning one row of logits into the next token: greedy, temperature and nucleus (top-p) sampling.

Every request owns a ``torch.Generator`` seeded from its ``seed`` (or from the operating system's
randomness when it has none), so a fixed seed gives the same tokens whatever else the server is doing.
Nucleus sampling keeps the smallest set of most likely tokens whose probabilities add up to at least
``top_p`` (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration") and renormalises.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution that sampling draws from: softmax(logits / temperature) cut to the top-p nucleus."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
    keep_sorted = before < top_p  # the first token always stays (its predecessors hold 0)
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token for one sequence (``logits``: [vocab])."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = nucleus_probabilities(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
