"""ConvNeXt image classifiers from transformers (Liu et al. 2022, ``ConvNextForImageClassification``).

Blocks are the ConvNeXt layers of every stage (``convnext.encoder.stages.S.layers.L``): a depthwise
7x7 convolution (dense: see the depthwise rule in strataprune/plugins/adapters/im2col.py), LayerNorm and two pointwise
Linears (pruned). A stage's downsampling layer (LayerNorm + 2x2 stride-2 convolution) is the
transition into its first block and its convolution is pruned with that block through the im2col
view (weights (out, in*2*2), statistics from unfolded 2x2 patches). The stem convolution and the
classifier stay dense. Preprocessing (facebook/convnext-*): resize the shortest edge to 256
(224 / crop_pct 0.875), center crop 224, ImageNet mean/std, bicubic.

    strataprune run --model path/to/convnext-folder --calibration photos --eval-data photos --pruner sparsegpt
"""

from __future__ import annotations

from torch import nn

from strataprune.contract.images import ImageSpec
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, find_module_list


class ConvNeXt(VisionAdapter):
    name = "convnext"
    version = "1"
    summary = "ConvNeXt image classifiers (pointwise Linears and downsampling convs pruned)"
    task = "image-classification"
    model_types = ("convnext",)
    default_spec = ImageSpec(size=224, resize=256, resample=3)

    def units(self, model: nn.Module) -> list[Unit]:
        prefix, stages = find_module_list(model, "encoder.stages")
        units: list[Unit] = []
        for s, stage in enumerate(stages):
            down = stage.downsampling_layer
            name = f"{prefix}.{s}.downsampling_layer"
            # a ModuleList (transformers >= 4.57) is iterated by the stage, not called: its parts are the transitions
            parts = [(f"{name}.{j}", part) for j, part in enumerate(down)] if isinstance(down, nn.ModuleList) else [(name, down)]
            has_matrix = any(isinstance(m, nn.Conv2d) for m in down.modules())
            for i, layer in enumerate(stage.layers):
                transitions = parts if i == 0 and has_matrix else []
                units.append(Unit(f"{prefix}.{s}.layers.{i}", layer, "vision", transitions))
        return units
