"""ONNX export of a decoder LM with an explicit KV cache, through ``torch.onnx.export(dynamo=True)``.

    export_decoder(model, "work/model.onnx", past=True)      # dynamic batch, length and past length
    export_decoder(model, "work/prefill.onnx", past=False, batch=1, length=128)   # fixed shapes

The graph: inputs ``input_ids`` [batch, tokens] (int64) and, with ``past``, ``past_key_i`` /
``past_value_i`` [batch, kv_heads, past, head_dim] for every layer i; outputs ``logits``
[batch, tokens, vocab] and ``present_key_i`` / ``present_value_i`` (past + tokens long). Positions
are computed inside the graph from the past length (``past + arange(tokens)``), so there is no
``position_ids`` input (DeepSparse aborts on graphs that have one) and no attention mask: a batch is
prompts of one length, without padding. Attention is exported in eager form (MatMul/Softmax), which
every engine here runs. Opset 18; ``ir_version`` can be lowered for engines that read older IR
(DeepSparse 1.8: IR <= 9; torch 2.13 writes 10).

Exporting is slow (torch.export traces every op: about a minute of CPU for SmolLM2), and a pruned
model has the graph of its dense twin with other weights. So the first export of an architecture is
kept as a template: its initializers are matched, by content, to the parameters they came from
(possibly transposed by constant folding); a later export of a model with the same config copies
the template and writes the new model's parameters into those initializers. Anything that cannot
be matched unambiguously falls back to a full export, and parity against PyTorch (always run before
timing) would catch a stale weight.

Why not optimum's exporter: its graphs have ``position_ids`` and ``attention_mask`` inputs, and the
same wrapper here serves ONNX Runtime (dynamic shapes) and DeepSparse (fixed shapes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.errors import DataError

OPSET = 18
#: above this, weights go to a separate ``.data`` file (protobuf's 2 GB limit)
INLINE_LIMIT = 1_800_000_000


class _DecoderWithCache(torch.nn.Module):
    """model(input_ids, *past) -> (logits, *present) with the cache as plain tensors."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        start = past[0].shape[2] if past else 0
        positions = (torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device) + start).unsqueeze(0)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_names(layers: int, prefix: str = "past") -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) read off a real forward pass (whatever the config calls them)."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=True)
    layers = out.past_key_values.layers
    return len(layers), int(layers[0].keys.shape[1]), int(layers[0].keys.shape[3])


#: (architecture, shapes) -> (template .onnx path, initializer -> [(parameter, transposed)], export info)
_TEMPLATES: dict[str, tuple[Path, dict[str, list[tuple[str, bool]]], dict[str, Any]]] = {}


_TEMPLATE_DIR: Path | None = None


def _keep_copy(path: Path) -> Path:
    """A private copy of a fresh export (callers rewrite theirs in place, e.g. INT4), removed at exit."""
    import atexit
    import shutil
    import tempfile

    global _TEMPLATE_DIR
    if _TEMPLATE_DIR is None:
        _TEMPLATE_DIR = Path(tempfile.mkdtemp(prefix="strataprune-onnx-templates-"))
        atexit.register(shutil.rmtree, _TEMPLATE_DIR, True)
    folder = Path(tempfile.mkdtemp(dir=_TEMPLATE_DIR))
    for item in artifact_files(path):
        shutil.copy2(item, folder / item.name)
    return folder / path.name


def _template_key(model: torch.nn.Module, **shape: Any) -> str:
    import json

    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
    }
    return json.dumps(
        {"config": config, "shape": shape, "dtype": str(next(model.parameters()).dtype)}, sort_keys=True, default=str
    )


def _digest(array: Any) -> str:
    import hashlib

    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha1(array.tobytes()).hexdigest() + str(array.shape) + str(array.dtype)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.state_dict(keep_vars=False).items()}


def _learn_template(model: torch.nn.Module, path: Path) -> dict[str, list[tuple[str, bool]]]:
    """Initializer name -> every (parameter, transposed) whose values it holds."""
    import onnx
    from onnx import numpy_helper

    digests: dict[str, list[tuple[str, bool]]] = {}
    for name, tensor in _params(model).items():
        array = tensor.float().numpy() if tensor.dtype == torch.float32 else tensor.cpu().numpy()
        digests.setdefault(_digest(array), []).append((name, False))
        if array.ndim == 2:
            digests.setdefault(_digest(array.T), []).append((name, True))
    graph = onnx.load(str(path)).graph
    return {init.name: digests[d] for init in graph.initializer if (d := _digest(numpy_helper.to_array(init))) in digests}


def _from_template(model: torch.nn.Module, key: str, path: Path, ir_version: int | None) -> dict[str, Any] | None:
    """Write ``path`` from the template of ``key`` with ``model``'s parameters; None when that is not safe."""
    entry = _TEMPLATES.get(key)
    if entry is None or not entry[0].exists():
        return None
    template, mapping, info = entry
    params = _params(model)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(template))
    for init in graph_model.graph.initializer:
        sources = mapping.get(init.name)
        if not sources:
            continue
        values = []
        for name, transposed in sources:
            if name not in params:
                return None
            array = params[name].float().numpy() if params[name].dtype == torch.float32 else params[name].cpu().numpy()
            values.append(array.T if transposed else array)
        if any(not np.array_equal(values[0], other) for other in values[1:]):
            return None  # the template shared one initializer for parameters that now differ
        init.CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(values[0]).astype(numpy_helper.to_array(init).dtype), init.name)
        )
    if ir_version is not None:
        graph_model.ir_version = ir_version
    save(graph_model, path)
    return {**info, "files": [str(f.name) for f in artifact_files(path)], "from_template": True}


def export_decoder(
    model: torch.nn.Module,
    path: str | Path,
    *,
    past: bool = True,
    batch: int | None = None,
    length: int | None = None,
    past_length: int | None = None,
    ir_version: int | None = None,
    reuse: bool = True,
) -> dict[str, Any]:
    """Export ``model`` (fp32, eager attention, on CPU) to ``path``; shapes fixed where given.

    Dynamic when ``batch``/``length``/``past_length`` are None; with all given, every shape is
    fixed (DeepSparse). Returns {"layers", "kv_heads", "head_dim", "inputs", "outputs", "files"}.
    """
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _template_key(model, past=past, batch=batch, length=length, past_length=past_length)
    if reuse:
        reused = _from_template(model, key, path, ir_version)
        if reused is not None:
            return reused
    layers, kv_heads, head_dim = kv_shape(model)
    fixed = batch is not None
    b = batch or 2
    t = length or 3
    p = past_length or 4
    ids = torch.zeros(b, t, dtype=torch.long)
    pasts = [torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * layers)] if past else []
    inputs = ["input_ids", *(cache_names(layers) if past else [])]
    outputs = ["logits", *cache_names(layers, "present")]
    dynamic: Any = None
    if not fixed:
        d_batch, d_len, d_past = Dim("batch"), Dim("tokens"), Dim("past")
        dynamic = ({0: d_batch, 1: d_len},) + ((tuple({0: d_batch, 2: d_past} for _ in pasts),) if pasts else ())
    size = sum(p_.numel() * p_.element_size() for p_ in model.parameters())
    wrapper = _DecoderWithCache(model, layers).eval()
    quiet = io.StringIO()
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, *pasts),
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=OPSET,
                external_data=size > INLINE_LIMIT,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; say which model and why
        raise DataError(f"ONNX export of {type(model).__name__} failed: {_summary(exc)}") from None
    info = {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "inputs": inputs,
        "outputs": outputs,
        "files": [str(f.name) for f in artifact_files(path)],
    }
    if reuse:
        _TEMPLATES[key] = (_keep_copy(path), _learn_template(model, path), info)
    if ir_version is not None:
        set_ir_version(path, ir_version)
    return info


def _summary(exc: BaseException) -> str:
    """The one line of torch.onnx's long export error that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1 :]
        if after:
            return after[0]
    return lines[0] if lines else type(exc).__name__


def set_ir_version(path: Path, version: int) -> None:
    """Rewrite the model's IR version (the ops are unchanged; older readers only check the number)."""
    import onnx

    model = onnx.load(str(path))
    model.ir_version = version
    save(model, path)


def save(model: Any, path: Path) -> None:
    """Save an ONNX model, weights inline unless they exceed protobuf's limit."""
    import onnx

    # sized per initializer: protobuf cannot even size (ByteSize) a whole message above 2 GB
    large = sum(init.ByteSize() for init in model.graph.initializer) > INLINE_LIMIT
    for stale in artifact_files(path)[1:]:
        stale.unlink()
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def artifact_files(path: Path) -> list[Path]:
    """The .onnx file and its external-data file, if any."""
    path = Path(path)
    return [f for f in (path, path.with_name(path.name + ".data")) if f.exists()]


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in artifact_files(path))
