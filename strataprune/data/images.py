"""Images -> pixel batches: image sources, the calibration/evaluation split, preprocessing, augmented crops.

A ``source`` is ``photos`` (the real photographs that ship inside installed wheels: scikit-image's
``skimage/data``, matplotlib's ``sample_data/grace_hopper.jpg``, scikit-learn's ``china.jpg`` and
``flower.jpg``; read in place, never copied) or a folder of images. A folder whose images sit in
sub-folders is ImageNet-style: the sub-folder name is the class label.

Split (fixed, by source image, so calibration and evaluation never share a photo): the readable
images are ordered by (class, file name); within each class the image at index i goes to
``test`` (evaluation) when i % 3 == 0 and to ``train`` (calibration) otherwise. Quantity comes
from augmented crops of each split's own images (seeded random-resized crops and flips), never
from the other split.

Preprocessing follows the model's image processor with PIL and numpy only (torchvision does not
import beside this torch): resize (shortest edge, or to a fixed size), center crop, scale to
[0, 1], normalise with the processor's mean and std, channels first. An unreadable file among
readable ones is skipped and counted (``skipped`` in the description, and in report.json); a
source with no readable image is a ``DataError``.

    strataprune run --model efficientnet-lite0 --calibration photos --eval-data photos
    strataprune run --model vit-folder/ --calibration my-images/ --eval-data my-images/
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strataprune.contract.errors import DataError
from strataprune.contract.images import ImageBatch, ImageSpec  # noqa: F401  (re-exported: the host's name for them)
from strataprune.data.textfile import is_image_source  # noqa: F401  (re-exported: image sources are told apart from text there)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
#: image index i (within its class) goes to evaluation when i % TEST_EVERY == 0, else to calibration
TEST_EVERY = 3
#: the built-in photo source: (package, path inside the package, caption). Natural photographs only
#: (no charts, text pages or synthetic test patterns). Order is the split order.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/astronaut.png", "an astronaut"),
    ("skimage", "data/chelsea.png", "a cat"),
    ("skimage", "data/coffee.png", "a cup of coffee"),
    ("skimage", "data/rocket.jpg", "a rocket"),
    ("skimage", "data/motorcycle_left.png", "a motorcycle"),
    ("skimage", "data/hubble_deep_field.jpg", "galaxies in space"),
    ("skimage", "data/camera.png", "a cameraman"),
    ("skimage", "data/coins.png", "coins"),
    ("skimage", "data/moon.png", "the surface of the moon"),
    ("skimage", "data/retina.jpg", "a retina"),
    ("skimage", "data/ihc.png", "a stained tissue sample"),
    ("skimage", "data/brick.png", "a brick wall"),
    ("skimage", "data/grass.png", "grass"),
    ("skimage", "data/gravel.png", "gravel"),
    ("skimage", "data/cell.png", "a cell"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a woman in uniform"),
    ("sklearn", "datasets/images/china.jpg", "a chinese temple"),
    ("sklearn", "datasets/images/flower.jpg", "a flower"),
)
PHOTO_PACKAGES = {"skimage": "scikit-image", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}
#: the default augmentation of calibration and evaluation crops
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class SourceImage:
    path: Path
    label: str | None  # class folder name (None for a flat folder)
    caption: str  # a short text describing the image (for image-text models)
    image: Any = None  # the decoded PIL image, RGB


@dataclass
class ImageSet:
    """The readable images of one split, and what was skipped."""

    images: list[SourceImage]
    description: dict[str, Any] = field(default_factory=dict)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def photo_files() -> list[tuple[Path, str]]:
    """The built-in photos that are installed here, in split order, with their captions."""
    out = []
    for package, relative, caption in PHOTOS:
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            out.append((root / relative, caption))
    return out


_decoded: dict[tuple[str, int, int], Any] = {}


def _decode(path: Path) -> Any:
    """The file as an RGB PIL image (kept per process, keyed by path, size and mtime: photos are read often)."""
    from PIL import Image

    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _decoded:
        with Image.open(path) as handle:
            handle.load()
            _decoded[key] = handle.convert("RGB")
        if len(_decoded) > 256:  # a large folder: keep memory bounded
            _decoded.pop(next(iter(_decoded)))
    return _decoded[key]


def list_images(source: str) -> tuple[list[SourceImage], list[str], dict[str, Any]]:
    """Every readable image of a source (decoded), the files that could not be read, and a description."""
    if source == "photos":
        found = photo_files()
        if not found:
            raise DataError("the 'photos' image source needs scikit-image's data folder: pip install --no-deps scikit-image")
        candidates = [(path, None, caption) for path, caption in found]
        description: dict[str, Any] = {
            "name": "photos",
            "packages": sorted({PHOTO_PACKAGES[p] for p, rel, _ in PHOTOS if any(str(f).endswith(rel) for f, _ in found)}),
        }
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder '{source}' does not exist; allowed: 'photos' or a folder of images")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"image folder '{source}' is empty; allowed: a folder of {', '.join(IMAGE_SUFFIXES)} files")
        candidates = []
        for path in files:
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else None
            caption = (label or path.stem).replace("_", " ").replace("-", " ")
            candidates.append((path, label, caption))
        description = {"name": "folder", "path": str(root.resolve())}
    readable: list[SourceImage] = []
    skipped: list[str] = []
    for path, label, caption in candidates:
        try:
            image = _decode(path)
        except Exception:  # noqa: BLE001 - any decoder failure means "not a readable image"
            skipped.append(str(path))
            continue
        readable.append(SourceImage(path, label, caption, image))
    if not readable:
        raise DataError(
            f"image source '{source}' has no readable images ({len(candidates)} files tried); "
            f"allowed: {', '.join(IMAGE_SUFFIXES)} files PIL can decode"
        )
    labels = sorted({im.label for im in readable if im.label is not None})
    description.update(readable=len(readable), skipped=len(skipped), skipped_files=skipped[:20], classes=labels or None)
    return readable, skipped, description


def split_images(images: list[SourceImage], split: str) -> list[SourceImage]:
    """The fixed split: within each class (by file order) index % TEST_EVERY == 0 is 'test', the rest 'train'."""
    if split not in ("train", "test", "validation", "all"):
        raise DataError(f"image split '{split}' is not one of: train, test, validation, all")
    if split == "all":
        return list(images)
    counters: dict[str | None, int] = {}
    out = []
    for im in sorted(images, key=lambda i: (i.label or "", 0)):  # stable: keeps file order within a class
        index = counters.get(im.label, 0)
        counters[im.label] = index + 1
        is_test = index % TEST_EVERY == 0
        # 'validation' (ATP's selection data) reads the calibration images with other crops
        if is_test == (split == "test"):
            out.append(im)
    return out


def load_split(source: str, split: str) -> ImageSet:
    images, _, description = list_images(source)
    chosen = split_images(images, split)
    if not chosen:
        raise DataError(
            f"image source '{source}' has {len(images)} readable image(s): too few for a '{split}' split "
            f"(every {TEST_EVERY}rd image is held out for evaluation, so at least 2 are needed)"
        )
    return ImageSet(chosen, {**description, "split": split, "images": len(chosen)})


def _resize_short(image: Any, short: int, resample: int) -> Any:
    width, height = image.size
    scale = short / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)


def _center_crop(image: Any, size: int) -> Any:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Any, spec: ImageSpec) -> torch.Tensor:
    """A PIL image of ``spec.size`` x ``spec.size`` -> normalised float32 [3, size, size]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def standard_view(image: Any, spec: ImageSpec) -> Any:
    """The image processor's own pipeline: resize (shortest edge or exact), then center crop."""
    if spec.resize is None:
        return image.resize((spec.size, spec.size), spec.resample)
    return _center_crop(_resize_short(image, max(spec.resize, spec.size), spec.resample), spec.size)


def random_view(image: Any, spec: ImageSpec, rng: random.Random) -> Any:
    """A random-resized crop (area share CROP_SCALE, aspect CROP_RATIO) and a coin-flip mirror, at ``spec.size``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    view = image.resize((spec.size, spec.size), spec.resample, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        from PIL import Image

        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def crops(images: ImageSet, spec: ImageSpec, count: int | None, seed: int, role: str) -> ImageBatch:
    """``count`` crops, round-robin over the images: the first crop of every image is the standard view,
    the rest are seeded random views. ``count=None`` gives one standard view per image."""
    rng = random.Random(seed)
    n = len(images.images) if count is None else count
    tensors, sources = [], []
    for k in range(n):
        index = k % len(images.images)
        image = images.images[index].image
        view = standard_view(image, spec) if k < len(images.images) else random_view(image, spec, rng)
        tensors.append(to_tensor(view, spec))
        sources.append(index)
    chosen = [images.images[i] for i in sources]
    return ImageBatch(
        torch.stack(tensors),
        torch.tensor(sources, dtype=torch.long),
        [im.label for im in chosen],
        [im.caption for im in chosen],
        {
            **images.description,
            "role": role,
            "crops": n,
            "seed": seed,
            "size": spec.size,
            "crop_rule": f"first crop of each image: processor view (resize {spec.resize}, center crop {spec.size}); "
            f"others: random-resized crop (area {CROP_SCALE}, aspect {CROP_RATIO[0]:.2f}-{CROP_RATIO[1]:.2f}) + mirror",
        },
    )
