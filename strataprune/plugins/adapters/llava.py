"""LLaVA-style vision-language models from transformers (Liu et al. 2023, ``LlavaForConditionalGeneration``):
a vision tower, a projector and a decoder language model.

Which parts are pruned is a setting (``prune``, default ``[language]``: the language model only, as
ATP and LoSA prune LLaVA). Stacks, in order: ``vision`` (the vision tower's encoder layers up to the
one LLaVA reads its features from, ``vision_feature_layer``; later layers do not reach the language
model and are left alone), ``projector`` (the multi-modal projector MLP as one block) and ``language``
(the decoder layers). Each later stack's first input is recomputed from the model as it is when the
calibration engine reaches it, so the language model's statistics see a pruned vision tower
(``BlockInputs.restarts``). Embeddings, the vision tower's patch embedding and the LM head stay dense.

Data: every image crop followed by its caption (``[BOS] <image> x N caption``, N the number of image
features). Evaluation: top-1/top-5 agreement and KL divergence of the next-token distributions over
the caption positions, against the dense model (strataprune/evaluate/vision_metrics.py). No LLaVA weights install
offline: tests use tiny random configs.

    strataprune run --model path/to/llava-folder --calibration photos --eval-data photos --allocator atp
    strataprune run --model path/to/llava-folder --set "model.adapter_params.prune=[vision, projector, language]"
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

PARTS = ("vision", "projector", "language")


@dataclass
class LLaVAConfig:
    #: the parts pruned: any of vision, projector, language (default: the language model, as ATP and LoSA)
    prune: list[Literal["vision", "projector", "language"]] = field(default_factory=lambda: ["language"])

    def __post_init__(self) -> None:
        bad = [p for p in self.prune if p not in PARTS]
        if bad or not self.prune:
            raise ConfigError(f"adapter 'llava': prune={self.prune!r} must be a non-empty list of {', '.join(PARTS)}")


class LLaVA(VisionAdapter):
    name = "llava"
    version = "1"
    summary = "LLaVA-style vision-language models (vision tower, projector, language model; default: LM only)"
    task = "multimodal"
    Config = LLaVAConfig
    model_types = ("llava",)
    chained_stacks = True
    default_spec = ImageSpec(
        size=336, resize=336, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), resample=3
    )

    def model_class(self, config: Any) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        loaded = super().load(path, dtype=dtype, device=device, **kwargs)
        loaded.tokenizer = load_tokenizer(path)
        return loaded

    @staticmethod
    def _core(model: nn.Module) -> nn.Module:
        return getattr(model, "model", model)  # LlavaForConditionalGeneration.model is the LlavaModel

    def units(self, model: nn.Module) -> list[Unit]:
        core = self._core(model)
        units: list[Unit] = []
        if "vision" in self.config.prune:
            prefix, layers = find_module_list(core.vision_tower, "encoder.layers")
            head = [n for n, m in model.named_modules() if m is core.vision_tower][0]
            used = self._vision_layers_used(model.config, len(layers))
            units += [Unit(f"{head}.{prefix}.{i}", layers[i], "vision") for i in range(used)]
        if "projector" in self.config.prune:
            head = [n for n, m in model.named_modules() if m is core.multi_modal_projector][0]
            units.append(Unit(head, core.multi_modal_projector, "projector"))
        if "language" in self.config.prune:
            prefix, layers = find_module_list(core.language_model, "layers")
            head = [n for n, m in model.named_modules() if m is core.language_model][0]
            units += [Unit(f"{head}.{prefix}.{i}", layer, "language") for i, layer in enumerate(layers)]
        return units

    @staticmethod
    def _vision_layers_used(config: Any, total: int) -> int:
        layer = config.vision_feature_layer
        deepest = max(layer) if isinstance(layer, (list, tuple)) else layer
        return deepest if deepest >= 0 else total + 1 + deepest  # hidden_states[k] is the output of layer k-1

    def image_tokens(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)

    def encode(self, loaded: LoadedModel, batch: ImageBatch) -> dict[str, torch.Tensor]:
        tokenizer, model = loaded.tokenizer, loaded.model
        if tokenizer is None:
            raise ConfigError("adapter 'llava' needs the model's tokenizer (tokenizer files in the model folder)")
        prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + [
            model.config.image_token_index
        ] * self.image_tokens(model)
        captions = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in batch.captions]
        width = max(len(c) for c in captions)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [prefix + c + [pad] * (width - len(c)) for c in captions]
        return {"pixel_values": batch.pixels.to(self._dtype(model)), "input_ids": torch.tensor(rows, dtype=torch.long)}

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        return model(**inputs, use_cache=False)

    def predict_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the next-token distributions from the last image position on: each predicts a caption token
        last_image = int((inputs["input_ids"][0] == model.config.image_token_index).nonzero()[-1])
        return {"logits": self.forward(model, inputs).logits[:, last_image:-1]}
