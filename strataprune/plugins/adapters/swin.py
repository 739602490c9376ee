"""Swin Transformer image classifiers from transformers (Liu et al. 2021, ``SwinForImageClassification``).

Hierarchical: stages of shifted-window blocks with a patch-merging layer (a Linear 4C -> 2C) at the
end of every stage but the last. Blocks are the individual Swin layers (``swin.encoder.layers.S.blocks.B``);
a stage's patch merging is the *transition* into the next stage's first block and its ``reduction``
matrix is pruned with that block. Each block is called with its stage's input dimensions, captured
from the model's own forward. Patch embedding, final LayerNorm and classifier stay dense.
Preprocessing (microsoft/swin-*): resize to 224x224, ImageNet mean/std, bicubic.

    strataprune run --model path/to/swin-folder --calibration photos --eval-data photos --allocator owl
"""

from __future__ import annotations

from torch import nn

from strataprune.contract.images import ImageSpec
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, find_module_list


class Swin(VisionAdapter):
    name = "swin"
    version = "1"
    summary = "Swin Transformer image classifiers (blocks across stages, patch merging pruned)"
    task = "image-classification"
    model_types = ("swin",)
    default_spec = ImageSpec(size=224, resize=None, resample=3)

    def units(self, model: nn.Module) -> list[Unit]:
        prefix, stages = find_module_list(model, "encoder.layers")
        units: list[Unit] = []
        merge: list[tuple[str, nn.Module]] = []
        for s, stage in enumerate(stages):
            for b, block in enumerate(stage.blocks):
                units.append(Unit(f"{prefix}.{s}.blocks.{b}", block, "vision", merge if b == 0 else []))
            merge = [(f"{prefix}.{s}.downsample", stage.downsample)] if stage.downsample is not None else []
        if merge:  # a model whose last stage merges too: the merge runs after the last block
            raise NotImplementedError("a Swin whose last stage downsamples is not supported")
        return units
