"""The scheduler in process: an engine that cannot batch is served one sequence at a time, with the same tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="`strataprune serve` needs the serve extra")
pytestmark = pytest.mark.slow

from strataprune.contract.backend import CompiledModel, DeploySettings  # noqa: E402
from strataprune.plugins.backends.torch import TorchBackend  # noqa: E402
from strataprune.serve.metrics import ServeMetrics  # noqa: E402
from strataprune.serve.model import FolderInfo, ServedModel, inspect_folder  # noqa: E402
from strataprune.serve.runners import BatchedRunner, SequentialRunner, can_batch  # noqa: E402
from strataprune.serve.sampling import SamplingParams  # noqa: E402
from strataprune.serve.scheduler import Event, Scheduler, SchedulerLimits, Sequence  # noqa: E402


class OpaqueEngine(CompiledModel):
    """An engine seen only through the Backend contract's prefill/decode (like ONNX Runtime)."""

    def __init__(self, inner: CompiledModel) -> None:
        super().__init__("opaque")
        self.inner = inner

    def prefill(self, input_ids):
        return self.inner.prefill(input_ids)

    def decode(self, token_ids, state):
        return self.inner.decode(token_ids, state)


def served(folder: Path, runner, info: FolderInfo) -> ServedModel:
    from transformers import AutoTokenizer

    return ServedModel(info, "tiny", "test", AutoTokenizer.from_pretrained(folder), runner, set(), 256, "", 768, {})


def run_all(scheduler: Scheduler, prompts: list[list[int]], steps: int) -> list[list[int]]:
    done = [threading.Event() for _ in prompts]
    sequences = []
    for i, ids in enumerate(prompts):

        def sink(event: Event, i: int = i) -> None:
            if event.kind != "text":
                assert event.kind == "done", event.error and event.error.message
                done[i].set()

        sequences.append(Sequence(ids, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True), sink, deadline=1e18))
        scheduler.submit(sequences[-1])
    scheduler.start()  # after every submit: the order of admissions is fixed
    for event in done:
        assert event.wait(120)
    return [s.generated for s in sequences]


@pytest.mark.parametrize("batched", [True, False])
def test_concurrent_requests_get_their_greedy_tokens(tiny_llama_dir, tmp_path, batched):
    from serving import greedy_reference

    info = inspect_folder(tiny_llama_dir)
    compiled = TorchBackend().prepare(tiny_llama_dir, tmp_path, DeploySettings())
    assert can_batch(compiled) and not can_batch(OpaqueEngine(compiled))
    runner = BatchedRunner(compiled, prefill_chunk=5) if batched else SequentialRunner(OpaqueEngine(compiled))
    scheduler = Scheduler(served(tiny_llama_dir, runner, info), SchedulerLimits(max_running=4, prefill_chunk=5), ServeMetrics(4))
    try:
        prompts = [[5, 6, 7], list(range(30, 52)), [100, 3, 9, 200, 17, 4, 4, 8, 1, 2, 3]]
        got = run_all(scheduler, prompts, 10)
    finally:
        scheduler.stop()
    assert got == [greedy_reference(tiny_llama_dir, ids, 10) for ids in prompts]
    assert scheduler.max_running == (4 if batched else 1)
    assert scheduler.max_batch_seen == (3 if batched else 1)
    assert runner.kv_bytes() == 0
