"""Decoder-only language models from transformers: Llama, SmolLM2, Mistral, Qwen2, Gemma-3, OPT, GPT-2 ...

The block stack is found from the model's structure, not from a hard-coded ``model.model.layers``:
it is the ``nn.ModuleList`` of identical modules whose length is the config's layer count
(falling back to the longest such list). Prunable matrices are the ``nn.Linear`` (and GPT-2's
transposed ``Conv1D``) modules inside the blocks; embeddings and ``lm_head`` sit outside the
blocks and stay dense.

Block inputs are captured with forward pre-hooks: one full forward of the first sample records the
extra arguments every block is called with (masks and rotary embeddings differ per block on
models with sliding-window layers such as Gemma-3), then the remaining samples stop at block 0.

    strataprune run --model path/to/llama-folder
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.errors import DataError
from strataprune.contract.layout import BlockInputs, LoadedModel, MatrixInfo, ModelLayout
from strataprune.contract.tokenizer import load_tokenizer


@functools.cache
def _conv1d() -> tuple[type, ...]:
    """GPT-2 stores its projections as Conv1D with (in, out) weights. Imported on first use, so that
    registering the plugins (and checking a command line) does not import transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: families whose evaluation windows each need a BOS token (Gemma: ppl 41 without, 17 with)
BOS_PER_WINDOW = ("gemma", "gemma2", "gemma3", "gemma3_text")


class _StopForward(Exception):
    pass


def _num_layers(config: Any) -> int | None:
    for source in (config, getattr(config, "text_config", None)):
        for key in _LAYER_COUNT_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int):
                return value
    return None


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of identical blocks: the one matching the layer count, else the longest."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child) for child in module}
            has_linear = any(isinstance(m, (nn.Linear, *_conv1d())) for m in module[0].modules())
            if len(classes) == 1 and has_linear:
                candidates.append((name, module))
    if not candidates:
        raise DataError(f"no stack of transformer blocks found in {type(model).__name__}")
    wanted = _num_layers(getattr(model, "config", None))
    exact = [c for c in candidates if len(c[1]) == wanted]
    return max(exact or candidates, key=lambda c: len(c[1]))


class DecoderLLM(ModelAdapter):
    name = "decoder_llm"
    version = "1"
    summary = "decoder-only LLMs from transformers (Llama, Qwen2, Mistral, Gemma-3, OPT, GPT-2 ...)"
    task = "causal-lm"

    def matches(self, config: Any) -> bool:
        architectures = getattr(config, "architectures", None) or []
        if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
            return True
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        if "device_map" not in kwargs:  # with a device_map, accelerate has already placed every block
            model.to(device)
        model.eval()
        model.config.use_cache = False
        tokenizer = load_tokenizer(path)
        return LoadedModel(model, tokenizer, self, path, self.describe(model))

    def load_empty(self, path: str, *, dtype: torch.dtype) -> LoadedModel:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        model.config.use_cache = False
        return LoadedModel(model, load_tokenizer(path), self, path, self.describe(model))

    def describe(self, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "architecture": type(model).__name__,
            "model_type": config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": len(self.blocks(model)),
        }

    def bos_per_window(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", "") in BOS_PER_WINDOW

    # ------------------------------------------------------------------ structure
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return find_block_list(model)[1]

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        prefix, blocks = find_block_list(model)
        out: dict[str, nn.Module] = {}
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                if isinstance(module, (nn.Linear, *_conv1d())):
                    out[f"{prefix}.{index}.{name}"] = module
        return out

    def layout(self, model: nn.Module) -> ModelLayout:
        prefix, blocks = find_block_list(model)
        matrices = []
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                if isinstance(module, (nn.Linear, *_conv1d())):
                    shape = tuple(self.get_weight(module).shape)
                    matrices.append(MatrixInfo(f"{prefix}.{index}.{name}", index, name, shape))  # type: ignore[arg-type]
        return ModelLayout(tuple(matrices), len(blocks))

    def as_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if isinstance(module, _conv1d()) else weight

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        target = module.weight.data
        target.copy_(weight.t() if isinstance(module, _conv1d()) else weight)

    # ------------------------------------------------------------------ calibration
    def capture(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> BlockInputs:
        blocks = self.blocks(model)
        device = next(model.parameters()).device
        hidden: list[torch.Tensor] = []
        block_kwargs: list[dict[str, Any]] = [{} for _ in blocks]

        def record(index: int, stop: bool):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state = args[0] if args else kwargs["hidden_states"]
                rest = dict(kwargs)
                rest.pop("hidden_states", None)
                if block_kwargs[index] == {} or not stop:
                    block_kwargs[index] = {"args": tuple(args[1:]), "kwargs": rest}
                if index == 0:
                    hidden.append(state.detach())
                if stop:
                    raise _StopForward

            return hook

        with torch.no_grad():
            # first sample: a full forward records every block's call arguments
            handles = [b.register_forward_pre_hook(record(i, False), with_kwargs=True) for i, b in enumerate(blocks)]
            try:
                model(input_ids[:1].to(device), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            handle = blocks[0].register_forward_pre_hook(record(0, True), with_kwargs=True)
            try:
                for start in range(1, input_ids.shape[0], batch_size):
                    try:
                        model(input_ids[start : start + batch_size].to(device), use_cache=False)
                    except _StopForward:
                        pass
            finally:
                handle.remove()
        return BlockInputs(torch.cat(hidden, dim=0), block_kwargs)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, *kwargs.get("args", ()), **kwargs.get("kwargs", {}))
        return out[0] if isinstance(out, (tuple, list)) else out
