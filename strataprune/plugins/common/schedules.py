"""LoSA's outer loop (docs/algorithms.md §6.1): the sparsity and mean LoRA rank of each of its T rounds.

Shared by the ``losa`` recovery, which runs the rounds, and the ``rmi`` allocator, which offers them to users
who drive the rounds themselves (running the allocator at each s_t).
"""

from __future__ import annotations

from strataprune.contract.errors import ConfigError


def losa_schedule(target: float, rounds: int = 5) -> list[float]:
    """LoSA's cubic sparsity schedule s_t = S - S * (1 - t/T)^3 for t = 1..T (the last round hits S)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rmi: rounds={rounds!r} must be an integer >= 1")
    return [target - target * (1.0 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def losa_mean_ranks(rounds: int = 5, start: int = 6) -> list[int]:
    """LoSA's mean LoRA rank per round: start, start + 1, ... (linear, one per round)."""
    return [start + t for t in range(rounds)]
