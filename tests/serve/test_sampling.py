"""Sampling: greedy is argmax, the nucleus is the smallest top set holding top_p, a seed fixes the draws."""

from __future__ import annotations

import torch

from strataprune.serve.sampling import SamplingParams, nucleus_probabilities, sample_token


def nucleus_by_loop(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The definition, one token at a time: most likely first, add tokens until their mass reaches top_p."""
    import math

    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, mass = [], 0.0
    for index in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.append(index)
        mass += probs[index]
    out = [probs[i] if i in kept else 0.0 for i in range(len(probs))]
    return [p / sum(out) for p in out]


def test_nucleus_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.05), (2.0, 0.999)]:
        logits = torch.randn(50, generator=generator) * 3
        got = nucleus_probabilities(logits, temperature, top_p)
        want = torch.tensor(nucleus_by_loop(logits.tolist(), temperature, top_p), dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-12), (temperature, top_p)
        assert (got > 0).sum() >= 1 and abs(float(got.sum()) - 1) < 1e-12


def test_greedy_and_seeds():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert sample_token(logits, greedy, greedy.generator()) == 1
    params = SamplingParams(max_tokens=1, temperature=1.5, top_p=0.95, seed=1234)
    first = [sample_token(logits, params, g) for g in [params.generator()] for _ in range(40)]
    again = [sample_token(logits, params, g) for g in [params.generator()] for _ in range(40)]
    assert first == again and len(set(first)) > 1  # the seed fixes the draws, and they do vary
    tiny_nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=5)
    assert {sample_token(logits, tiny_nucleus, tiny_nucleus.generator()) for _ in range(20)} == {1}
