"""The shared machinery of vision adapters: sequential units, their transitions, capture and im2col.

A vision model is pruned like a decoder: a list of blocks run one after another by the calibration
engine. Hierarchical models (Swin, ConvNeXt, EfficientNet) change width and resolution between
stages; the module that does it (Swin's patch merging, ConvNeXt's downsampling layer) is a
*transition* run at the start of the next block, and its matrices belong to that block. Each
adapter only says where its units are (``units``), how to get its task outputs (``predict``) and
which preprocessing its image processor uses; this base finds the prunable matrices (Linear and
non-grouped Conv2d, see strataprune/plugins/adapters/im2col.py), captures the inputs and call arguments of every unit with
forward pre-hooks (one full forward of the first sample, then the others stop at unit 0) and runs a
unit with its transitions.

Multi-stack models (CLIP, LLaVA) list several stacks' units in order, name each unit's stack and
give each later stack's first input as a restart (``BlockInputs.restarts``).

    strataprune run --model path/to/vit-folder --calibration photos --eval-data photos
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.images import ImageBatch, ImageSpec
from strataprune.contract.layout import BlockInputs, LoadedModel, MatrixInfo, ModelLayout
from strataprune.plugins.adapters.im2col import conv_matrix, conv_patches, prunable_conv

#: samples per forward when predicting (bounds activation memory of large evaluation sets)
PREDICT_BATCH = 8


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted inputs are recorded."""


@dataclass
class Unit:
    """One block: ``module`` at full name ``name``, preceded by ``transitions`` (full name, module)."""

    name: str
    module: nn.Module
    stack: str = "vision"
    transitions: list[tuple[str, nn.Module]] = field(default_factory=list)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or prunable_conv(module)


def first(out: Any) -> torch.Tensor:
    """A block's hidden-state output: the first element of a tuple, else the tensor itself."""
    return out[0] if isinstance(out, (tuple, list)) else out


def batched(inputs: dict[str, torch.Tensor], size: int = PREDICT_BATCH):  # type: ignore[no-untyped-def]
    """Split a dict of equally long tensors into dicts of at most ``size`` samples."""
    total = next(iter(inputs.values())).shape[0]
    for start in range(0, total, size):
        yield {k: v[start : start + size] for k, v in inputs.items()}


class VisionAdapter(ModelAdapter):
    """Base of the vision and multimodal adapters (one subclass per file in plugins/adapters/)."""

    task = "image-classification"
    #: transformers ``model_type`` values this adapter handles
    model_types: tuple[str, ...] = ()
    #: whether a later stack's input is computed from an earlier stack's output (LLaVA: vision -> projector ->
    #: language model); its restart is then recomputed from the already pruned earlier stacks
    chained_stacks = False
    #: preprocessing when the model folder has no preprocessor_config.json
    default_spec = ImageSpec()

    # ------------------------------------------------------------------ what a subclass provides
    def units(self, model: nn.Module) -> list[Unit]:
        raise NotImplementedError

    def model_class(self, config: Any) -> type:
        """The transformers class to load (default: the one the config's ``architectures`` names)."""
        import transformers

        for name in getattr(config, "architectures", None) or []:
            if hasattr(transformers, name):
                return getattr(transformers, name)
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification  # type: ignore[return-value]

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        return model(**inputs)

    def predict_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.forward(model, inputs).logits}

    # ------------------------------------------------------------------ loading and saving
    def matches(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    def spec_for(self, model: nn.Module, path: str | None) -> ImageSpec:
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", None)
        base = self.default_spec
        if isinstance(size, int) and size != base.size:  # tiny test configs: keep the resize/crop proportion
            resize = None if base.resize is None else round(size * base.resize / base.size)
            base = ImageSpec(size, resize, base.mean, base.std, base.resample)
        return ImageSpec.from_processor_config(path, base) if path else base

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        model = self.model_class(config).from_pretrained(path, dtype=dtype, **kwargs)
        return self.wrap(model, path, device)

    def wrap(self, model: nn.Module, path: str | None, device: torch.device | None = None, tokenizer: Any = None) -> LoadedModel:
        """A LoadedModel for an already built model (tests and benchmarks build tiny ones in memory)."""
        if device is not None:
            model.to(device)
        model.eval()
        return LoadedModel(model, tokenizer, self, path or type(model).__name__, self.describe(model), self.spec_for(model, path))

    def describe(self, model: nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        return {
            "architecture": type(model).__name__,
            "model_type": getattr(config, "model_type", type(model).__name__),
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": len(self.units(model)),
            "task": self.task,
        }

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        import json

        super().save(loaded, folder)
        if isinstance(loaded.processor, ImageSpec):
            (folder / "preprocessor_config.json").write_text(json.dumps(loaded.processor.to_processor_config(), indent=2))

    # ------------------------------------------------------------------ structure
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return [u.module for u in self.units(model)]

    def _named_matrices(self, model: nn.Module) -> list[tuple[int, str, str, nn.Module]]:
        out = []
        for index, unit in enumerate(self.units(model)):
            for prefix, module in [*unit.transitions, (unit.name, unit.module)]:
                # inside the unit: the name relative to it; in a transition: its last name part first
                head = "" if prefix == unit.name else prefix.rsplit(".", 1)[-1]
                for sub, child in module.named_modules():
                    if is_prunable(child):
                        full = f"{prefix}.{sub}" if sub else prefix
                        short = ".".join(part for part in (head, sub) if part) or full.rsplit(".", 1)[-1]
                        out.append((index, full, short, child))
        return out

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        return {full: module for _, full, _, module in self._named_matrices(model)}

    def layout(self, model: nn.Module) -> ModelLayout:
        units = self.units(model)
        matrices = tuple(
            MatrixInfo(full, index, short, tuple(self.get_weight(module).shape))  # type: ignore[arg-type]
            for index, full, short, module in self._named_matrices(model)
        )
        stacks = tuple(u.stack for u in units)
        return ModelLayout(matrices, len(units), stacks[0] if len(set(stacks)) == 1 else stacks)

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        return conv_matrix(module) if isinstance(module, nn.Conv2d) else module.weight.data

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.weight.data.copy_(weight.reshape(module.weight.shape))

    def matrix_inputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            return conv_patches(module, x)
        return x.reshape(-1, x.shape[-1])

    # ------------------------------------------------------------------ task data
    def encode(self, loaded: LoadedModel, batch: ImageBatch) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch.pixels.to(self._dtype(loaded.model))}

    @staticmethod
    def _dtype(model: nn.Module) -> torch.dtype:
        return next(model.parameters()).dtype

    @torch.no_grad()
    def predict(self, loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(loaded.model.parameters()).device
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in batched(inputs):
            out = self.predict_batch(loaded.model, {k: v.to(device) for k, v in chunk.items()})
            for key, value in out.items():
                parts.setdefault(key, []).append(value.float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    # ------------------------------------------------------------------ calibration
    def stack_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The slice of ``inputs`` each forward of ``capture`` feeds (all of it for single-stack models)."""
        return inputs

    def capture(self, model: nn.Module, input_ids: Any, batch_size: int = 1) -> BlockInputs:
        inputs: dict[str, torch.Tensor] = input_ids if isinstance(input_ids, dict) else {"pixel_values": input_ids}
        units = self.units(model)
        device = next(model.parameters()).device
        stacks = [u.stack for u in units]
        starts = [i for i, s in enumerate(stacks) if i == 0 or s != stacks[i - 1]]
        entries: dict[int, list[torch.Tensor]] = {i: [] for i in starts}
        calls: list[dict[str, Any]] = [{} for _ in units]
        samples = next(iter(inputs.values())).shape[0]

        def entry_module(index: int) -> nn.Module:
            unit = units[index]
            return unit.transitions[0][1] if unit.transitions else unit.module

        def record(index: int, slot: Any, stop: bool):  # type: ignore[no-untyped-def]
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                call = {"args": tuple(args[1:]), "kwargs": rest}
                if slot is None:
                    calls[index].setdefault("call", call)
                else:
                    calls[index].setdefault("pre", {}).setdefault(slot, call)
                if index in entries and module is entry_module(index) and (stop or len(entries[index]) == 0):
                    entries[index].append(state.detach())
                if stop and index == max(starts):
                    raise StopForward

            return hook

        with torch.no_grad():
            handles = []
            for index, unit in enumerate(units):
                for slot, (_, module) in enumerate(unit.transitions):
                    handles.append(module.register_forward_pre_hook(record(index, slot, False), with_kwargs=True))
                handles.append(unit.module.register_forward_pre_hook(record(index, None, False), with_kwargs=True))
            try:
                self.forward(model, {k: v[:1].to(device) for k, v in self.stack_inputs(model, inputs).items()})
            finally:
                for h in handles:
                    h.remove()
            handles = [entry_module(i).register_forward_pre_hook(record(i, "entry", True), with_kwargs=True) for i in starts]
            try:
                for start in range(1, samples, batch_size):
                    chunk = {k: v[start : start + batch_size].to(device) for k, v in self.stack_inputs(model, inputs).items()}
                    try:
                        self.forward(model, chunk)
                    except StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
        block_kwargs = []
        for index, unit in enumerate(units):
            pre = calls[index].get("pre", {})
            block_kwargs.append(
                {
                    **calls[index].get("call", {"args": (), "kwargs": {}}),
                    "transitions": [
                        (module, pre.get(slot, {"args": (), "kwargs": {}})) for slot, (_, module) in enumerate(unit.transitions)
                    ],
                }
            )
        hidden = {i: torch.cat(entries[i], dim=0) for i in starts}
        restarts: dict[int, Any] = {i: hidden[i] for i in starts if i != 0}
        if self.chained_stacks:
            restarts = {i: (lambda i=i: self.collect_entry(model, inputs, i)) for i in restarts}
        return BlockInputs(hidden[0], block_kwargs, restarts)

    @torch.no_grad()
    def collect_entry(self, model: nn.Module, inputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """The input of unit ``index`` for every sample, from the model as it is now (earlier stacks maybe pruned)."""
        unit = self.units(model)[index]
        module = unit.transitions[0][1] if unit.transitions else unit.module
        device = next(model.parameters()).device
        found: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            found.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise StopForward

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            samples = next(iter(inputs.values())).shape[0]
            for start in range(samples):
                try:
                    self.forward(model, {k: v[start : start + 1].to(device) for k, v in inputs.items()})
                except StopForward:
                    pass
        finally:
            handle.remove()
        return torch.cat(found, dim=0)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        for module, call in kwargs.get("transitions", ()):
            hidden = first(module(hidden, *call["args"], **call["kwargs"]))
        return first(block(hidden, *kwargs.get("args", ()), **kwargs.get("kwargs", {})))


def find_module_list(model: nn.Module, suffix: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList whose full name ends with ``suffix`` (e.g. 'encoder.layer'), shallowest first."""
    from strataprune.contract.errors import DataError

    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
    ]
    if not found:
        raise DataError(f"{type(model).__name__} has no '{suffix}' block list")
    return min(found, key=lambda item: item[0].count("."))


def sequential_units(model: nn.Module, suffix: str, stack: str = "vision") -> list[Unit]:
    """Units of a plain (isotropic) block stack such as ViT's 'encoder.layer'."""
    prefix, layers = find_module_list(model, suffix)
    return [Unit(f"{prefix}.{i}", layer, stack) for i, layer in enumerate(layers)]
