"""ViT image classifiers from transformers (``ViTForImageClassification``; Dosovitskiy et al. 2021).

Blocks: ``vit.encoder.layer.N``; prunable: query/key/value/attention output and the two MLP
Linears of every block. The patch embedding (a 16x16 stride-16 convolution), the final LayerNorm
and the classifier stay dense, like a language model's embeddings and head. Evaluation: top-1/top-5
agreement with the dense model and KL divergence on held-out photos (strataprune/engine/tasks/images.py).
Preprocessing (google/vit-base-patch16-224): resize to 224x224, mean = std = 0.5.

    strataprune run --model path/to/vit-folder --calibration photos --eval-data photos --sparsity 0.5
"""

from __future__ import annotations

from typing import Any

from torch import nn

from strataprune.contract.images import ImageSpec
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, sequential_units


class ViT(VisionAdapter):
    name = "vit"
    version = "1"
    summary = "ViT image classifiers (ViTForImageClassification)"
    task = "image-classification"
    model_types = ("vit",)
    default_spec = ImageSpec(size=224, resize=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample=2)

    def matches(self, config: Any) -> bool:
        architectures = getattr(config, "architectures", None) or []
        return super().matches(config) and (not architectures or any(a.endswith("ForImageClassification") for a in architectures))

    def units(self, model: nn.Module) -> list[Unit]:
        return sequential_units(model, "encoder.layer")
