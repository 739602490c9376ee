"""Vision and multimodal adapters on tiny random configs: contract, allocate -> prune -> evaluate -> save -> reload."""

from __future__ import annotations

import json

import pytest
import torch
from vision_models import ADAPTER_OF, VISION_KINDS, save_tiny_vision_model, tiny_vision_model

from strataprune.cli import main
from strataprune.contract.registry import get_registry
from strataprune.data.images import crops, load_split
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict
from strataprune.models.loading import load_model


def _adapter(kind: str):  # type: ignore[no-untyped-def]
    params = {"prune": ["vision", "projector", "language"]} if kind == "llava" else None
    return get_registry().create("adapter", ADAPTER_OF[kind], params)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_contract_run_block_reproduces_every_stack(kind):
    model, tokenizer = tiny_vision_model(kind)
    adapter = _adapter(kind)
    assert adapter.matches(model.config)
    assert [info.name for info in get_registry().find("adapter", lambda cls: cls().matches(model.config))] == [ADAPTER_OF[kind]]
    loaded = adapter.wrap(model, None, tokenizer=tokenizer)
    layout, modules = adapter.layout(model), adapter.prunable(model)
    assert list(modules) == layout.names and layout.num_blocks == len(adapter.blocks(model))
    for info in layout.matrices:
        weight = adapter.get_weight(modules[info.name])
        assert tuple(weight.shape) == info.shape and weight.dim() == 2
        original = weight.clone()
        adapter.set_weight(modules[info.name], original * 2)
        assert torch.equal(adapter.get_weight(modules[info.name]), original * 2)
        adapter.set_weight(modules[info.name], original)
    inputs = adapter.encode(loaded, crops(load_split("photos", "train"), loaded.processor, 3, 0, "calibration"))
    captured = adapter.capture(model, inputs)
    blocks = adapter.blocks(model)
    stacks = [layout.stack_of(b) for b in range(layout.num_blocks)]
    ends = [b for b in range(len(blocks)) if b == len(blocks) - 1 or stacks[b + 1] != stacks[b]]
    for sample in range(3):
        reference = {}

        def keep(b: int):  # type: ignore[no-untyped-def]
            def hook(_m, _a, out) -> None:  # type: ignore[no-untyped-def]
                reference.setdefault(b, out[0] if isinstance(out, tuple) else out)

            return hook

        handles = [blocks[b].register_forward_hook(keep(b)) for b in ends]
        with torch.no_grad():
            adapter.forward(model, {k: v[sample : sample + 1] for k, v in inputs.items()})
        for h in handles:
            h.remove()
        hidden = captured.hidden[sample : sample + 1]
        for b, block in enumerate(blocks):
            if b in captured.restarts:
                restart = captured.restarts[b]
                hidden = (restart() if callable(restart) else restart)[sample : sample + 1]
            with torch.no_grad():
                hidden = adapter.run_block(block, hidden, captured.block_kwargs[b])
            if b in ends:
                assert torch.allclose(hidden, reference[b], atol=1e-5), f"{kind}: stack '{stacks[b]}' not reproduced at block {b}"


def test_stacks_are_named_per_block():
    layout = _adapter("clip").layout(tiny_vision_model("clip")[0])
    assert (
        layout.stacks == ["vision", "text"]
        and layout.stack_of(0) == "vision"
        and layout.stack_of(layout.num_blocks - 1) == "text"
    )
    llava = tiny_vision_model("llava")[0]
    default = get_registry().create("adapter", "llava").layout(llava)
    assert default.stacks == ["language"] and all(".language_model." in n for n in default.names)  # the LLM only, by default
    full = _adapter("llava").layout(llava)
    assert full.stacks == ["vision", "projector", "language"]
    # LLaVA reads features from layer -2: the last vision layer never reaches the LLM and is not pruned
    assert not any("encoder.layers.1." in n for n in full.names) and any("encoder.layers.0." in n for n in full.names)


def test_depthwise_convs_stay_dense_and_downsampling_convs_are_matrices():
    layout = _adapter("convnext").layout(tiny_vision_model("convnext")[0])
    assert not any("dwconv" in n for n in layout.names)
    down = [m for m in layout.matrices if "downsampling_layer" in m.name]
    assert len(down) == 1 and down[0].shape == (32, 16 * 2 * 2) and down[0].block == 2
    swin = _adapter("swin").layout(tiny_vision_model("swin")[0])
    merge = [m for m in swin.matrices if m.name.endswith("downsample.reduction")]
    assert len(merge) == 1 and merge[0].block == 2 and merge[0].shape == (32, 64)


def _recipe(folder, out=None, **over):  # type: ignore[no-untyped-def]
    data = {
        "model": str(folder),
        "sparsity": 0.5,
        "pruner": "wanda",
        "calibration": {"source": "photos", "nsamples": 6},
        "evaluation": {"source": "photos", "max_windows": 8, "selection_windows": 4},
        "output_dir": str(out) if out else None,
    }
    data.update(over)
    return recipe_from_dict(data)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_allocate_prune_evaluate_save_reload(kind, tmp_path):
    folder = save_tiny_vision_model(kind, tmp_path / kind)
    out = tmp_path / "out"
    result = Pipeline(_recipe(folder, out), show_progress=False).run(out)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == result.model.adapter.task and "perplexity" not in report
    vs = report["metrics"]["vs_dense"]
    assert 0.0 <= vs["divergence"] and set(vs) & {"top1_agreement", "cosine", "image_to_text_agreement"}
    assert report["data"]["skipped_images"] == {"calibration": 0, "evaluation": 0}
    layout = result.model.adapter.layout(result.model.model)
    for info in layout.matrices:
        realised = report["sparsity"]["per_matrix"][info.name]
        assert 0.5 - 1 / info.shape[1] - 1e-6 <= realised <= 0.5 + 1e-3, info.name
    # the saved model reloads with the same zeros and its forward runs
    again = load_model(str(out))
    assert again.adapter.name == result.model.adapter.name
    saved = again.adapter.prunable(again.model)
    for name, module in result.model.adapter.prunable(result.model.model).items():
        assert torch.equal(again.adapter.get_weight(saved[name]) == 0, result.model.adapter.get_weight(module) == 0), name
    batch = crops(load_split("photos", "test"), again.processor, 2, 0, "evaluation")
    outputs = again.adapter.predict(again, again.adapter.encode(again, batch))
    assert all(bool(torch.isfinite(v).all()) for v in outputs.values())
    assert json.loads((out / "allocation.json").read_text())["ratios"].keys() == set(layout.names)


def test_run_and_eval_cli_print_agreement_not_perplexity(tmp_path, capsys):
    folder = save_tiny_vision_model("vit", tmp_path / "vit")
    out = tmp_path / "out"
    assert main(["run", "--model", str(folder), "--nsamples", "4", "--eval-windows", "6", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "KL" in printed and "perplexity" not in printed
    assert main(["eval", str(out), "--windows", "6", "--json", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert evaluated["reference"] == str(folder)  # read from the run's recipe.yaml
    assert evaluated["vs_reference"]["top1_agreement"] == pytest.approx(report["metrics"]["vs_dense"]["top1_agreement"])
    assert evaluated["vs_reference"]["kl"] == pytest.approx(report["metrics"]["vs_dense"]["kl"], rel=1e-4, abs=1e-9)


def test_class_folders_give_labels_and_accuracy(tmp_path):
    from PIL import Image

    images = load_split("photos", "all").images
    data = tmp_path / "images"
    for i, im in enumerate(images[:9]):
        (data / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        im.image.save(data / f"class{i % 3}" / f"{i}.png")
    (data / "class0" / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 40)).save(data / "class1" / "zzz.png")
    folder = save_tiny_vision_model("vit", tmp_path / "vit")
    recipe = _recipe(folder, calibration={"source": str(data), "nsamples": 4}, evaluation={"source": str(data), "max_windows": 6})
    report = Pipeline(recipe, show_progress=False).run(save=False).report
    accuracy = report["metrics"]["dense"]["accuracy"]
    assert accuracy["labelled"] == 6 and 0.0 <= accuracy["top1"] <= accuracy["top5"] <= 1.0
    assert report["data"]["evaluation"]["classes"] == ["class0", "class1", "class2"]
    assert report["data"]["skipped_images"]["evaluation"] == 1 and report["data"]["skipped_images"]["calibration"] == 1


def test_a_model_no_adapter_matches_lists_the_adapters(tmp_path, capsys):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(tmp_path / "resnet")
    assert main(["run", "--model", str(tmp_path / "resnet"), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model adapter handles model_type 'resnet'" in err[0]
    assert all(
        name in err[0]
        for name in ("decoder_llm", "vit", "deit", "dinov2", "swin", "convnext", "efficientnet_lite", "clip", "llava")
    )


def test_every_recipe_in_examples_is_valid():
    from pathlib import Path

    from strataprune.engine.recipe import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[3] / "examples" / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"vit", "deit", "swin", "convnext", "dinov2-small", "efficientnet-lite0", "clip", "llava"}
    for path in recipes:
        recipe = load_recipe(path)
        get_registry().create("allocator", recipe.allocator.name, recipe.allocator.params)
        get_registry().create("pruner", recipe.pruner.name, recipe.pruner.params)
