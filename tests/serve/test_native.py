"""The server on the native C++ decoder (``sparse-cpu``, engine auto): slots shared by running sequences.

The served folder is the tiny random Llama with 60% of every block Linear's weights zeroed (by magnitude), so the
sparse-cpu backend packs them and the native engine runs the sparse kernels, not only dense ones. Its context is
raised to 4096 (RoPE needs no table) so that requests can run long enough to be caught mid-flight, and so that the
native slots' own bound (2048 positions) is what refuses a long prompt.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from serving import ServerProcess, greedy_reference, stream_chunks

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "ignore_eos": True}
NATIVE_NOTE = "native C++ decoder"


@pytest.fixture(scope="module")
def pruned_dir(served_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("native") / "pruned"
    model = AutoModelForCausalLM.from_pretrained(served_dir)
    model.config.max_position_embeddings = 4096  # above the native slots' 2048: long requests, and the engine's bound
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                cut = weight.abs().flatten().kthvalue(int(0.6 * weight.numel())).values
                weight[weight.abs() <= cut] = 0.0
    model.save_pretrained(folder)
    for path in served_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def start(pruned_dir):
    started: list[ServerProcess] = []

    def launch(*flags: str) -> ServerProcess:
        server = ServerProcess(pruned_dir, *flags)
        started.append(server)
        return server

    yield launch
    for server in started:
        server.kill()


def complete(server, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, **GREEDY, **extra}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def open_stream(server, body: dict):
    """A streaming request whose first chunk has arrived: (client, response, chunk iterator, first text)."""
    client = httpx.Client(timeout=120)
    response = client.send(
        client.build_request("POST", server.url + "/v1/completions", json={**body, "stream": True}), stream=True
    )
    chunks = stream_chunks(response)
    return client, response, chunks, next(chunks)["choices"][0]["text"]


def test_native_runner_batches_queues_frees_slots_and_drains(start, pruned_dir):
    from transformers import AutoTokenizer

    server = start("--backend", "sparse-cpu", "--max-running", "2", "--prefill-chunk", "16")
    assert NATIVE_NOTE in server.log() and "2 KV-cache slots" in server.log()
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4  # 176 tokens: 11 chunks of 16
    first_prompt, first_steps, steps = "Alpha beta", 240, 60
    alone = {first_prompt: complete(server, first_prompt, first_steps)["choices"][0]["text"]}
    alone[long_prompt] = complete(server, long_prompt, steps)["choices"][0]["text"]
    reference = greedy_reference(pruned_dir, tokenizer.encode(first_prompt), 60)  # no cache, no batching, PyTorch
    assert alone[first_prompt].startswith(tokenizer.decode(reference, skip_special_tokens=True))
    assert server.metric("batched_decode_steps_total") == 0
    chunks_before = server.metric("prefill_chunks_total")

    # two requests started apart share decode steps, each token for token as alone; the tiny model decodes so fast
    # that the first may end before the second's 11 prompt chunks are in, so this tries a few times
    for attempt in range(1, 6):
        client, response, chunks, head = open_stream(server, {"prompt": first_prompt, "max_tokens": first_steps, **GREEDY})
        second = complete(server, long_prompt, steps)["choices"][0]["text"]  # joins while the first decodes
        first = head + "".join(c["choices"][0]["text"] for c in chunks)
        response.close()
        client.close()
        assert first == alone[first_prompt] and second == alone[long_prompt]
        if server.metric("batched_decode_steps_total") >= 1:
            break
    assert server.metric("batched_decode_steps_total") >= 1
    assert server.metric("decode_batch_size_bucket", 'le="2.0"') - server.metric("decode_batch_size_bucket", 'le="1.0"') >= 1
    assert server.metric("prefill_chunks_total") - chunks_before == attempt * (1 + 11)  # the long prompt came in chunks
    assert server.wait_metric("requests_running", lambda v: v == 0) == 0
    assert server.metric("kv_cache_bytes") == 0

    # a client that goes away frees its slot: the KV bytes of a slot go back to 0, and both slots serve again
    client, response, pending, _ = open_stream(server, {"prompt": "go", "max_tokens": 2000, **GREEDY})  # kept: unread
    held = server.wait_metric("kv_cache_bytes", lambda v: v > 0, seconds=5)
    assert held > 0
    assert held * 2 == server.metric("kv_cache_bound_bytes")  # one of two slots, each reserved whole
    response.close()
    client.close()
    del pending
    assert server.wait_metric("cancelled_requests_total", lambda v: v >= 1, 'reason="disconnect"') == 1
    assert server.wait_metric("kv_cache_bytes", lambda v: v == 0) == 0

    # more requests than slots: the rest wait in the queue, and all of them complete as they would alone
    prompts = [f"request {i} says" for i in range(5)]
    expected = {p: complete(server, p, 400)["choices"][0]["text"] for p in prompts[:2]}
    results: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda p=p: results.update({p: complete(server, p, 400)["choices"][0]["text"]})) for p in prompts
    ]
    for thread in threads:
        thread.start()
    waited = server.wait_metric("requests_waiting", lambda v: v >= 1, seconds=10)
    for thread in threads:
        thread.join(120)
    assert sorted(results) == sorted(prompts)
    assert all(results[p] == text for p, text in expected.items())
    assert waited >= 1  # five requests, two slots: some waited
    assert server.wait_metric("requests_running", lambda v: v == 0) == 0

    # a prompt longer than the slots' context (the model's own is 4096): the usual 400 naming the prompt
    too_long = httpx.post(server.url + "/v1/completions", json={"prompt": list(range(1, 201)) * 11, "max_tokens": 1}, timeout=30)
    assert too_long.status_code == 400, too_long.text
    assert "2200 tokens; the model's context is 2048 tokens" in too_long.json()["error"]["message"]

    # SIGTERM: the request in flight finishes, then the server exits 0
    client, response, chunks, _ = open_stream(server, {"prompt": "go", "max_tokens": 1500, **GREEDY})
    server.terminate()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "SIGTERM" not in server.log():
        time.sleep(0.05)
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503
    rest = list(chunks)
    response.close()
    client.close()
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == 1500
    assert server.proc.wait(60) == 0, server.log()


def test_native_server_equals_the_eager_sparse_server(start):
    native = start("--backend", "sparse-cpu", "--max-running", "2")
    eager = start("--backend", "sparse-cpu:engine=eager", "--max-running", "2")
    assert NATIVE_NOTE in native.log() and NATIVE_NOTE not in eager.log()
    for prompt in ("Alpha beta", "the lazy dog " * 6):
        assert complete(native, prompt, 40)["choices"][0]["text"] == complete(eager, prompt, 40)["choices"][0]["text"]
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "ignore_eos": False}
    assert (
        complete(native, "Alpha", 30, **sampled)["choices"][0]["text"]
        == complete(eager, "Alpha", 30, **sampled)["choices"][0]["text"]
    )


def test_native_runner_reuses_a_freed_slot_empty_and_names_the_flag_when_too_big(served_dir):
    from transformers import AutoModelForCausalLM

    from strataprune.contract.errors import ConfigError
    from strataprune.serve.runners import NativeRunner

    class Prepared:  # what sparse-cpu's native path prepares: the model, its head setting, an engine slot
        engine, lm_head, closed = None, "fp32", False

        def __init__(self) -> None:
            self.model = AutoModelForCausalLM.from_pretrained(served_dir)

        def close(self) -> None:
            self.closed = True

    too_big = Prepared()
    with pytest.raises(ConfigError, match="--max-running 1000000"):
        NativeRunner(too_big, 1_000_000, 256, 16)
    assert too_big.closed
    runner = NativeRunner(Prepared(), 2, 256, 16)
    alone = runner.prefill("c", [7, 8])
    runner.release("c")
    runner.prefill("a", [1, 2, 3])
    runner.prefill("b", [4, 5])
    assert runner.kv_bytes() == 2 * runner.slot_bytes
    runner.release("a")
    assert runner.kv_bytes() == runner.slot_bytes
    again = runner.prefill("c", [7, 8])  # takes a's slot, emptied: as if alone
    assert runner.slots == {"b": 1, "c": 0} and runner.engine.length(0) == 2
    assert torch.equal(again, alone)
