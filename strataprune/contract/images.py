"""What a vision or multimodal adapter and the host exchange about images: the pixel spec and a batch of crops.

An adapter states how its model wants pixels (``ImageSpec``: crop size, resize, normalisation, read from
the model's ``preprocessor_config.json`` when it has one); the host's image pipeline
(``strataprune.data.images``) cuts crops to that spec and hands the adapter an ``ImageBatch`` to encode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strataprune.contract.errors import DataError

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch


@dataclass(frozen=True)
class ImageSpec:
    """How one model wants its pixels: the subset of a transformers image processor config we follow."""

    size: int = 224  # crop (model input) side
    resize: int | None = 256  # shortest edge before the center crop; None: resize straight to ``size``
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resample: int = 3  # PIL code: 2 bilinear, 3 bicubic

    @classmethod
    def from_processor_config(cls, path: str | Path, default: ImageSpec | None = None) -> ImageSpec:
        """Read ``preprocessor_config.json`` (transformers' format) if the folder has one, else ``default``."""
        base = default or cls()
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return base
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {file}: {exc}") from None
        return cls.from_dict(cfg, base)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], base: ImageSpec | None = None) -> ImageSpec:
        base = base or cls()
        size_cfg, crop_cfg = cfg.get("size"), cfg.get("crop_size")
        crop = _side(crop_cfg) if cfg.get("do_center_crop", crop_cfg is not None) and crop_cfg is not None else None
        if isinstance(size_cfg, dict) and "shortest_edge" in size_cfg:
            resize, size = int(size_cfg["shortest_edge"]), crop or int(size_cfg["shortest_edge"])
        elif size_cfg is not None:
            resize, size = (_side(size_cfg), crop) if crop else (None, _side(size_cfg))
        else:
            resize, size = base.resize, base.size
        mean = tuple(float(v) for v in cfg.get("image_mean", base.mean))
        std = tuple(float(v) for v in cfg.get("image_std", base.std))
        return cls(size=int(size), resize=resize, mean=mean, std=std, resample=int(cfg.get("resample", base.resample)))  # type: ignore[arg-type]

    def to_processor_config(self) -> dict[str, Any]:
        """The spec in transformers' ``preprocessor_config.json`` format (written next to a saved model)."""
        cfg: dict[str, Any] = {
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "resample": self.resample,
            "do_resize": True,
        }
        if self.resize is None:
            cfg.update(size={"height": self.size, "width": self.size}, do_center_crop=False)
        else:
            cfg.update(
                size={"shortest_edge": self.resize}, do_center_crop=True, crop_size={"height": self.size, "width": self.size}
            )
        return cfg


def _side(value: Any) -> int:
    if isinstance(value, dict):
        return int(value.get("height") or value.get("shortest_edge") or value.get("width"))
    return int(value)


@dataclass
class ImageBatch:
    """Pixel tensors of crops and where each came from."""

    pixels: torch.Tensor  # [N, 3, size, size] float32, normalised
    source: torch.Tensor  # [N] index of the source image each crop was cut from
    labels: list[str | None]  # class of each crop's source image
    captions: list[str]  # caption of each crop's source image
    description: dict[str, Any] = field(default_factory=dict)
