"""Backends on a tiny random Llama: registration, export + parity for every available engine, 2:4 checks, doctor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import save_tiny_model

from strataprune.cli import main
from strataprune.contract.backend import BACKEND_CONTRACT, CompiledModel, DeploySettings
from strataprune.contract.errors import DataError
from strataprune.contract.registry import get_registry
from strataprune.deploy.parity import ParityError, check_parity, reference_outputs


def _backend(name: str, **params):
    return get_registry().create("backend", name, params)


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory) -> Path:
    """A tiny random Llama with 60% of its Linear weights zeroed, saved as a plain checkpoint."""
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("pruned-tiny"), seed=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.weight.data[torch.rand(module.weight.shape, generator=gen) < 0.6] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, 24), dtype=np.int64)


def test_builtin_backends_register_through_the_hook_with_the_current_contract():
    registry = get_registry()
    names = registry.names("backend")
    assert {"torch", "onnxruntime", "deepsparse", "torch-2:4"} <= set(names)
    for name in ("torch", "onnxruntime", "deepsparse", "torch-2:4"):
        info = registry.info("backend", name)
        assert info.provided_by == "strataprune" and info.entry_point == "backends"
        assert info.cls.contract == BACKEND_CONTRACT
        state = info.cls().available()
        assert isinstance(state.ok, bool) and (state.ok or state.reason)


def test_contract_checks_pass_for_a_torch_subclass_that_converts_linears(pruned_tiny, tmp_path):
    """What a third party (e.g. a `sparse-cpu` backend) writes: subclass TorchBackend, override convert()."""
    from strataprune.plugins.backends.torch import TorchBackend
    from strataprune.testing import check_backend

    class Reordered(torch.nn.Module):  # stands in for a SparseLinear: same function, other module
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    class ConvertingBackend(TorchBackend):
        name = "converting"
        sparse_formats = ("unstructured",)

        def convert(self, model, model_dir):
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                        setattr(parent, child_name, Reordered(child))
            return model

    parity = check_backend(ConvertingBackend, pruned_tiny, tmp_path)
    assert parity["reference"] == "torch" and parity["greedy_identical"]


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("torch", {}, None),  # eager PyTorch is the reference itself
        ("torch", {"compile": True}, "torch"),
        ("torch", {"device": "cuda", "dtype": "bfloat16", "compile": True}, "torch:device=cuda:dtype=bfloat16"),
        ("torch-2:4", {}, "torch:device=cuda:dtype=float16"),  # same GPU, same dtype
        ("sparse-cpu", {}, "torch"),
        ("onnxruntime", {}, "torch"),
        ("deepsparse", {}, "torch"),
    ],
)
def test_each_backend_names_its_reference_and_the_host_builds_it(name, params, reference):
    """The contract names the reference (``reference_backend``, ``reference_params()``); the host builds it through
    the registry, so the contract imports no backend."""
    from strataprune.deploy.parity import reference_backend

    built = reference_backend(get_registry().create("backend", name, params))
    assert (built.label() if built is not None else None) == reference
    assert built is None or not built.config.compile


def test_a_backend_may_name_another_reference_or_none():
    from strataprune.contract.backend import Backend
    from strataprune.deploy.parity import reference_backend

    class AgainstOnnx(Backend):
        name = "against-onnx"
        reference_backend = "onnxruntime"

        def reference_params(self):
            return {"weights": "fp32"}

    class OwnReference(Backend):
        name = "own"
        reference_backend = None

    built = reference_backend(AgainstOnnx())
    assert built.name == "onnxruntime" and built.config.weights == "fp32"
    assert reference_backend(OwnReference()) is None


def test_torch_backend_greedy_tokens_equal_transformers_generate(pruned_tiny, windows, tmp_path):
    """The reference itself, against an independent path: transformers' own generate() without our cache handling."""
    from transformers import AutoModelForCausalLM

    compiled = _backend("torch").prepare(pruned_tiny, tmp_path, DeploySettings(prompt_len=24, new_tokens=6))
    tokens = compiled.greedy(windows, 6)
    model = AutoModelForCausalLM.from_pretrained(pruned_tiny)
    expected = model.generate(
        torch.from_numpy(windows), max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0, eos_token_id=None
    )[:, windows.shape[1] :]
    assert np.array_equal(tokens, expected.numpy())
    with torch.no_grad():
        full = model(torch.from_numpy(windows)).logits.numpy()
    assert np.allclose(compiled.prefill(windows)[0], full, atol=1e-5)


AVAILABLE = [name for name in ("onnxruntime", "deepsparse") if get_registry().create("backend", name).available().ok]
SKIPPED = {name: get_registry().create("backend", name).available().reason for name in ("onnxruntime", "deepsparse")}


@pytest.mark.slow  # an ONNX export and engine session per backend
@pytest.mark.parametrize("name", ["onnxruntime", "deepsparse"])
def test_export_and_parity_against_torch(name, pruned_tiny, windows, tmp_path):
    if name not in AVAILABLE:
        pytest.skip(f"{name} is not available here: {SKIPPED[name]}")
    settings = DeploySettings(batch=1, prompt_len=windows.shape[1], new_tokens=4, threads=1)
    reference = _backend("torch").prepare(pruned_tiny, tmp_path / "ref", settings)
    ref = reference_outputs(reference, windows, steps=4, batch=1)
    compiled = _backend(name).prepare(pruned_tiny, tmp_path / name, settings)
    try:
        result = check_parity(compiled, ref, tolerance=1e-4)
        assert result["greedy_identical"] and result["relative"] < 1e-4
        assert compiled.artifact is not None and compiled.artifact.exists() and compiled.meta["artifact_bytes"] > 0
        times = compiled.time_decode(windows[:1], tokens=2, warmup=0, repeats=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    finally:
        compiled.close()


class _Shifted(CompiledModel):
    """A model whose logits are off by a known amount."""

    def __init__(self, inner: CompiledModel, shift: float) -> None:
        super().__init__("shifted")
        self.inner, self.shift = inner, shift

    def prefill(self, input_ids):
        logits, state = self.inner.prefill(input_ids)
        logits = logits.copy()
        logits[..., 7] += self.shift
        return logits, state

    def decode(self, token_ids, state):
        return self.inner.decode(token_ids, state)


def test_parity_failure_names_the_tolerance_and_the_difference(pruned_tiny, windows, tmp_path):
    compiled = _backend("torch").prepare(pruned_tiny, tmp_path, DeploySettings(prompt_len=24, new_tokens=2))
    ref = reference_outputs(compiled, windows, steps=2)
    assert check_parity(_Shifted(compiled, 1e-6), ref, tolerance=1e-3)["greedy_identical"]
    with pytest.raises(ParityError, match=r"parity failed on shifted: max \|logit difference\| 0\.5 .*tolerance 0\.001"):
        check_parity(_Shifted(compiled, 0.5), ref, tolerance=1e-3)


# --------------------------------------------------------------------------- 2:4
def test_2to4_validation_names_the_first_bad_matrix():
    from strataprune.plugins.backends.torch_24 import check_2to4, first_2to4_violation

    good = torch.randn(4, 8)
    good[:, 0::4] = 0
    good[:, 1::4] = 0
    assert first_2to4_violation(good) is None
    bad = good.clone()
    bad[2, 5] = 1.0  # row 2, group of columns 4-7 now holds 3 nonzeros
    assert first_2to4_violation(bad) == (2, 4, 3)
    linears = {
        "model.layers.0.self_attn.q_proj": torch.nn.Linear(8, 4, bias=False),
        "model.layers.0.self_attn.k_proj": torch.nn.Linear(8, 4, bias=False),
    }
    linears["model.layers.0.self_attn.q_proj"].weight.data = good
    linears["model.layers.0.self_attn.k_proj"].weight.data = bad
    with pytest.raises(
        DataError, match=r"'model\.layers\.0\.self_attn\.k_proj' \(\(4, 8\)\) is not 2:4 sparse: row 2, columns 4-7 hold 3"
    ):
        check_2to4(linears)
    odd = {"x": torch.nn.Linear(6, 2, bias=False)}
    with pytest.raises(DataError, match="not a multiple of 4"):
        check_2to4(odd)


def test_torch_2to4_runs_on_cuda_or_says_why_not(pruned_tiny, tmp_path):
    backend = _backend("torch-2:4")
    state = backend.available()
    if not state.ok:
        assert "CUDA" in state.reason or "compute capability" in state.reason
        pytest.skip(f"torch-2:4 is not available here: {state.reason}")
    with pytest.raises(DataError, match="is not 2:4 sparse"):  # pragma: no cover - needs CUDA
        backend.prepare(pruned_tiny, tmp_path, DeploySettings(prompt_len=16, new_tokens=2))


# --------------------------------------------------------------------------- doctor
def test_doctor_lists_every_backend_with_version_and_reason(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "onnxruntime", "deepsparse", "torch-2:4"):
        assert name in out
    assert main(["doctor", "--json"]) == 0
    import json

    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)["backends"]}
    assert rows["torch"]["available"] and rows["torch"]["version"] == torch.__version__
    for row in rows.values():
        assert row["available"] or row["reason"]


def test_a_missing_engine_is_a_doctor_reason_not_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STRATAPRUNE_CACHE", str(tmp_path / "empty-cache"))  # no deepsparse venv there
    import strataprune.plugins.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "engine_versions", lambda *p: {name: None for name in p})  # as if not installed
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "strataprune backends install deepsparse" in out and "pip install 'strataprune[deploy]'" in out
