"""Perplexity over non-overlapping windows, loss accumulated in fp32/fp64.

PPL = exp(sum of token NLL / number of predicted tokens); each window of T tokens predicts T-1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from strataprune.contract.progress import progress


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, desc: str = "perplexity", show: bool = True) -> dict[str, Any]:
    device = next(model.parameters()).device
    total_nll = 0.0
    tokens = 0
    for row in progress(windows, desc=desc, unit="window", enable=show):
        ids = row.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum").double())
        tokens += ids.shape[1] - 1
    ppl = math.exp(total_nll / tokens) if tokens else float("nan")
    return {"ppl": ppl, "tokens": tokens, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
