"""Contract checks for plugin authors: call them from your own tests.

    from strataprune.testing import check_allocator, check_pruner

    def test_my_allocator():
        check_allocator(MyAllocator)                 # or an instance, or (MyAllocator, {"param": 1})

    def test_my_pruner():
        check_pruner(MyPruner)

    def test_my_recovery(tmp_path):
        check_recovery((MyRecovery, {"steps": 4}), workdir=tmp_path)   # a whole run on a tiny random Llama

Each check builds a small random problem (a layout of mixed-shape matrices in a few blocks, the
statistics the plugin declares it ``needs``), runs the plugin the way the host runs it, and raises
``AssertionError`` with a message naming the broken rule. strataprune's own tests run them on every
built-in. ``check_adapter`` checks a model adapter on a model you provide; ``check_backend`` checks an
inference backend on a saved (tiny) model folder you provide, parity against PyTorch included;
``check_recovery`` runs the whole pipeline with the recovery on a tiny random Llama (built on the fly)
and checks the model it saves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.allocation import MEAN_TOLERANCE, Allocation
from strataprune.contract.allocator import AllocationContext, Allocator, CandidateHost
from strataprune.contract.base import Plugin
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.pruner import Pruner
from strataprune.contract.sparsity import Target, block_violations, nm_violations, realised_matches

__all__ = [
    "check_allocator",
    "check_pruner",
    "check_adapter",
    "check_recovery",
    "random_layout",
    "random_block_stats",
    "synthetic_candidates",
    "tiny_llama_dir",
    "byte_level_tokenizer",
]

#: a few blocks of unequal size, like a decoder with attention and MLP matrices of several shapes
DEFAULT_SHAPES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("self_attn.q_proj", (32, 32)),
    ("self_attn.k_proj", (16, 32)),
    ("self_attn.v_proj", (16, 32)),
    ("self_attn.o_proj", (32, 32)),
    ("mlp.gate_proj", (64, 32)),
    ("mlp.up_proj", (64, 32)),
    ("mlp.down_proj", (32, 64)),
)


def _instantiate(plugin: Any, base: type[Plugin]) -> Plugin:
    if isinstance(plugin, tuple):
        cls, params = plugin
        return cls.from_params(params)
    if isinstance(plugin, type):
        if not issubclass(plugin, base):
            raise AssertionError(f"{plugin!r} is not a subclass of strataprune.{base.__name__}")
        return plugin.from_params({})
    if not isinstance(plugin, base):
        raise AssertionError(f"{plugin!r} is not a strataprune.{base.__name__}")
    return plugin


def random_layout(num_blocks: int = 6, shapes: Sequence[tuple[str, tuple[int, int]]] = DEFAULT_SHAPES) -> ModelLayout:
    """``num_blocks`` blocks of the given matrices; the last block has a wider MLP so blocks differ in size."""
    matrices = []
    for block in range(num_blocks):
        for short, (rows, cols) in shapes:
            if block == num_blocks - 1 and short.startswith("mlp."):
                rows, cols = (rows * 2, cols) if short != "mlp.down_proj" else (rows, cols * 2)
            matrices.append(MatrixInfo(f"model.layers.{block}.{short}", block, short, (rows, cols)))
    return ModelLayout(tuple(matrices), num_blocks)


def random_block_stats(
    layout: ModelLayout, needs: Iterable[str], seed: int = 0, samples: int = 4, tokens: int = 16
) -> list[BlockStats]:
    """Per block: random weights and whatever statistics ``needs`` names, with the right shapes.

    Inputs have channels of very different scale (as real activations do), so scores are not flat.
    """
    needs = set(needs)
    g = torch.Generator().manual_seed(seed)
    hidden = max(m.shape[1] for m in layout.block(0))
    out = []
    state = torch.randn(samples, tokens, hidden, generator=g)
    for block in range(layout.num_blocks):
        mats = layout.block(block)
        weights = {m.name: torch.randn(m.shape, generator=g) * (1.0 + 0.1 * block) for m in mats}
        stats = BlockStats(block, mats, weights, ntokens=samples * tokens)
        for m in mats:
            x = torch.randn(samples * tokens, m.shape[1], generator=g) * torch.linspace(0.2, 3.0, m.shape[1])
            x[:, torch.randint(0, m.shape[1], (2,), generator=g)] *= 10.0  # outlier channels
            if "input_norms" in needs:
                stats.input_norms[m.name] = x.norm(dim=0)
            if "input_means" in needs:
                stats.input_means[m.name] = x.mean(dim=0)
            if "hessian" in needs:
                stats.hessians[m.name] = 2.0 * x.T @ x / x.shape[0]
        if "block_inputs" in needs:
            stats.inputs = state
        next_state = state + 0.5 * torch.randn(state.shape, generator=g) * (block + 1) / layout.num_blocks
        if "block_outputs" in needs:
            stats.outputs = next_state
        state = next_state
        out.append(stats)
    return out


def synthetic_candidates(layout: ModelLayout, weights: dict[str, torch.Tensor], seed: int = 0, vocab: int = 24) -> CandidateHost:
    """A ``CandidateHost`` over a toy "model" of the given weights, for allocators that assemble candidates.

    Pruning is magnitude per row; the logits of token t are a fixed embedding of t plus, per matrix, a
    fixed direction scaled by <W, R> (R a fixed random matrix), so pruning moves the distribution and
    matrices differ in how much it matters.
    """
    g = torch.Generator().manual_seed(seed + 1)
    embedding = torch.randn(vocab, vocab, generator=g)
    probes = {info.name: torch.randn(info.shape, generator=g) / info.numel**0.5 for info in layout.matrices}
    directions = {info.name: torch.randn(vocab, generator=g) for info in layout.matrices}
    installed = dict(weights)
    ids = torch.randint(0, vocab, (4, 16), generator=g)

    def prune_levels(ratios, visit):  # type: ignore[no-untyped-def]
        for info in layout.matrices:
            weight = weights[info.name]
            for level, ratio in enumerate(ratios[info.name]):
                k = int(weight.shape[1] * ratio)
                keep = torch.ones_like(weight, dtype=torch.bool)
                if k:
                    keep.scatter_(1, weight.abs().argsort(dim=1)[:, :k], False)
                visit(info, level, keep, None)

    def logits(window: torch.Tensor) -> torch.Tensor:
        shift = sum(directions[n] * float((installed[n] * probes[n]).sum()) for n in installed)
        return embedding[window.reshape(-1)] + shift

    def set_weight(name: str, weight: torch.Tensor) -> None:
        installed[name] = weight

    return CandidateHost(
        prune_levels=prune_levels,
        windows=lambda on: ids,
        logits=logits,
        set_weight=set_weight,
        restore=lambda: installed.update(weights),
    )


def _context(
    layout: ModelLayout, target: Target, block_stats: list[BlockStats], seed: int, searches: bool, assembles: bool = False
) -> AllocationContext:
    weights = {name: w for stats in block_stats for name, w in stats.weights.items()}

    def iterate_weights():  # type: ignore[no-untyped-def]
        for info in layout.matrices:
            yield info, weights[info.name]

    def score(allocation: Any, on: str = "validation") -> float:
        # a stand-in for held-out perplexity: lower when deeper blocks take more of the sparsity
        alloc = Allocation.coerce(allocation, layout, target.ratio, "trial")
        alloc.validate(layout)
        profile = alloc.block_profile(layout)
        slope = profile[-1] - profile[0]
        return 10.0 + (slope - 0.1) ** 2

    return AllocationContext(
        layout=layout,
        target=target,
        seed=seed,
        weights=iterate_weights,
        score=score if searches else None,
        candidates=synthetic_candidates(layout, weights, seed) if assembles else None,
        cache_dir=None,
        model_fingerprint=f"testing-{seed}",
        progress=False,
    )


def _run_allocator(allocator: Allocator, layout: ModelLayout, target: Target, seed: int) -> Allocation:
    block_stats = random_block_stats(layout, allocator.needs, seed=seed)
    if allocator.needs:
        for stats in block_stats:
            allocator.observe_block(stats)
    ctx = _context(layout, target, block_stats, seed, allocator.searches, allocator.assembles)
    raw = allocator.allocate(ctx)
    allocation = Allocation.coerce(raw, layout, target.ratio, allocator.name)
    return allocation


def check_allocator(
    allocator: Any,
    *,
    targets: Sequence[float] = (0.3, 0.5, 0.7),
    layout: ModelLayout | None = None,
    seed: int = 0,
) -> Allocation:
    """Run an allocator on a random layout at several targets and check the host's rules.

    Rules: keys are exactly the prunable matrices; every ratio is a float in [0, 1); the
    parameter-weighted mean equals the target within 1e-3; the same seed gives the same
    allocation; the allocation survives a JSON round trip. Returns the allocation at the last target.
    """
    proto = _instantiate(allocator, Allocator)
    assert isinstance(proto, Allocator)
    assert proto.name, "an allocator needs a non-empty `name`"
    layout = layout or random_layout()
    last: Allocation | None = None
    for ratio in targets:
        target = Target.of(ratio)
        first = _run_allocator(type(proto)(proto.config), layout, target, seed)
        try:
            first.validate(layout, MEAN_TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - turn the host's error into the assertion a test shows
            raise AssertionError(f"allocator '{proto.name}' at target {ratio}: {exc}") from exc
        mean = first.weighted_mean(layout)
        assert abs(mean - ratio) <= MEAN_TOLERANCE, f"allocator '{proto.name}': weighted mean {mean:.5f} != target {ratio}"
        second = _run_allocator(type(proto)(proto.config), layout, target, seed)
        assert first.ratios == second.ratios, f"allocator '{proto.name}' is not deterministic for a fixed seed at {ratio}"
        restored = Allocation.from_dict(json.loads(json.dumps(first.to_dict(layout), default=str)))
        assert restored.ratios == first.ratios, f"allocator '{proto.name}': allocation does not survive a JSON round trip"
        last = first
    assert last is not None
    return last


def check_pruner(
    pruner: Any,
    *,
    ratios: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.9),
    patterns: Sequence[str] = ("2:4", "4:8", "1:4"),
    shape: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> None:
    """Prune random matrices at several ratios and N:M patterns and check the host's rules.

    Rules: the mask is a bool tensor of the weight's shape; realised sparsity is the asked ratio up
    to one weight per row (row flooring) or per block of columns; returned weights (if any) are
    finite, zero wherever the mask prunes, and of the weight's shape; N:M masks keep at most n of
    every m consecutive inputs of each row; a pruner with a ``block_shape`` other than 1x1 keeps or
    removes every tile of that shape whole; the input weight is not modified in place.
    """
    instance = _instantiate(pruner, Pruner)
    assert isinstance(instance, Pruner)
    assert instance.name, "a pruner needs a non-empty `name`"
    layout = ModelLayout((MatrixInfo("model.layers.0.mlp.up_proj", 0, "mlp.up_proj", shape),), 1)
    stats = random_block_stats(layout, {"input_norms", "input_means", "hessian"}, seed=seed)[0]
    info = layout.matrices[0]
    weight = stats.weights[info.name]
    matrix_stats = stats.for_matrix(info.name)
    targets = [Target.of(r) for r in ratios]
    if instance.supports_nm:
        targets += [Target.of(pattern=p) for p in patterns]
    for target in targets:
        before = weight.clone()
        result = instance.prune(weight, target, matrix_stats)
        who = f"pruner '{instance.name}' at {target}"
        assert torch.equal(weight, before), f"{who} modified the input weight in place"
        keep = result.keep
        assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool, f"{who}: keep must be a bool tensor"
        assert tuple(keep.shape) == shape, f"{who}: keep has shape {tuple(keep.shape)}, expected {shape}"
        realised = 1.0 - float(keep.sum()) / keep.numel()
        if target.pattern is not None:
            bad = nm_violations(keep, target.pattern)
            assert bad == 0, f"{who}: {bad} groups of {target.pattern.m} keep more than {target.pattern.n}"
            assert abs(realised - target.pattern.sparsity) < 1e-9, (
                f"{who}: realised {realised:.4f}, expected exactly {target.ratio}"
            )
        else:
            tile = instance.block_shape.size / keep.numel()
            assert realised_matches(realised, target.ratio, shape[1], tile), f"{who}: realised sparsity {realised:.4f}"
        if not instance.block_shape.unit:
            broken = block_violations(keep, instance.block_shape)
            assert broken == 0, f"{who}: {broken} tiles of {instance.block_shape} are partly kept"
        if result.weight is not None:
            new = result.weight
            assert tuple(new.shape) == shape, f"{who}: returned weight has shape {tuple(new.shape)}"
            assert bool(torch.isfinite(new).all()), f"{who}: returned weight is not finite"
            assert not bool((new[~keep] != 0).any()), f"{who}: returned weight is nonzero where the mask prunes"
        again = instance.prune(weight, target, matrix_stats)
        assert torch.equal(again.keep, keep), f"{who} is not deterministic"


def check_adapter(adapter: Any, model: torch.nn.Module, input_ids: torch.Tensor | None = None) -> ModelLayout:
    """Check a model adapter on a model: layout, weights, capture and run_block agree with the model.

    Rules: ``layout`` lists exactly the modules of ``prunable`` in block order, with the shapes
    ``get_weight`` returns; ``set_weight`` round-trips; running the captured block-0 inputs through
    every block with ``run_block`` reproduces the hidden states the full model computes.
    """
    instance = _instantiate(adapter, ModelAdapter)
    assert isinstance(instance, ModelAdapter)
    assert instance.matches(model.config), f"adapter '{instance.name}' does not match {type(model).__name__}"
    blocks = instance.blocks(model)
    layout = instance.layout(model)
    modules = instance.prunable(model)
    assert layout.num_blocks == len(blocks) > 0, "layout.num_blocks must equal the number of blocks"
    assert list(modules) == layout.names, "prunable() and layout() must list the same matrices in the same order"
    assert [m.block for m in layout.matrices] == sorted(m.block for m in layout.matrices), "matrices must be in block order"
    for info in layout.matrices:
        weight = instance.get_weight(modules[info.name])
        assert tuple(weight.shape) == info.shape, f"{info.name}: layout shape {info.shape} != weight {tuple(weight.shape)}"
        original = weight.clone()
        instance.set_weight(modules[info.name], original * 2)
        assert torch.allclose(instance.get_weight(modules[info.name]), original * 2), (
            f"{info.name}: set_weight does not round-trip"
        )
        instance.set_weight(modules[info.name], original)
    vocab = getattr(model.config, "vocab_size", 100)
    ids = (
        input_ids
        if input_ids is not None
        else torch.randint(0, min(vocab, 200), (2, 12), generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        captured = instance.capture(model, ids)
        assert tuple(captured.hidden.shape[:2]) == tuple(ids.shape), "captured block-0 inputs must be [samples, tokens, hidden]"
        assert len(captured.block_kwargs) == len(blocks), "capture() must record call arguments for every block"
        reference = _block_outputs(model, blocks, ids)
        for sample in range(ids.shape[0]):
            hidden = captured.hidden[sample : sample + 1]
            for index, block in enumerate(blocks):
                hidden = instance.run_block(block, hidden, captured.block_kwargs[index])
            expected = reference[sample]
            assert torch.allclose(hidden[0], expected, atol=1e-4, rtol=1e-4), (
                f"adapter '{instance.name}': run_block over all blocks does not reproduce the model's hidden states"
            )
    return layout


def _block_outputs(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], ids: torch.Tensor) -> list[torch.Tensor]:
    """The last block's output for each sample, from a normal forward pass."""
    outputs: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        outputs.append((out[0] if isinstance(out, (tuple, list)) else out)[0].detach().clone())

    handle = blocks[-1].register_forward_hook(hook)
    try:
        for sample in range(ids.shape[0]):
            model(ids[sample : sample + 1], use_cache=False)
    finally:
        handle.remove()
    return outputs


def check_backend(backend: Any, model_dir: Any, workdir: Any, *, prompt_len: int = 16, steps: int = 3) -> dict[str, Any]:
    """Contract checks of a Backend on a saved causal LM (e.g. a tiny random Llama from ``save_pretrained``).

    Checks: the contract version, ``available()`` (never raises; a reason when not ok), ``prepare``
    returns a CompiledModel whose prefill/decode give logits of the right shapes, parity with the
    backend's reference within its ``parity_tolerance`` (logits and greedy tokens), and the timing
    methods. Returns the parity figures. Skips nothing itself: call it only where ``available().ok``.
    """
    from pathlib import Path

    import numpy as np

    from strataprune.contract.backend import BACKEND_CONTRACT, Backend, BackendAvailability, CompiledModel, DeploySettings

    from .deploy.parity import check_parity, reference_backend, reference_outputs

    backend = _instantiate(backend, Backend)
    assert backend.contract == BACKEND_CONTRACT, f"{backend.name}: contract {backend.contract}, host speaks {BACKEND_CONTRACT}"
    state = backend.available()
    assert isinstance(state, BackendAvailability) and (state.ok or state.reason), f"{backend.name}: available() must say why not"
    assert state.ok, f"{backend.name} is not available here: {state.reason}"
    settings = DeploySettings(batch=1, prompt_len=prompt_len, new_tokens=steps, threads=1)
    ids = np.random.default_rng(0).integers(0, 32, size=(1, prompt_len), dtype=np.int64)
    compiled = backend.prepare(Path(model_dir), Path(workdir) / "backend", settings)
    try:
        assert isinstance(compiled, CompiledModel), f"{backend.name}: prepare() must return a CompiledModel"
        logits, state_ = compiled.prefill(ids)
        assert np.asarray(logits).shape[:2] == (1, prompt_len), f"{backend.name}: prefill logits {np.asarray(logits).shape}"
        step, _ = compiled.decode(np.asarray(logits)[:, -1:].argmax(-1).astype(np.int64), state_)
        assert np.asarray(step).shape[:2] == (1, 1), f"{backend.name}: decode logits {np.asarray(step).shape}"
        reference = reference_backend(backend)
        parity: dict[str, Any] = {"reference": "itself"}
        if reference is not None:
            ref_model = reference.prepare(Path(model_dir), Path(workdir) / "reference", settings)
            try:
                ref = reference_outputs(ref_model, ids, steps)
            finally:
                ref_model.close()
            parity = {**check_parity(compiled, ref, backend.parity_tolerance, backend.name), "reference": reference.label()}
        assert all(t > 0 for t in compiled.time_prefill(ids, 0, 2)) and all(t > 0 for t in compiled.time_decode(ids, 2, 0, 2))
    finally:
        compiled.close()
    return parity


# --------------------------------------------------------------------------- tiny models and text
def byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: every id is below 256, so it fits any tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="!", eos_token="!")


def tiny_llama_dir(folder: Any, seed: int = 0) -> Any:
    """A tiny random Llama (3 blocks, hidden 64) with a byte-level tokenizer, saved to ``folder``."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _random_text(path: Any, seed: int) -> Any:
    words = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()
    g = torch.Generator().manual_seed(seed)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g)) for _ in range(200)]
    path.write_text("\n".join(lines))
    return path


def check_recovery(recovery: Any, *, workdir: Any = None, sparsity: float = 0.5, model_dir: Any = None) -> dict[str, Any]:
    """Run strataprune with the recovery on a tiny model and check the saved model. Returns the report.

    Rules: the run succeeds and its report has a ``recovery`` section with finite losses and
    perplexities; the saved model loads with transformers and has exactly the dense model's
    parameter names and shapes (no adapter left, no extra parameter); every prunable matrix holds
    exactly as many zeros as the report's realised sparsity says, and that sparsity matches the
    saved ``allocation.json`` (to one weight per row); a recovery that starts from the pruned model
    keeps every weight the run pruned at zero; the same run twice gives the same weights; the loss
    curve ``recovery_loss.png`` is written when there was training. Training text defaults to a
    random text file (parameter ``data``) when the recovery's Config has that parameter.
    """
    import dataclasses
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from strataprune.contract.recovery import Recovery
    from strataprune.contract.registry import Registry, get_registry
    from strataprune.engine.pipeline import Pipeline
    from strataprune.engine.recipe import recipe_from_dict

    if isinstance(recovery, tuple):
        cls, params = recovery
    elif isinstance(recovery, type):
        cls, params = recovery, {}
    elif isinstance(recovery, Recovery):
        cls, params = type(recovery), recovery.params()
    else:
        raise AssertionError(f"{recovery!r} is not a strataprune.Recovery (class, instance or (class, params))")
    assert isinstance(cls, type) and issubclass(cls, Recovery), f"{cls!r} is not a subclass of strataprune.Recovery"
    assert cls.name, "a recovery needs a non-empty `name`"
    registry = get_registry()
    if cls.name not in registry.names("recovery") or registry.get("recovery", cls.name) is not cls:
        registry = Registry()
        if cls.name in registry.names("recovery") and registry.get("recovery", cls.name) is not cls:
            raise AssertionError(f"recovery name '{cls.name}' is already registered by another class")
        if cls.name not in registry.names("recovery"):
            registry.add("recovery", cls, provided_by="check_recovery")
    own = tempfile.TemporaryDirectory(prefix="check-recovery-") if workdir is None else None
    root = Path(own.name if own is not None else workdir)
    try:
        model_dir = Path(model_dir) if model_dir is not None else tiny_llama_dir(root / "model")
        train, evaluation = _random_text(root / "train.txt", 1), _random_text(root / "eval.txt", 2)
        params = dict(params)
        if "data" in {f.name for f in dataclasses.fields(cls.Config)} and "data" not in params:
            params["data"] = str(train)

        def run(out: str, with_recovery: bool) -> dict[str, Any]:
            recipe = recipe_from_dict(
                {
                    "model": str(model_dir),
                    "sparsity": sparsity,
                    "output_dir": str(root / out),
                    "calibration": {"source": str(train), "nsamples": 4, "seqlen": 32},
                    "evaluation": {"source": str(evaluation), "seqlen": 32, "max_windows": 4, "dense": False},
                    "recovery": {"name": cls.name, **params} if with_recovery else None,
                }
            )
            return Pipeline(recipe, registry=registry, show_progress=False, log=lambda _msg: None).run(root / out).report

        report = run("recovered", True)
        who = f"recovery '{cls.name}'"
        section = report.get("recovery")
        assert isinstance(section, dict) and section.get("name") == cls.name, f"{who}: report.json has no recovery section"
        for entry in section.get("history", []):
            assert math.isfinite(entry["loss"]), f"{who}: non-finite training loss {entry}"
        assert math.isfinite(report["perplexity"]["sparse"]["ppl"]), f"{who}: the recovered perplexity is not finite"
        if section.get("history"):
            assert (root / "recovered" / "recovery_loss.png").is_file(), f"{who}: no recovery_loss.png in the output"

        dense = AutoModelForCausalLM.from_pretrained(model_dir)
        saved = AutoModelForCausalLM.from_pretrained(root / "recovered")
        shapes = {n: tuple(p.shape) for n, p in saved.state_dict().items()}
        assert shapes == {n: tuple(p.shape) for n, p in dense.state_dict().items()}, (
            f"{who}: the saved model's parameters differ from the dense model's (an adapter or extra parameter was saved)"
        )
        allocation = json.loads((root / "recovered" / "allocation.json").read_text())
        realised = report["sparsity"]["per_matrix"]
        weights = saved.state_dict()
        for name, ratio in allocation["ratios"].items():
            weight = weights[f"{name}.weight"]
            zeros = int((weight == 0).sum())
            assert zeros == round(realised[name] * weight.numel()), (
                f"{who}: {name} holds {zeros} zeros but the report says sparsity {realised[name]:.6f}"
            )
            slack = 1.0 / weight.shape[1] + 1e-3
            assert ratio - slack <= zeros / weight.numel() <= ratio + slack, (
                f"{who}: {name} has sparsity {zeros / weight.numel():.4f}, its final allocation says {ratio:.4f}"
            )
        if cls.starts_from == "pruned":
            run("pruned", False)
            pruned = AutoModelForCausalLM.from_pretrained(root / "pruned").state_dict()
            for name in allocation["ratios"]:
                revived = int(((pruned[f"{name}.weight"] == 0) & (weights[f"{name}.weight"] != 0)).sum())
                assert revived == 0, f"{who} revived {revived} pruned weights of {name}"
        run("again", True)
        again = AutoModelForCausalLM.from_pretrained(root / "again").state_dict()
        assert all(torch.equal(again[n], weights[n]) for n in weights), (
            f"{who} is not deterministic: the same run gave other weights"
        )
        return report
    finally:
        if own is not None:
            own.cleanup()
