"""Image data: the fixed split, preprocessing against a plain per-pixel computation, corrupt and empty sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from strataprune.cli import main
from strataprune.contract.errors import DataError
from strataprune.data.images import ImageSpec, crops, list_images, load_split, photo_files, standard_view, to_tensor


def test_calibration_and_evaluation_photos_never_overlap():
    train, test = load_split("photos", "train"), load_split("photos", "test")
    assert len(photo_files()) >= 12 and train.images and test.images
    assert not {im.path for im in train.images} & {im.path for im in test.images}
    assert len(train.images) + len(test.images) == len(photo_files())
    # crops come only from their own split's photos
    batch = crops(test, ImageSpec(size=32, resize=36), 20, seed=3, role="evaluation")
    assert batch.pixels.shape == (20, 3, 32, 32) and set(batch.source.tolist()) == set(range(len(test.images)))


def test_crops_are_seeded_and_the_first_view_is_the_processor_view():
    test = load_split("photos", "test")
    spec = ImageSpec(size=48, resize=56)
    a, b = crops(test, spec, 12, seed=1, role="e"), crops(test, spec, 12, seed=1, role="e")
    c = crops(test, spec, 12, seed=2, role="e")
    assert torch.equal(a.pixels, b.pixels) and not torch.equal(a.pixels, c.pixels)
    n = len(test.images)
    assert torch.equal(a.pixels[:n], c.pixels[:n])  # one standard view per image first, then random crops


def test_normalisation_matches_a_per_pixel_reference():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    spec = ImageSpec(size=16, resize=20, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    tensor = to_tensor(standard_view(image, spec), spec)
    # independent reference: resize the short side to 20 (70x50 -> 28x20), crop the centre 16x16, normalise each value
    resized = np.asarray(image.resize((28, 20), spec.resample), dtype=np.float64)
    top, left = (20 - 16) // 2, (28 - 16) // 2
    for channel in range(3):
        for y in (0, 7, 15):
            for x in (0, 9, 15):
                expected = (resized[top + y, left + x, channel] / 255 - spec.mean[channel]) / spec.std[channel]
                assert float(tensor[channel, y, x]) == pytest.approx(expected, abs=1e-5)


def test_processor_config_is_followed_and_written_back(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": true,'
        ' "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}'
    )
    spec = ImageSpec.from_processor_config(tmp_path)
    assert (spec.size, spec.resize, spec.mean, spec.resample) == (224, 256, (0.5, 0.5, 0.5), 2)
    assert ImageSpec.from_dict(spec.to_processor_config()) == spec
    vit_style = ImageSpec.from_dict({"size": {"height": 384, "width": 384}, "do_center_crop": False})
    assert (vit_style.size, vit_style.resize) == (384, None)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 20), (10, 200, 10)).save(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    images, skipped, description = list_images(str(tmp_path))
    assert [im.path.name for im in images] == ["a.png", "b.jpg"] and len(skipped) == 1
    assert description["skipped"] == 1 and description["skipped_files"][0].endswith("c.jpg")


def test_folder_without_readable_images_is_one_error_line(tmp_path, capsys):
    photos = tmp_path / "photos"  # beside the output: an output may never lie inside an input
    photos.mkdir()
    (photos / "notes.txt").write_text("no pictures here")
    (photos / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images .2 files tried"):
        list_images(str(photos))
    from vision_models import save_tiny_vision_model

    model = save_tiny_vision_model("vit", tmp_path / "model")
    assert main(["run", "--model", str(model), "--calibration", str(photos), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: image source") and "no readable images" in err[0]
    assert not (tmp_path / "out").exists()


def test_too_few_images_for_a_held_out_split(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "only.png")
    with pytest.raises(DataError, match="too few for a 'train' split"):
        load_split(str(tmp_path), "train")


def test_text_source_for_an_image_model_is_an_error(tmp_path, capsys, text_file):
    from vision_models import save_tiny_vision_model

    model = save_tiny_vision_model("vit", tmp_path / "model")
    assert main(["run", "--model", str(model), "--calibration", str(text_file), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "is not an image source; image models take 'photos' or a folder of images" in capsys.readouterr().err
