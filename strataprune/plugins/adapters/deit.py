"""DeiT image classifiers from transformers (Touvron et al. 2021): ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` (whose logits average the class and distillation heads).

Structurally a ViT with a distillation token: blocks ``deit.encoder.layer.N``, prunable Linears
inside them, patch embedding and heads dense. Preprocessing (facebook/deit-*): resize the shortest
edge to 256, center crop 224, ImageNet mean/std, bicubic.

    strataprune run --model path/to/deit-folder --calibration photos --eval-data photos --allocator alpha
"""

from __future__ import annotations

from torch import nn

from strataprune.contract.images import ImageSpec
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, sequential_units


class DeiT(VisionAdapter):
    name = "deit"
    version = "1"
    summary = "DeiT image classifiers (with or without the distillation head)"
    task = "image-classification"
    model_types = ("deit",)
    default_spec = ImageSpec(size=224, resize=256, resample=3)

    def units(self, model: nn.Module) -> list[Unit]:
        return sequential_units(model, "encoder.layer")
