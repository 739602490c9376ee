"""Pruner quality on the real SmolLM2-135M with real BBC calibration activations, and the shared pruner checks."""

from __future__ import annotations

import pytest
import torch
from support import requires_real

from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import Target, nm_violations
from strataprune.plugins.pruners.magnitude import Magnitude
from strataprune.plugins.pruners.sparsegpt import SparseGPT
from strataprune.plugins.pruners.wanda import Wanda

LAYERS = ("model.layers.10.mlp.down_proj", "model.layers.4.self_attn.q_proj")


@pytest.fixture(scope="module")
def real_inputs(smollm2, bbc_windows):
    """Calibration inputs X (tokens, d_in) of two real matrices, from the dense model on 8 x 256 BBC tokens."""
    calib, _ = bbc_windows
    modules = dict(smollm2.model.named_modules())
    captured = {name: [] for name in LAYERS}
    handles = [
        modules[name].register_forward_hook(lambda m, a, o, n=name: captured[n].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for name in LAYERS
    ]
    try:
        with torch.no_grad():
            for row in calib:
                smollm2.model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (modules[name].weight.detach().clone(), torch.cat(xs).float()) for name, xs in captured.items()}


def output_error(W: torch.Tensor, Wp: torch.Tensor, X: torch.Tensor) -> float:
    """Relative layer-output reconstruction error ||(W - W') X^T|| / ||W X^T||."""
    return float(((W - Wp) @ X.T).norm() / (W @ X.T).norm())


@requires_real
@pytest.mark.real_model
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("layer", LAYERS)
def test_reconstruction_sparsegpt_beats_wanda_beats_magnitude(real_inputs, layer, sparsity):
    W, X = real_inputs[layer]
    target = Target.of(pattern=sparsity) if ":" in sparsity else Target.of(float(sparsity))
    info = MatrixInfo(layer, int(layer.split(".")[2]), layer.split(".", 3)[3], tuple(W.shape))
    stats = MatrixStats(info, X.shape[0], X.norm(dim=0), 2 * X.T @ X / X.shape[0])
    errors, keeps = {}, {}
    for pruner in (Magnitude(), Wanda(), SparseGPT()):
        result = pruner.prune(W, target, stats)
        new = result.weight if result.weight is not None else W * result.keep
        errors[pruner.name], keeps[pruner.name] = output_error(W, new, X), result.keep
        assert bool((new[~result.keep] == 0).all())
    print(f"\n{layer} {sparsity}: " + "  ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    # exact masks: counts as each pruner's comparison group dictates
    rows, cols = W.shape
    if target.pattern is not None:
        for keep in keeps.values():
            assert nm_violations(keep, target.pattern) == 0 and int(keep.sum()) == W.numel() // 2
    else:
        assert int((~keeps["magnitude"]).sum()) == int(W.numel() * 0.5)
        assert bool(((~keeps["wanda"]).sum(dim=1) == int(cols * 0.5)).all())
        assert int((~keeps["sparsegpt"]).sum()) == sum(int(rows * min(128, cols - i) * 0.5) for i in range(0, cols, 128))


@pytest.mark.parametrize("cls", [Magnitude, Wanda, SparseGPT])
def test_builtin_pruners_pass_the_shared_checks(cls):
    from strataprune.testing import check_pruner

    check_pruner(cls)
