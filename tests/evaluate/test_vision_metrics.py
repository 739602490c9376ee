"""Agreement, KL, cosine and retrieval metrics against plain loops written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from strataprune.evaluate.vision_metrics import (
    accuracy,
    compare,
    distribution_metrics,
    embedding_metrics,
    retrieval_metrics,
    same_source_at_1,
)


def test_distribution_metrics_match_a_loop():
    torch.manual_seed(0)
    dense, sparse = torch.randn(20, 7), torch.randn(20, 7)
    sparse[:10] = dense[:10] + 0.01 * torch.randn(10, 7)
    out = distribution_metrics(dense, sparse)
    top1 = top5 = kl = 0.0
    for d, s in zip(dense.tolist(), sparse.tolist()):
        zd, zs = sum(math.exp(v) for v in d), sum(math.exp(v) for v in s)
        p, q = [math.exp(v) / zd for v in d], [math.exp(v) / zs for v in s]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 20
        best = max(range(7), key=lambda c: d[c])
        top1 += (max(range(7), key=lambda c: s[c]) == best) / 20
        top5 += (best in sorted(range(7), key=lambda c: -s[c])[:5]) / 20
    assert out["kl"] == pytest.approx(kl, rel=1e-9) and out["top1_agreement"] == pytest.approx(top1)
    assert out["top5_agreement"] == pytest.approx(top5) and out["top1_agreement"] >= 0.5
    same = distribution_metrics(dense, dense.clone())
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0


def test_accuracy_counts_only_labelled_images():
    logits = torch.tensor([[3.0, 1, 0], [0, 3, 1], [0, 1, 3], [3, 0, 1]])
    acc = accuracy(logits, [0, 2, None, 1])
    assert acc == {"top1": pytest.approx(1 / 3), "top5": 1.0, "labelled": 3}
    assert accuracy(logits, [None] * 4) is None


def test_embedding_metrics_and_nearest_neighbours():
    dense = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    sparse = torch.tensor([[1.0, 0.05], [0.9, 0.2], [0.05, 1], [0.8, 0.3]])  # the last one drifts towards the first pair
    out = embedding_metrics(dense, sparse)
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(dense, sparse)]
    assert out["cosine"] == pytest.approx(sum(cos) / 4) and out["cosine_min"] == pytest.approx(min(cos))

    # dense neighbours: 0<->1, 2<->3; sparse: 3's nearest other is 1 (and 1's is 3 or 0)
    def nearest(e, i):  # type: ignore[no-untyped-def]
        sims = [(float(torch.nn.functional.cosine_similarity(e[i], e[j], dim=0)), j) for j in range(4) if j != i]
        return max(sims)[1]

    expected = sum(nearest(dense, i) == nearest(sparse, i) for i in range(4)) / 4
    assert out["nn_agreement"] == pytest.approx(expected) and expected < 1
    source = torch.tensor([0, 0, 1, 1])
    by_photo = embedding_metrics(dense, sparse, source)["nn_photo_agreement"]
    assert by_photo == pytest.approx(sum(int(source[nearest(dense, i)] == source[nearest(sparse, i)]) for i in range(4)) / 4)
    assert same_source_at_1(dense, torch.tensor([0, 0, 1, 1])) == 1.0
    assert same_source_at_1(dense, torch.tensor([0, 1, 2, 3])) is None


def test_retrieval_agreement_and_divergence():
    torch.manual_seed(2)
    dense = {"image_embeds": torch.randn(6, 4), "text_embeds": torch.randn(3, 4)}
    sparse = {k: v.clone() for k, v in dense.items()}
    same = retrieval_metrics(dense, sparse, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert (
        same["image_to_text_agreement"] == 1.0
        and same["text_to_image_agreement"] == 1.0
        and same["image_cosine"] == pytest.approx(1.0)
    )
    sparse["text_embeds"] = -sparse["text_embeds"]  # every image now prefers its least similar text
    flipped = compare(dense, sparse, {"text_of_image": torch.tensor([0, 1, 2, 0, 1, 2])})
    assert flipped["image_to_text_agreement"] < 1.0 and flipped["divergence"] == pytest.approx(1 - (1 + -1) / 2)
