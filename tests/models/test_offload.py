"""Models larger than memory: the offloaded block-at-a-time path gives the same result as the in-memory one."""

from __future__ import annotations

import json

import pytest
import torch

from strataprune.contract.errors import ConfigError
from strataprune.engine.calibration import Calibrator
from strataprune.engine.pipeline import Pipeline
from strataprune.engine.recipe import recipe_from_dict
from strataprune.models.loading import load_model, resolve_device


def recipe(model_dir, text_file, pruner="sparsegpt", offload=False, **calibration):
    return recipe_from_dict(
        {
            "model": {"source": str(model_dir), "offload": offload},
            "calibration": {"source": str(text_file), "nsamples": 4, "seqlen": 32, **calibration},
            "evaluation": {"source": str(text_file), "seqlen": 32, "max_windows": 2},
            "pruner": pruner,
            "sparsity": 0.5,
        }
    )


def saved_state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_offloaded_path_gives_the_same_masks_and_weights(tiny_llama_dir, text_file, tmp_path):
    quiet = dict(show_progress=False, log=lambda _: None)
    a = Pipeline(recipe(tiny_llama_dir, text_file), **quiet).run(tmp_path / "memory")
    b = Pipeline(recipe(tiny_llama_dir, text_file, offload=True, activation_dir=str(tmp_path / "acts")), **quiet).run(
        tmp_path / "offload"
    )
    sa, sb = saved_state(tmp_path / "memory"), saved_state(tmp_path / "offload")
    assert sa.keys() == sb.keys()
    pruned = 0
    for key in sa:
        assert torch.equal(sa[key] == 0, sb[key] == 0), key
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)
        pruned += int("layers" in key and (sa[key] == 0).any())
    assert pruned == 21  # every prunable matrix was pruned, so the comparison covers real masks
    assert a.report["perplexity"]["sparse"]["ppl"] == pytest.approx(b.report["perplexity"]["sparse"]["ppl"], rel=1e-5)
    assert a.report["sparsity"]["per_matrix"] == b.report["sparsity"]["per_matrix"]
    # the offloaded model is written one shard per block, with a standard index
    index = json.loads((tmp_path / "offload" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1
    memory = json.loads((tmp_path / "offload" / "report.json").read_text())["memory"]
    assert memory["offload"] is True and memory["activation_storage"] == "disk" and memory["peak_rss_mb"] > 0
    assert not list((tmp_path / "acts").iterdir())  # activation files are unlinked once mapped


def test_offloaded_model_keeps_only_the_held_block_in_memory(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), offload=True)
    model = loaded.model
    offloader = model.strataprune_offload
    layers = model.model.layers
    assert all(p.is_meta for p in layers.parameters())
    assert not model.model.embed_tokens.weight.is_meta
    seen = []
    layers[1].register_forward_pre_hook(lambda *_: seen.append([not layers[i].self_attn.q_proj.weight.is_meta for i in range(3)]))
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 16))).logits
    assert bool(torch.isfinite(logits).all())
    assert seen == [[False, True, False]]  # during block 1's forward only block 1 is loaded
    assert all(p.is_meta for p in layers.parameters())
    with offloader.hold(2):
        assert not layers[2].mlp.up_proj.weight.is_meta
        layers[2].mlp.up_proj.weight.data.zero_()
        offloader.mark_dirty(2)
    with offloader.hold(2):  # the change was written to a working shard and is read back
        assert float(layers[2].mlp.up_proj.weight.abs().sum()) == 0.0
    offloader.reset()
    with offloader.hold(2):
        assert float(layers[2].mlp.up_proj.weight.abs().sum()) > 0.0


def test_activation_dtype_and_disk_storage(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, 256, (3, 16))
    seen = {}

    def visit(stats):
        seen[stats.block] = (stats.outputs.dtype, float(stats.hessians[stats.matrices[0].name].trace()))

    for dtype, folder in ((None, None), (torch.bfloat16, None), (torch.float16, tmp_path / "acts")):
        calibrator = Calibrator(loaded, ids, activation_dtype=dtype, activation_dir=folder, show_progress=False)
        calibrator.run({"hessian", "block_outputs"}, visit=visit)
        assert {v[0] for v in seen.values()} == {dtype or torch.float32}
        if dtype is None:
            reference = dict(seen)
        else:  # low-precision activations change the statistics only slightly
            for b, (_, trace) in seen.items():
                assert trace == pytest.approx(reference[b][1], rel=0.05)


def test_offload_refuses_dense_propagation(tiny_llama_dir, text_file):
    r = recipe(tiny_llama_dir, text_file, offload=True, propagate="dense")
    with pytest.raises(ConfigError, match="propagate"):
        Pipeline(r, show_progress=False).run(save=False)


def test_device_errors_are_clear():
    assert resolve_device("cpu") == (torch.device("cpu"), None)
    with pytest.raises(ConfigError, match="'tpu' is not a device; allowed: cpu, cuda, cuda:N, auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="asked for CUDA"):
            resolve_device("cuda")
        assert resolve_device("auto") == (torch.device("cpu"), None)  # auto: the best device here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_cpu_masks(tiny_llama_dir, text_file, tmp_path):
    quiet = dict(show_progress=False, log=lambda _: None)
    cpu = Pipeline(recipe(tiny_llama_dir, text_file, pruner="wanda"), **quiet).run(tmp_path / "cpu")
    r = recipe(tiny_llama_dir, text_file, pruner="wanda")
    r.model.device = "cuda"
    gpu = Pipeline(r, **quiet).run(tmp_path / "gpu")
    sa, sb = saved_state(tmp_path / "cpu"), saved_state(tmp_path / "gpu")
    agree = sum(int(torch.equal(sa[k] == 0, sb[k] == 0)) for k in sa)
    assert agree >= len(sa) - 2  # TF32/accumulation order may flip a tie in a matrix or two
    assert gpu.report["memory"]["cuda_peak_mb"]["cuda:0"] > 0
    assert cpu.report["perplexity"]["sparse"]["ppl"] == pytest.approx(gpu.report["perplexity"]["sparse"]["ppl"], rel=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_multi_gpu_device_map(tiny_llama_dir, text_file, tmp_path):
    r = recipe(tiny_llama_dir, text_file, pruner="wanda")
    r.model.device = "auto"
    result = Pipeline(r, show_progress=False, log=lambda _: None).run(tmp_path / "auto")
    assert result.report["sparsity"]["realised_prunable"] == pytest.approx(0.5, abs=0.01)


def test_a_model_replaced_during_an_offloaded_run_is_an_error_and_nothing_is_saved(tiny_llama_dir, text_file, tmp_path):
    """An offloaded run reads its model again by path; another run committing its output over that model
    meanwhile (a folder swap) must stop this run instead of saving the other model's weights."""
    import shutil

    from support import save_tiny_model

    from strataprune.contract.errors import DataError
    from strataprune.runtime.outputs import _exchange, release_output_locks

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    swapped = []

    def log(message: str) -> None:
        if message.startswith("dense perplexity") and not swapped:  # the blocks are read again after this
            if not _exchange(other, model):
                model.rename(tmp_path / "aside")
                other.rename(model)
            swapped.append(True)

    pipeline = Pipeline(recipe(model, text_file, offload=True), show_progress=False, log=log)
    with pytest.raises(DataError, match=r"the model '.*model' changed on disk during this run .*nothing is saved"):
        pipeline.run(tmp_path / "out")
    release_output_locks()  # what the CLI does when a command ends
    assert swapped and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temporary, no lock
