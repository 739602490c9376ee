"""SentencePiece tokenizers of GGUF files, rebuilt with the merges their scores define.

A GGUF whose ``tokenizer.ggml.model`` is ``llama`` carries a SentencePiece vocabulary whose scores rank merges:
llama.cpp tokenizes by joining, again and again, the adjacent pair whose joined piece is in the vocabulary with the
highest score (starting from characters; characters outside the vocabulary become their UTF-8 byte tokens). For
Gemma's such files transformers 4.57 builds a Unigram model over the same scores instead, which splits common words
apart ("the" -> "▁t", "he"; Gemma-3-270M's BBC perplexity 147 instead of ~17). Before the score rule, llama.cpp
splits the text at user-defined pieces (Gemma's runs of newlines and of spaces) and control pieces (``<bos>``,
``<start_of_turn>`` ...), which stay whole. :func:`spm_merges` lists the merges that reproduce the score rule,
ranked by the joined piece's score, and :func:`rebuild_with_merges` swaps a BPE model built from them into a fast
tokenizer and adds the user-defined and control pieces as whole tokens (matched in the raw text, as llama.cpp
does); its normalizer, pre-tokenizer and decoder stay as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: GGUF token types (tokenizer.ggml.token_type): a plain piece, the unknown token, a control piece, a user-defined one
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4


def read_spm_vocabulary(gguf: Path) -> tuple[list[str], list[float], list[int]] | None:
    """(pieces, scores, token types) of a GGUF whose tokenizer is SentencePiece (``llama``), else None."""
    import gguf as gguf_package

    try:
        fields = gguf_package.GGUFReader(str(gguf)).fields

        def strings(key: str) -> list[str]:
            field = fields[key]
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]

        if "tokenizer.ggml.model" not in fields or strings("tokenizer.ggml.model") != ["llama"]:
            return None
        pieces = strings("tokenizer.ggml.tokens")
        scores = [float(fields["tokenizer.ggml.scores"].parts[i][0]) for i in fields["tokenizer.ggml.scores"].data]
        types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    except (KeyError, IndexError, ValueError, OSError):  # no scores or types, or a damaged file: leave it to transformers
        return None
    # a piece that is not UTF-8 would collide with others once decoded: such a vocabulary is left as transformers reads it
    if not len(pieces) == len(scores) == len(types) or len(set(pieces)) != len(pieces):
        return None
    return pieces, scores, types


def spm_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a plain piece into two plain pieces, highest-scoring joined piece first (ties: the
    joined piece's id, then the split's position), so that BPE's lowest-rank-first rule picks the pair SentencePiece
    picks."""
    plain = {piece: i for i, piece in enumerate(pieces) if types[i] == NORMAL}
    ranked = []
    for piece, i in plain.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in plain and right in plain:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort(key=lambda entry: entry[:3])
    return [(left, right) for _, _, _, left, right in ranked]


def spm_bpe_model(pieces: list[str], scores: list[float], types: list[int]) -> Any:
    """A ``tokenizers`` BPE model that tokenizes like SentencePiece's score rule, with byte fallback."""
    from tokenizers.models import BPE

    unknown = next((pieces[i] for i, kind in enumerate(types) if kind == UNKNOWN), None)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return BPE(vocab=vocab, merges=spm_merges(pieces, scores, types), unk_token=unknown, byte_fallback=True, fuse_unk=True)


def backend_model_type(tokenizer_json: dict) -> str | None:
    model = tokenizer_json.get("model")
    return model.get("type") if isinstance(model, dict) else None


def needs_merges(tokenizer_json_path: Path, gguf: Path) -> bool:
    """Whether a saved ``tokenizer.json`` converted from ``gguf`` is the Unigram reading of a SentencePiece-BPE file."""
    try:
        text = Path(tokenizer_json_path).read_text(encoding="utf-8")
        if '"Unigram"' not in text:  # most conversions: no need to parse a large file at every load
            return False
        saved = json.loads(text)
    except (OSError, ValueError):
        return False
    return backend_model_type(saved) == "Unigram" and read_spm_vocabulary(gguf) is not None


def rebuild_with_merges(tokenizer: Any, gguf: Path) -> bool:
    """Replace a fast tokenizer's Unigram model by the SentencePiece-BPE model of ``gguf`` (True when it did)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend_model_type(json.loads(backend.to_str())) != "Unigram":
        return False
    vocabulary = read_spm_vocabulary(gguf)
    if vocabulary is None or len(set(vocabulary[0])) != len(vocabulary[0]):
        return False
    from tokenizers import AddedToken

    pieces, scores, types = vocabulary
    backend.model = spm_bpe_model(pieces, scores, types)
    whole = [AddedToken(p, normalized=False, special=False) for p, kind in zip(pieces, types) if kind == USER_DEFINED]
    control = [AddedToken(p, normalized=False, special=True) for p, kind in zip(pieces, types) if kind == CONTROL]
    backend.add_tokens(whole)  # pieces already in the vocabulary keep their ids
    backend.add_special_tokens(control)
    return True
