"""The contracts every plugin implements: allocators, pruners, model adapters, datasets, backends.

A plugin is a class with a ``name``, a ``version`` and a small versioned ``Config`` dataclass of
its parameters (torchao-style). Recipes name plugins and give parameters; the host validates them
against ``Config`` (unknown keys and wrong types are errors) and constructs ``cls(config)``.

Statistics are never computed by plugins themselves: a plugin declares what it ``needs`` and the
calibration engine (core/calibration.py) computes each statistic once per block and per pass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from .errors import ConfigError
from .sparsity import Target

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch

#: statistics a plugin may ask the calibration engine for
#: - ``input_norms``: per prunable matrix, the L2 norm of each input column over all calibration tokens (Wanda's ||X_j||_2)
#: - ``hessian``: per prunable matrix, H = 2 X X^T / n in fp32 (SparseGPT's Hessian)
#: - ``block_inputs`` / ``block_outputs``: the hidden states entering / leaving the block, [samples, tokens, hidden]
STATISTICS = ("input_norms", "hessian", "block_inputs", "block_outputs")
#: what a model adapter's ``task`` may be: each has its own data and evaluation
TASKS = ("causal-lm", "image-classification", "image-embedding", "multimodal")


@dataclass
class NoConfig:
    """A plugin without parameters."""


class Plugin:
    """Common base: identity and configuration."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, where: str | None = None) -> Plugin:
        return cls(build_config(cls.Config, params or {}, where or f"{cls.kind} '{cls.name}'"))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}


# --------------------------------------------------------------------------- model structure
@dataclass(frozen=True)
class MatrixInfo:
    """One prunable weight matrix, always seen in (out_features, in_features) layout."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # index of its sequential block
    short: str  # name inside the block, e.g. "self_attn.q_proj"
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class ModelLayout:
    """The prunable matrices of a model, grouped into sequential blocks."""

    matrices: tuple[MatrixInfo, ...]
    num_blocks: int
    #: the stack every block belongs to: one name for a single-stack model ("decoder", "vision"), or one
    #: name per block for multimodal models (e.g. ("vision",) * 12 + ("text",) * 12); see ``stack_of``
    stack: str | tuple[str, ...] = "decoder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.matrices})

    def __getitem__(self, name: str) -> MatrixInfo:
        return self._by_name[name]  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matrices]

    def block(self, index: int) -> list[MatrixInfo]:
        return [m for m in self.matrices if m.block == index]

    def stack_of(self, block: int) -> str:
        """The stack block ``block`` (and so each of its matrices) belongs to."""
        return self.stack if isinstance(self.stack, str) else self.stack[block]

    @property
    def stacks(self) -> list[str]:
        """Stack names in block order, each once."""
        return list(dict.fromkeys(self.stack_of(b) for b in range(self.num_blocks)))

    def block_numel(self, index: int) -> int:
        return sum(m.numel for m in self.block(index))

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.matrices)


# --------------------------------------------------------------------------- statistics
@dataclass
class BlockStats:
    """What the calibration engine measured on one block (only the statistics that were asked for).

    Statistics are read-only: matrices fed the same input (q/k/v, gate/up) share ONE tensor in
    ``input_norms`` and ``hessians``, so an in-place edit would change their neighbours' too.
    """

    block: int
    matrices: list[MatrixInfo]
    weights: dict[str, torch.Tensor]  # name -> (out, in) view of the current weight
    ntokens: int = 0
    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    def for_matrix(self, name: str) -> MatrixStats:
        return MatrixStats(
            info=next(m for m in self.matrices if m.name == name),
            ntokens=self.ntokens,
            input_norms=self.input_norms.get(name),
            hessian=self.hessians.get(name),
        )


@dataclass
class MatrixStats:
    """Statistics of one matrix's inputs handed to a pruner."""

    info: MatrixInfo
    ntokens: int = 0
    input_norms: torch.Tensor | None = None  # (in,) fp32: ||X_j||_2
    hessian: torch.Tensor | None = None  # (in, in) fp32: 2 X X^T / n


# --------------------------------------------------------------------------- allocators
def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class AllocationContext:
    """Everything an allocator may use besides the statistics it observed."""

    layout: ModelLayout
    target: Target
    seed: int = 0
    pruner: str = "wanda"
    weights: Callable[[], Iterator[tuple[MatrixInfo, torch.Tensor]]] | None = None
    #: prune a copy with a candidate allocation and return held-out perplexity (lower is better);
    #: only set when the allocator declares ``searches = True``
    score: Callable[[Any], float] | None = None
    #: a cheaper ``score`` (same signature) for screening many candidates: the pruner's statistics come
    #: from one dense pass (half the calibration windows) reused by every call and a quarter of the
    #: selection windows are scored, so values are comparable with each other but not with ``score``;
    #: None when the host offers none
    screen: Callable[[Any], float] | None = None
    device: torch.device = field(default_factory=_cpu)
    cache_dir: Path | None = None
    #: content hash of the dense prunable weights (core/fingerprint.py); read it through ``fingerprint()``
    model_fingerprint: str = ""
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # lines the allocator wants in the report
    #: computes ``model_fingerprint`` on first use (the host sets it, so runs that need no key pay nothing)
    fingerprint_fn: Callable[[], str] | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """The weights' content fingerprint, computed at most once ("" when the host gave none)."""
        if not self.model_fingerprint and self.fingerprint_fn is not None:
            self.model_fingerprint = self.fingerprint_fn()
        return self.model_fingerprint


class Allocator(Plugin):
    """Decides a sparsity ratio for every prunable matrix, with a global parameter-weighted target.

    ``allocate`` may return an ``Allocation``, a mapping matrix-name -> ratio, or a sequence of
    per-block ratios (expanded to every matrix of the block). The host validates it: keys are the
    prunable matrices, ratios in [0, 1), and the mean its ``mean_rule`` names (default: the
    parameter-weighted mean; "block-mean" for the papers' unweighted block mean) equal to the target
    within 1e-3, plus 1/(2m) when it sets N:M patterns. Nothing in ``meta`` relaxes this.
    """

    kind: ClassVar[str] = "allocator"
    #: statistics wanted from a calibration pass over the *dense* model (see STATISTICS)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: whether ``allocate`` needs ``ctx.score`` (prune-and-evaluate trials)
    searches: ClassVar[bool] = False

    def observe_block(self, stats: BlockStats) -> None:
        """Called once per block, in order, during the dense pass; keep only reduced statistics."""

    def allocate(self, ctx: AllocationContext) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- pruners
@dataclass
class PruneResult:
    keep: torch.Tensor  # bool, same shape as the weight: True where the weight survives
    weight: torch.Tensor | None = None  # new weights (methods that update them), zeros where pruned
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"loss": float}, {"quant_grid": ...}


class Pruner(Plugin):
    """Chooses which weights of one matrix to remove (and, optionally, updates the survivors)."""

    kind: ClassVar[str] = "pruner"
    needs: ClassVar[frozenset[str]] = frozenset()
    updates_weights: ClassVar[bool] = False
    supports_nm: ClassVar[bool] = True

    @property
    def quantizes(self) -> bool:
        """Whether ``prune`` also quantizes the kept weights (it then returns ``extra["quant"]`` grids,
        which the host checks and saves, and reports perplexity against ``unquantized()``)."""
        return False

    def unquantized(self) -> Pruner:
        """The same pruner with quantization off: the sparse-only reference of a quantized run."""
        return self

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        raise NotImplementedError


# --------------------------------------------------------------------------- datasets
class Dataset(Plugin):
    """A named text source split into documents. Splits: 'train', 'validation', 'test' (as available).

    ``reference_protocol`` names how the papers turn this source into tokens (core/data.py:
    'wikitext2', 'c4', or 'documents', the default); ``rows`` gives the records exactly as the
    reference loader yields them (blank ones included), which the papers' protocols join.
    """

    kind: ClassVar[str] = "dataset"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    reference_protocol: str = "documents"

    def documents(self, split: str) -> list[str]:
        raise NotImplementedError

    def rows(self, split: str) -> list[str]:
        return self.documents(split)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


# --------------------------------------------------------------------------- model adapters
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    source: str
    description: dict[str, Any] = field(default_factory=dict)
    #: how inputs are prepared for non-text tasks (e.g. an ``images.ImageSpec``); None for language models
    processor: Any = None


@dataclass
class BlockInputs:
    """Hidden states entering the first block, and the extra arguments each block is called with."""

    hidden: torch.Tensor  # [samples, tokens, hidden] (any [samples, ...] shape for vision stacks)
    block_kwargs: list[dict[str, Any]]  # one per block (masks differ per block on e.g. Gemma-3)
    #: multi-stack models: at block b the hidden states restart from ``restarts[b]`` instead of the previous
    #: block's output (the first text block of CLIP); a callable is called when block b is reached, so it
    #: can recompute the stack's input from the already pruned stacks before it (LLaVA's language model)
    restarts: dict[int, torch.Tensor | Callable[[], torch.Tensor]] = field(default_factory=dict)


class ModelAdapter(Plugin):
    """Knows one family of model structures: sequential blocks and their prunable matrices.

    The host never reaches into a model itself: it asks the adapter for the blocks (run in order by
    the calibration engine), the prunable matrices (always seen as (out, in), whatever the storage,
    e.g. GPT-2's Conv1D), the inputs of block 0 and how to run one block. ``task`` tells the host
    which evaluation applies: "causal-lm" (token windows in, perplexity), "image-classification"
    (pixel batches in, accuracy), "multimodal" (several stacks, one after another, each matrix's
    stack named in ``ModelLayout.stack``/its block numbering). ``capture`` receives what the task's
    data gives: token ids [samples, tokens] for language models, pixel values for vision.
    """

    kind: ClassVar[str] = "adapter"
    task: ClassVar[str] = "causal-lm"
    #: models this adapter loads by name (no config.json), e.g. {"efficientnet-lite0": "pip install ..."}
    embedded: ClassVar[dict[str, str]] = {}

    def matches(self, config: Any) -> bool:
        raise NotImplementedError

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        raise NotImplementedError

    def load_empty(self, path: str, *, dtype: torch.dtype) -> LoadedModel:
        """The model built from its config on the meta device, no weights read, with its tokenizer
        (``model.offload`` then reads each block from the checkpoint when needed). Adapters that
        cannot do this leave it unimplemented and offloading is refused for their models."""
        raise NotImplementedError

    def bos_per_window(self, model: torch.nn.Module) -> bool:
        """Whether every evaluation window must start with BOS (Gemma: ppl 41 without, 17 with)."""
        return False

    def blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        raise NotImplementedError

    def prunable(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Full module name -> module, for every prunable matrix, in block order."""
        raise NotImplementedError

    def layout(self, model: torch.nn.Module) -> ModelLayout:
        raise NotImplementedError

    def as_matrix(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """A tensor stored like ``module.weight``, seen as (out, in) (e.g. GPT-2's Conv1D stores (in, out))."""
        return weight

    def get_weight(self, module: torch.nn.Module) -> torch.Tensor:
        return self.as_matrix(module, module.weight.data)

    def set_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        module.weight.data.copy_(weight)

    def capture(self, model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> BlockInputs:
        raise NotImplementedError

    def run_block(self, block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    # -- optional, with defaults that fit language models (vision adapters override them) --
    def matrix_inputs(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One prunable module's input as rows [tokens, in_features] matching ``get_weight``'s columns.

        The calibration engine computes ``input_norms`` and ``hessian`` from these rows. Default: the
        last dimension is the feature (Linear); a convolution returns its unfolded (im2col) patches.
        """
        return x.reshape(-1, x.shape[-1])

    def unavailable_statistics(self, model: torch.nn.Module) -> dict[str, str]:
        """Statistics (``STATISTICS``) this model cannot provide, each with the reason; checked before any work."""
        return {}

    def encode(self, loaded: LoadedModel, batch: Any) -> Any:
        """Model inputs for a batch of the task's data (``capture`` and ``predict`` take them)."""
        raise NotImplementedError(f"adapter '{self.name}' has no task data encoder")

    def predict(self, loaded: LoadedModel, inputs: Any) -> dict[str, torch.Tensor]:
        """The outputs the task's evaluation compares (see the class docstring)."""
        raise NotImplementedError(f"adapter '{self.name}' has no task predictions")

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        """Write the (pruned) model so that ``load`` reads it back."""
        loaded.model.save_pretrained(folder)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- backends
#: the version of the Backend contract below; a backend states the one it was written for in ``contract``
#: (1: available/prepare only; 2: generation with a KV cache, timing, parity tolerance, settings)
BACKEND_CONTRACT = 2


@dataclass
class BackendAvailability:
    ok: bool
    reason: str = ""  # why not, and how to get it (e.g. "needs CUDA" or "pip install 'strataprune[deploy]'")
    version: str = ""  # the engine's version, when it can be found (also when it cannot run)


@dataclass
class DeploySettings:
    """What ``prepare`` may fix at compile time: fixed-shape engines compile for exactly these shapes."""

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32  # tokens generated after the prompt (decode steps)
    threads: int | None = None  # compute threads of the engine; None = the engine's default

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.new_tokens


class CompiledModel:
    """A causal language model ready on one engine, with a KV cache between calls.

    Token ids are int64 numpy arrays ``[batch, tokens]``; logits come back as float32 numpy
    ``[batch, tokens, vocab]``; ``state`` is whatever the engine keeps between calls (its KV cache).
    An engine implements ``prefill`` and ``decode``; ``greedy`` and the timing methods follow from
    them, and an engine that runs out of process overrides the timing methods so that the clock
    runs where the work is (no inter-process copies in the figures).
    """

    def __init__(self, backend: str, artifact: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.artifact = artifact  # the file the engine runs (e.g. model.onnx), None when it runs the checkpoint
        self.meta: dict[str, Any] = dict(meta or {})  # format, sizes, notes ...

    def prefill(self, input_ids: Any) -> tuple[Any, Any]:
        """Process a prompt: (logits [batch, tokens, vocab], state)."""
        raise NotImplementedError

    def decode(self, token_ids: Any, state: Any) -> tuple[Any, Any]:
        """One step of generation: ``token_ids`` [batch, 1] after ``state`` -> (logits [batch, 1, vocab], new state)."""
        raise NotImplementedError

    def greedy(self, input_ids: Any, steps: int) -> Any:
        """The ``steps`` tokens that greedy decoding appends to the prompt, [batch, steps] int64."""
        import numpy as np

        logits, state = self.prefill(input_ids)
        tokens = []
        for step in range(steps):
            token = np.asarray(logits)[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            tokens.append(token)
            if step + 1 < steps:
                logits, state = self.decode(token, state)
        return np.concatenate(tokens, axis=1)

    def time_prefill(self, input_ids: Any, warmup: int, repeats: int) -> list[float]:
        """Seconds of each timed ``prefill`` of ``input_ids`` (after ``warmup`` untimed calls)."""
        import time

        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            self.prefill(input_ids)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times

    def time_decode(self, input_ids: Any, tokens: int, warmup: int, repeats: int) -> list[float]:
        """Seconds per generated token of each timed repetition: prefill ``input_ids`` (untimed), then
        ``tokens`` greedy decode steps with the KV cache (timed, divided by ``tokens``)."""
        import time

        import numpy as np

        times = []
        for i in range(warmup + repeats):
            logits, state = self.prefill(input_ids)
            start = time.perf_counter()
            for _ in range(tokens):
                token = np.asarray(logits)[:, -1, :].argmax(-1).astype(np.int64)[:, None]
                logits, state = self.decode(token, state)
            if i >= warmup:
                times.append((time.perf_counter() - start) / tokens)
        return times

    def close(self) -> None:
        """Free the engine's memory (sessions, worker processes)."""


class Backend(Plugin):
    """An inference engine that runs a pruned model, measured end to end against its dense twin.

    The contract (version ``BACKEND_CONTRACT`` = 2; a backend sets ``contract`` to the version it
    implements, and the host refuses versions it does not know):

    - ``available()``: whether the engine can run here, and if not why and how to get it, with the
      engine's version; it must not import the engine at ``import strataprune`` time (engines load
      lazily, inside these methods) and must never raise.
    - ``prepare(model_dir, workdir, settings) -> CompiledModel``: export/compile a saved causal LM
      (the output folder of ``strataprune run`` or ``strataprune deploy``; the weights may be
      dense safetensors or the sparse-bitmask format, see ``strataprune.deploy.storage``) for the
      engine, writing whatever it needs under ``workdir``; ``settings`` fixes batch, prompt
      length, generated tokens and threads.
    - ``reference()``: the backend whose logits this one must reproduce (``parity_tolerance``:
      largest allowed |logit difference| / max(1, largest |reference logit|)); by default PyTorch
      eager fp32 on CPU.
    - ``devices``: where it runs ("cpu", "cuda"); ``sparse_formats``: what it turns into speed
      ("unstructured", "2:4", "int4"), empty for a dense engine (the verdict says so);
      ``fixed_shapes``: prepared per prompt length (the host prepares once per length it times).
    """

    kind: ClassVar[str] = "backend"
    contract: ClassVar[int] = BACKEND_CONTRACT
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    sparse_formats: ClassVar[tuple[str, ...]] = ()
    parity_tolerance: ClassVar[float] = 1e-3
    #: True when a prepared model runs only the batch and prompt length it was prepared for
    fixed_shapes: ClassVar[bool] = False

    def available(self) -> BackendAvailability:
        return BackendAvailability(True)

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        raise NotImplementedError

    def reference(self) -> Backend | None:
        """The backend this one's parity is checked against (None: it is the reference itself)."""
        from strataprune.backends.torch import TorchBackend

        return TorchBackend()

    def label(self) -> str:
        """The name shown in reports: the plugin name plus any non-default parameter."""
        defaults = self.Config() if dataclasses.is_dataclass(self.Config) else None
        changed = [f"{k}={v}" for k, v in self.params().items() if defaults is None or getattr(defaults, k, None) != v]
        return self.name + (":" + ":".join(changed) if changed else "")


# --------------------------------------------------------------------------- config building
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def build_config(config_cls: type, params: Mapping[str, Any], where: str) -> Any:
    """Construct a Config dataclass from recipe parameters, with errors naming key, value and what is allowed."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping, got {params!r}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in params.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(no parameters)"
            from .errors import did_you_mean

            raise ConfigError(f"{where}: unknown parameter '{key}'{did_you_mean(key, fields)}; allowed: {allowed}")
        hint = hints.get(key, Any)
        if not _type_ok(value, hint):
            raise ConfigError(f"{where}: {key}={value!r} must be {_describe(hint)}")
    try:
        return config_cls(**{k: (float(v) if hints.get(k) is float else v) for k, v in params.items()})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
