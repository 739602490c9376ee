"""load_tokenizer: no false "incorrect regex pattern" warning outside the Mistral family, the same token ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from strataprune.contract.tokenizer import load_tokenizer, model_type  # noqa: E402

WARNING = "incorrect regex pattern"
TEXT = "Hello world, it's 2026! new lines\n\nand   spaces"


def _folder(tmp_path: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.replace("\n", " ").split(" ")) - {""})
    # transformers looks at the regex only for vocabularies above 100,000 tokens (Gemma-3 has 262,144)
    filler = [f"<unused{i}>" for i in range(100_001)]
    vocab = {token: i for i, token in enumerate(["[UNK]", *words, *filler])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / kind
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(folder)
    # what transformers 4.57.3+ writes into every folder it saves, the version its false alarm keys on
    (folder / "config.json").write_text(json.dumps({"model_type": kind, "transformers_version": "4.57.6"}))
    return folder


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _warnings_while(load, folder: Path) -> tuple[object, str]:
    """What transformers logs (its own logger does not propagate, so a handler goes on it directly)."""
    records, logger = _Records(), logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        tokenizer = load(folder)
    finally:
        logger.removeHandler(records)
    return tokenizer, "\n".join(records.messages)


def test_gemma_folder_loads_without_the_false_alarm_and_with_the_same_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, "gemma3_text")
    plain, alarm = _warnings_while(AutoTokenizer.from_pretrained, folder)
    ours, quiet = _warnings_while(load_tokenizer, folder)
    if WARNING not in alarm:  # a transformers release without the false alarm: nothing to silence
        pytest.skip("this transformers does not warn about the Mistral regex for a Gemma folder")
    assert WARNING not in quiet
    assert ours(TEXT)["input_ids"] == plain(TEXT)["input_ids"]


def test_mistral_folders_keep_transformers_own_handling(tmp_path: Path, monkeypatch) -> None:
    import transformers

    calls: list[dict] = []
    real = transformers.AutoTokenizer.from_pretrained

    def recording(path, **kwargs):
        calls.append(dict(kwargs))
        if kwargs.get("fix_mistral_regex") is True:  # transformers would rewrite this toy's pre-tokenizer: not needed here
            return object()
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    mistral, gemma = _folder(tmp_path, "mistral"), _folder(tmp_path, "gemma3_text")
    assert model_type(mistral) == "mistral"
    load_tokenizer(mistral)
    assert "fix_mistral_regex" not in calls[-1]  # transformers decides, as without us
    load_tokenizer(gemma)
    assert calls[-1].get("fix_mistral_regex") is False
    load_tokenizer(gemma, fix_mistral_regex=True)  # the caller's own choice is kept
    assert calls[-1].get("fix_mistral_regex") is True


def test_a_saved_tokenizer_does_not_carry_the_setting(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(_folder(tmp_path, "gemma3_text"))
    tokenizer.save_pretrained(tmp_path / "saved")
    assert "fix_mistral_regex" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())


def test_model_type_of_a_folder_without_a_readable_config(tmp_path: Path) -> None:
    assert model_type(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert model_type(tmp_path) is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert model_type(tmp_path) is None
