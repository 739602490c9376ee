"""The decoder-LLM adapter on tiny random configs of every supported layout."""

from __future__ import annotations

import pytest
import torch
from support import TINY_CONFIGS, tiny_model

from strataprune.contract.layout import LoadedModel
from strataprune.engine.calibration import Calibrator
from strataprune.plugins.adapters.decoder_llm import DecoderLLM, find_block_list
from strataprune.testing import check_adapter

EXPECTED_BLOCK_LIST = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma3_text": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.slow) if k == "gemma3_text" else k for k in sorted(TINY_CONFIGS)]
)
def test_contract_on_every_layout(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))  # longer than Gemma's window
    layout = check_adapter(DecoderLLM, model, ids)
    assert find_block_list(model)[0] == EXPECTED_BLOCK_LIST[kind]
    assert layout.num_blocks == model.config.num_hidden_layers


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_embeddings_and_lm_head_are_not_prunable(kind):
    model = tiny_model(kind)
    names = DecoderLLM().layout(model).names
    assert names and not any("embed" in n or "lm_head" in n or "wte" in n or "wpe" in n for n in names)
    per_block = len(names) // model.config.num_hidden_layers
    assert per_block == (4 if kind == "gpt2" else 6 if kind == "opt" else 7)


def test_gpt2_conv1d_weights_are_seen_as_out_by_in():
    model = tiny_model("gpt2")
    layout = DecoderLLM().layout(model)
    assert layout["transformer.h.0.attn.c_attn"].shape == (192, 64)  # fused qkv: out 3*64, in 64
    assert layout["transformer.h.0.mlp.c_proj"].shape == (64, 256)


def test_gemma_wants_bos_per_window_llama_does_not():
    assert DecoderLLM().bos_per_window(tiny_model("gemma3_text"))
    assert not DecoderLLM().bos_per_window(tiny_model("llama"))


def test_block_list_found_by_structure_not_by_attribute_name():
    model = tiny_model("llama")
    # move the blocks somewhere no hard-coded path would look
    model.model.renamed_stack = model.model.layers
    del model.model.layers
    assert find_block_list(model)[0] == "model.renamed_stack"


def test_calibration_statistics_match_a_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(2))
    loaded = LoadedModel(model, None, DecoderLLM(), "tiny")
    calibrator = Calibrator(loaded, ids, show_progress=False)
    seen = {}
    calibrator.run({"input_norms", "hessian"}, visit=lambda s: seen.setdefault(s.block, s))
    # block 0's q_proj input is the first RMSNorm of the embeddings
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64)
    stats = seen[0]
    name = "model.layers.0.self_attn.q_proj"
    assert stats.ntokens == 48
    assert torch.allclose(stats.input_norms[name], x.norm(dim=0), rtol=1e-4)
    assert torch.allclose(stats.hessians[name], 2 * x.T @ x / 48, rtol=1e-3, atol=1e-5)
    # q, k and v read the same tensor: one accumulator, identical statistics
    assert torch.equal(stats.input_norms[name], stats.input_norms["model.layers.0.self_attn.k_proj"])
    assert calibrator.passes == 1
