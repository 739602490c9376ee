"""Continuous batching on the real server: requests started apart share decode steps, and greedy tokens do not change."""

from __future__ import annotations

import threading

import httpx
import pytest
from serving import greedy_reference, stream_chunks

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "ignore_eos": True}


def complete(server, prompt: str, max_tokens: int) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **GREEDY}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_requests_started_apart_share_decode_steps(start_server, served_dir):
    from transformers import AutoTokenizer

    server = start_server("--max-running", "4", "--prefill-chunk", "16")
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4  # 176 tokens: 11 prefill chunks of 16
    first_prompt, steps = "Alpha beta", 60
    alone = {p: complete(server, p, steps)["choices"][0]["text"] for p in (first_prompt, long_prompt)}
    tokenizer = AutoTokenizer.from_pretrained(served_dir)
    reference = greedy_reference(served_dir, tokenizer.encode(first_prompt), steps)
    assert alone[first_prompt] == tokenizer.decode(reference, skip_special_tokens=True)
    assert server.metric("batched_decode_steps_total") == 0
    chunks_before = server.metric("prefill_chunks_total")

    results: dict[str, str] = {}
    started = threading.Event()

    def first() -> None:
        body = {"prompt": first_prompt, "max_tokens": steps, "stream": True, **GREEDY}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            parts = []
            for chunk in stream_chunks(r):
                parts.append(chunk["choices"][0]["text"])
                started.set()
            results["first"] = "".join(parts)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60), "the first request produced no token"
    results["second"] = complete(server, long_prompt, steps)["choices"][0]["text"]  # joins while the first decodes
    thread.join(120)
    assert not thread.is_alive()
    assert results["first"] == alone[first_prompt]  # token for token (greedy) despite the shared batch
    assert results["second"] == alone[long_prompt]
    assert server.metric("batched_decode_steps_total") >= 1
    one = server.metric("decode_batch_size_bucket", 'le="1.0"')
    two = server.metric("decode_batch_size_bucket", 'le="2.0"')
    assert two - one >= 1  # a decode step ran both sequences in one forward
    assert server.metric("prefill_chunks_total") - chunks_before == 1 + 11  # the long prompt came in chunks
    assert server.wait_metric("requests_running", lambda v: v == 0) == 0
    assert server.metric("kv_cache_bytes") == 0
