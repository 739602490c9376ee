"""CLIP-style dual encoders from transformers (Radford et al. 2021, ``CLIPModel``): both towers prunable.

Blocks: the vision tower's encoder layers (stack ``vision``), then the text tower's (stack
``text``); ``ModelLayout.stack`` names each block's stack, and one allocation covers both (the
parameter-weighted mean over all matrices of both towers is the target; depth allocators see the
blocks in this order). The text tower's first input is captured separately (a restart: the towers do
not feed each other). Prunable: q/k/v/out projections and fc1/fc2 of every layer; embeddings,
final LayerNorms and the two projections into the joint space stay dense. ``towers`` restricts
pruning to one tower.

Calibration and evaluation pair every image crop with its caption (``photos`` captions, or the class
folder / file name); captions are padded after their end-of-text token without an attention mask
(the causal mask keeps the pooled end-of-text state independent of the padding). Evaluation:
image->text and text->image retrieval agreement with the dense model, and the cosine of the image
and text embeddings to the dense ones (strataprune/evaluate/vision_metrics.py). No CLIP weights install offline: the
tests use tiny random configs.

    strataprune run --model path/to/clip-folder --calibration photos --eval-data photos --allocator owl
    strataprune run --model path/to/clip-folder --set model.adapter_params.towers=[text]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from strataprune.contract.errors import ConfigError
from strataprune.contract.images import ImageBatch, ImageSpec
from strataprune.contract.layout import LoadedModel
from strataprune.contract.tokenizer import load_tokenizer
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter, find_module_list

TOWERS = ("vision", "text")


@dataclass
class CLIPConfig:
    #: which towers are pruned (both by default: one allocation across the two stacks)
    towers: list[Literal["vision", "text"]] = field(default_factory=lambda: ["vision", "text"])

    def __post_init__(self) -> None:
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise ConfigError(f"adapter 'clip': towers={self.towers!r} must be a non-empty list of {', '.join(TOWERS)}")


class CLIP(VisionAdapter):
    name = "clip"
    version = "1"
    summary = "CLIP-style image-text models (vision and text towers, one allocation across both)"
    task = "multimodal"
    Config = CLIPConfig
    model_types = ("clip",)
    default_spec = ImageSpec(
        size=224, resize=224, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), resample=3
    )

    def model_class(self, config: Any) -> type:
        from transformers import CLIPModel

        return CLIPModel

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        loaded = super().load(path, dtype=dtype, device=device, **kwargs)
        loaded.tokenizer = load_tokenizer(path)
        return loaded

    def units(self, model: nn.Module) -> list[Unit]:
        units: list[Unit] = []
        for tower, suffix in (("vision", "vision_model.encoder.layers"), ("text", "text_model.encoder.layers")):
            if tower in self.config.towers:
                prefix, layers = find_module_list(model, suffix)
                units += [Unit(f"{prefix}.{i}", layer, tower) for i, layer in enumerate(layers)]
        return units

    def encode(self, loaded: LoadedModel, batch: ImageBatch) -> dict[str, torch.Tensor]:
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise ConfigError("adapter 'clip' needs the model's tokenizer (tokenizer files in the model folder)")
        limit = int(loaded.model.config.text_config.max_position_embeddings)
        pad = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        )  # EOS: the pooled position stays the first EOS
        ids = [tokenizer(c)["input_ids"][:limit] for c in batch.captions]
        if tokenizer.eos_token_id is not None:  # every caption ends with end-of-text (the pooled position)
            ids = [
                row if row and row[-1] == tokenizer.eos_token_id else (row[: limit - 1] + [tokenizer.eos_token_id]) for row in ids
            ]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], dtype=torch.long)
        return {"pixel_values": batch.pixels.to(self._dtype(loaded.model)), "input_ids": input_ids}

    def predict_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.forward(model, inputs)
        return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds}
