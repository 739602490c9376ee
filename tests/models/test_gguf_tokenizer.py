"""SentencePiece-BPE tokenizers of GGUF files (strataprune/models/gguf_tokenizer.py).

Reference: a plain loop written from llama.cpp's SentencePiece rule (join the adjacent pair whose joined piece is in
the vocabulary with the highest score, leftmost on ties, until none is left; a character outside the vocabulary
becomes its UTF-8 byte pieces). The BPE model built from spm_merges must give the same ids on random text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from strataprune.models.gguf_tokenizer import (
    NORMAL,
    UNKNOWN,
    needs_merges,
    read_spm_vocabulary,
    spm_bpe_model,
    spm_merges,
)

BYTE, CONTROL = 6, 3


def small_vocabulary(seed: int) -> tuple[list[str], list[float], list[int]]:
    """Control and byte pieces, the characters of 'abcde▁', and random joined pieces with distinct random scores."""
    rng = random.Random(seed)
    pieces, types = ["<unk>", "<bos>"], [UNKNOWN, CONTROL]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    letters = list("abcde▁")
    pieces += letters
    types += [NORMAL] * len(letters)
    joined: set[str] = set()
    while len(joined) < 40:
        joined.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))))
    pieces += sorted(joined)
    types += [NORMAL] * len(joined)
    scores = [0.0] * len(pieces)
    for i, value in zip(range(len(pieces)), rng.sample(range(-100000, 0), len(pieces))):
        scores[i] = float(value)
    return pieces, scores, types


def score_rule(text: str, pieces: list[str], scores: list[float], types: list[int]) -> list[int]:
    ids = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    symbols = list(text)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            j = ids.get(symbols[i] + symbols[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out: list[int] = []
    for s in symbols:
        out += [ids[s]] if s in ids else [pieces.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bpe_model_tokenizes_like_the_score_rule(seed):
    from tokenizers import Tokenizer

    pieces, scores, types = small_vocabulary(seed)
    tokenizer = Tokenizer(spm_bpe_model(pieces, scores, types))
    rng = random.Random(100 + seed)
    for _ in range(200):
        text = "".join(rng.choice("abcde▁▁xé") for _ in range(rng.randint(1, 30)))  # x, é: byte fallback
        assert tokenizer.encode(text).ids == score_rule(text, pieces, scores, types), text


def test_merges_rank_the_joined_piece_by_score_and_skip_non_plain_pieces():
    pieces = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<ctl>"]
    types = [UNKNOWN, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CONTROL]
    scores = [0.0, -1.0, -1.0, -1.0, -5.0, -3.0, -4.0, 0.0]
    assert spm_merges(pieces, scores, types) == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def write_gguf(path: Path, model: str, pieces: list[str], scores: list[float], types: list[int]) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_vocabulary_is_read_from_sentencepiece_files_only(tmp_path):
    pieces, scores, types = small_vocabulary(0)
    spm = write_gguf(tmp_path / "spm.gguf", "llama", pieces, scores, types)
    got = read_spm_vocabulary(spm)
    assert got is not None and got[0] == pieces and got[2] == types
    assert got[1] == pytest.approx(scores)
    assert read_spm_vocabulary(write_gguf(tmp_path / "bpe.gguf", "gpt2", pieces, scores, types)) is None

    unigram = tmp_path / "unigram.json"
    unigram.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    bpe = tmp_path / "bpe.json"
    bpe.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    assert needs_merges(unigram, spm)  # a stale conversion: converted again
    assert not needs_merges(bpe, spm) and not needs_merges(unigram, tmp_path / "bpe.gguf")
    assert not needs_merges(tmp_path / "missing.json", spm)


def test_rebuilt_tokenizer_keeps_user_defined_and_control_pieces_whole(tmp_path):
    """A Unigram tokenizer over a SentencePiece-BPE GGUF is rebuilt: plain text follows the score rule, while
    user-defined pieces (Gemma's newline runs) and control pieces are split out of the raw text first, as llama.cpp
    does, and keep their ids."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    from strataprune.models.gguf_tokenizer import CONTROL, USER_DEFINED, rebuild_with_merges

    pieces, scores, types = small_vocabulary(3)
    pieces += ["\n\n", "<ctl>"]
    scores += [0.0, 0.0]
    types += [USER_DEFINED, CONTROL]
    gguf_file = write_gguf(tmp_path / "spm.gguf", "llama", pieces, scores, types)
    backend = Tokenizer(Unigram([(p, s) for p, s in zip(pieces, scores)], unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert rebuild_with_merges(tokenizer, gguf_file)
    assert not rebuild_with_merges(tokenizer, gguf_file)  # already BPE: left alone
    text_a, text_b = "ab cde", "edcba a"
    got = tokenizer(f"{text_a}\n\n{text_b}<ctl>", add_special_tokens=False)["input_ids"]
    want = score_rule(text_a.replace(" ", "▁"), pieces, scores, types) + [pieces.index("\n\n")]
    want += score_rule(text_b.replace(" ", "▁"), pieces, scores, types) + [pieces.index("<ctl>")]
    assert got == want
