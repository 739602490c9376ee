"""How far a pruned vision or multimodal model is from its dense twin, by task (algorithms of the metrics).

Distributions (image classifiers' class logits, LLaVA's next-token logits), per image i with dense
probabilities p_i and pruned q_i:

    top-1 agreement = mean_i [argmax q_i == argmax p_i]
    top-5 agreement = mean_i [argmax p_i in top5(q_i)]        (the dense prediction survives in the top 5)
    KL              = mean_i sum_c p_ic (log p_ic - log q_ic)  (nats; 0 iff identical)
    accuracy        = mean over labelled images of [argmax == label] (top-1) and [label in top5] (top-5)

Embeddings (DINOv2's pooled output, CLIP's image and text embeddings), e_i dense and f_i pruned:

    cosine          = mean_i cos(e_i, f_i)   (and the minimum)
    NN agreement    = mean_i [argmax_{j != i} cos(f_i, f_j) == argmax_{j != i} cos(e_i, e_j)]
    NN photo agreement = the same, comparing the *photos* the two nearest crops were cut from
    same-source@1   = mean_i [the nearest other crop is a crop of the same photo]   (each model alone)

Image-text retrieval (CLIP), over the evaluation crops and their distinct captions:

    image->text agreement = mean_i [argmax_t s'(i, t) == argmax_t s(i, t)]  (s = cosine similarity)
    text->image agreement = mean_t [argmax_i s'(i, t) == argmax_i s(i, t)]

``divergence`` is the single number a searching allocator (ATP) minimises: KL for distributions,
1 - cosine for embeddings, 1 - mean(image, text cosine) for CLIP.

    python -c "from strataprune.evaluate.vision_metrics import distribution_metrics"
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def distribution_metrics(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, float]:
    dense, sparse = dense.double().reshape(-1, dense.shape[-1]), sparse.double().reshape(-1, sparse.shape[-1])
    log_p, log_q = F.log_softmax(dense, -1), F.log_softmax(sparse, -1)
    k = min(5, dense.shape[-1])
    top = dense.argmax(-1)
    return {
        "top1_agreement": float((sparse.argmax(-1) == top).double().mean()),
        "top5_agreement": float((sparse.topk(k, -1).indices == top[:, None]).any(-1).double().mean()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "predictions": int(dense.shape[0]),
    }


def accuracy(logits: torch.Tensor, labels: list[int | None]) -> dict[str, Any] | None:
    """Top-1/top-5 accuracy over the images with a known label (None when none has one)."""
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        return None
    chosen = logits[keep]
    target = torch.tensor([labels[i] for i in keep])
    k = min(5, chosen.shape[-1])
    return {
        "top1": float((chosen.argmax(-1) == target).double().mean()),
        "top5": float((chosen.topk(k, -1).indices == target[:, None]).any(-1).double().mean()),
        "labelled": len(keep),
    }


def _nearest_other(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings.double(), dim=-1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-float("inf"))
    return sims.argmax(-1)


def same_source_at_1(embeddings: torch.Tensor, source: torch.Tensor) -> float | None:
    """Share of crops whose nearest other crop comes from the same photo (None if no photo has two crops)."""
    if embeddings.shape[0] < 2 or len(set(source.tolist())) == embeddings.shape[0]:
        return None
    return float((source[_nearest_other(embeddings)] == source).double().mean())


def embedding_metrics(dense: torch.Tensor, sparse: torch.Tensor, source: torch.Tensor | None = None) -> dict[str, float]:
    cos = F.cosine_similarity(dense.double(), sparse.double(), dim=-1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "embeddings": int(dense.shape[0])}
    if dense.shape[0] > 2:
        nn_dense, nn_sparse = _nearest_other(dense), _nearest_other(sparse)
        out["nn_agreement"] = float((nn_dense == nn_sparse).double().mean())
        if source is not None:
            out["nn_photo_agreement"] = float((source[nn_dense] == source[nn_sparse]).double().mean())
    return out


def retrieval_metrics(
    dense: dict[str, torch.Tensor], sparse: dict[str, torch.Tensor], text_of_image: torch.Tensor
) -> dict[str, float]:
    """CLIP: ``image_embeds`` [N, D] and ``text_embeds`` [T, D] of each model; ``text_of_image`` [N] the caption index."""

    def sims(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(out["image_embeds"].double(), dim=-1) @ F.normalize(out["text_embeds"].double(), dim=-1).T

    s_dense, s_sparse = sims(dense), sims(sparse)
    image_cos = F.cosine_similarity(dense["image_embeds"].double(), sparse["image_embeds"].double(), dim=-1)
    text_cos = F.cosine_similarity(dense["text_embeds"].double(), sparse["text_embeds"].double(), dim=-1)
    return {
        "image_to_text_agreement": float((s_dense.argmax(1) == s_sparse.argmax(1)).double().mean()),
        "text_to_image_agreement": float((s_dense.argmax(0) == s_sparse.argmax(0)).double().mean()),
        "image_cosine": float(image_cos.mean()),
        "text_cosine": float(text_cos.mean()),
        "images": int(s_dense.shape[0]),
        "texts": int(s_dense.shape[1]),
    }


def retrieval_accuracy(out: dict[str, torch.Tensor], text_of_image: torch.Tensor) -> float:
    """One model alone: share of images whose most similar caption is their own."""
    s = F.normalize(out["image_embeds"].double(), dim=-1) @ F.normalize(out["text_embeds"].double(), dim=-1).T
    return float((s.argmax(1) == text_of_image).double().mean())


def compare(dense: dict[str, torch.Tensor], sparse: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    """The comparison the outputs' keys call for, with its ``divergence``."""
    if "image_embeds" in dense:
        out: dict[str, Any] = retrieval_metrics(dense, sparse, extra["text_of_image"])
        out["divergence"] = 1.0 - (out["image_cosine"] + out["text_cosine"]) / 2
    elif "embeddings" in dense:
        out = embedding_metrics(dense["embeddings"], sparse["embeddings"], extra.get("source"))
        out["divergence"] = 1.0 - out["cosine"]
    else:
        out = distribution_metrics(dense["logits"], sparse["logits"])
        out["divergence"] = out["kl"]
    return out


def standalone(outputs: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    """What one model scores on its own: accuracy with labels, same-source retrieval, caption retrieval."""
    out: dict[str, Any] = {}
    if "logits" in outputs and outputs["logits"].dim() == 2 and extra.get("labels") is not None:
        acc = accuracy(outputs["logits"], extra["labels"])
        if acc is not None:
            out["accuracy"] = acc
    if "embeddings" in outputs and extra.get("source") is not None:
        value = same_source_at_1(outputs["embeddings"], extra["source"])
        if value is not None:
            out["same_source_at_1"] = value
    if "image_embeds" in outputs:
        out["caption_retrieval_top1"] = retrieval_accuracy(outputs, extra["text_of_image"])
    return out
