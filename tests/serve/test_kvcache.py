"""The padded batch cache: each row's logits are those of its sequence run alone, through joins and leaves."""

from __future__ import annotations

import pytest
import torch

from strataprune.serve.runners import BatchedRunner


class Eager:
    """What BatchedRunner needs of a prepared torch model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.forward, self.device = model, model.forward, torch.device("cpu")


def alone(model: torch.nn.Module, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each forced next token, one sequence, no cache (the reference)."""
    out = []
    with torch.inference_mode():
        for n in range(len(steps) + 1):
            full = ids + steps[:n]
            out.append(model(input_ids=torch.tensor([full])).logits[0, -1].float())
    return out


def test_batched_decode_equals_single_sequences(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    runner = BatchedRunner(Eager(model), prefill_chunk=4)
    g = torch.Generator().manual_seed(0)
    prompts = {key: torch.randint(0, 256, (length,), generator=g).tolist() for key, length in [(1, 11), (2, 3), (3, 7)]}
    forced = {key: torch.randint(0, 256, (6,), generator=g).tolist() for key in prompts}
    want = {key: alone(model, prompts[key], forced[key]) for key in prompts}
    got: dict[int, list[torch.Tensor]] = {key: [] for key in prompts}
    step = {key: 0 for key in prompts}

    def prefill(key: int) -> None:
        ids = prompts[key]
        for start in range(0, len(ids), 4):  # chunks of 4
            logits = runner.prefill(key, ids[start : start + 4])
        got[key].append(logits)
        runner.join(key, len(ids))

    def decode(keys: list[int]) -> None:
        out = runner.decode({key: forced[key][step[key]] for key in keys})
        assert sorted(out) == sorted(keys)
        for key in keys:
            got[key].append(out[key])
            step[key] += 1

    prefill(1)
    decode([1])
    prefill(2)  # shorter: padded on the left
    decode([1, 2])
    decode([1, 2])
    prefill(3)
    decode([1, 2, 3])
    runner.release(1)  # the widest leaves: the common padding is cut
    assert runner.batch.width == max(runner.batch.lengths)
    decode([2, 3])
    decode([2, 3])
    decode([2, 3])
    runner.release(2)
    decode([3])
    decode([3])
    runner.release(3)
    assert runner.kv_bytes() == 0
    for key in prompts:
        assert len(got[key]) >= 4
        for a, b in zip(got[key], want[key]):
            assert torch.allclose(a, b, atol=1e-5), (key, float((a - b).abs().max()))


def test_sparse_cpu_models_batch_too(tiny_llama_dir, tmp_path):
    """sparse-cpu's eager engine (PyTorch with the pruned Linears on strataprune's kernels) takes the batched path.

    The native engine, sparse-cpu's default for Llama models, batches on its own slots instead (test_native.py)."""
    from transformers import AutoModelForCausalLM

    from strataprune.contract.backend import DeploySettings
    from strataprune.plugins.backends.sparse_cpu import SparseCpuBackend

    backend = SparseCpuBackend.from_params({"engine": "eager"})
    state = backend.available()
    if not state.ok:
        pytest.skip(state.reason)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.mul_(torch.rand(module.weight.shape, generator=g) > 0.7)  # 70% zeros
    model.save_pretrained(tmp_path / "pruned")
    compiled = backend.prepare(tmp_path / "pruned", tmp_path / "work", DeploySettings(threads=1))
    assert compiled.meta["converted_linears"] > 0
    runner = BatchedRunner(compiled, prefill_chunk=8)
    prompts = {1: list(range(10, 30)), 2: list(range(40, 45))}
    want = {key: alone(model, ids, [7, 8, 9]) for key, ids in prompts.items()}
    got = {key: [runner.prefill(key, ids)] for key, ids in prompts.items()}
    for key, ids in prompts.items():
        runner.join(key, len(ids))
    for token in (7, 8, 9):
        out = runner.decode({1: token, 2: token})
        for key in prompts:
            got[key].append(out[key])
    for key in prompts:
        for a, b in zip(got[key], want[key]):
            assert torch.allclose(a, b, atol=1e-4), (key, float((a - b).abs().max()))
