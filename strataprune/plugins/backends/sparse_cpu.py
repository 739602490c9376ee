"""sparse-cpu backend: pruned Linears on strataprune's own CPU sparse kernels (strataprune/kernels), the rest in PyTorch.

    strataprune bench RUN_DIR --backends onnxruntime,torch,sparse-cpu --threads 2
    strataprune bench RUN_DIR --backends sparse-cpu:min_sparsity=0.6:isa=avx2
    strataprune deploy RUN_DIR --backend sparse-cpu --output deployed/      # deployed/sparse-cpu/ is the packed model
    strataprune bench RUN_DIR --backends onnxruntime,sparse-cpu,sparse-cpu:bits=8,sparse-cpu:bits=4
    strataprune bench RUN_DIR --backends sparse-cpu:bits=4:lm_head=int8,sparse-cpu:bits=4:engine=eager

    from strataprune.plugins.backends.sparse_cpu import load_packed_model
    model = load_packed_model("deployed/sparse-cpu")   # a transformers model whose pruned Linears are SparseLinear
    model.generate(input_ids, max_new_tokens=32)       # KV cache as usual

``prepare`` loads the saved model (dense safetensors or the sparse-bitmask checkpoint of ``deploy``),
replaces every fp32 ``nn.Linear`` with at least ``min_sparsity`` zeros by a ``SparseLinear``
(16-bit mask per 16 weights + packed fp32 nonzeros + an int32 offset per 256-column chunk:
``0.141 + 4 d`` bytes per weight at density ``d``, 0.335 of dense fp32 at 70%; see
strataprune/kernels/format.py), writes the converted model to ``workdir`` in strataprune's checkpoint format
(strataprune/deploy/format.py, docs/format.md: ``model.safetensors`` with the packed buffers, ``config.json``,
``strataprune.json`` naming each weight's encoding) and runs the model *loaded back from that folder*, its
packed buffers memory-mapped from the file, so what is timed and parity-checked is what is on disk. Folders of
the older layout (``sparse_cpu.json``, ``strataprune-bitmask16`` versions 1 and 2) still load.
Linears below ``min_sparsity``, tied to the embeddings (SmolLM2's ``lm_head``) or not fp32 stay
dense in PyTorch. Generation (prefill, decode with transformers' ``DynamicCache``), parity against
PyTorch eager fp32 and timing come from ``torch_base.TorchBase`` (what the ``torch`` backend runs), which
this one extends through its ``convert(model, model_dir)`` hook.

Engines (``engine``): ``native`` runs the packed model on the C++ decoder (strataprune/kernels/decoder.py: embedding,
norms, RoPE, attention over a KV cache in C++, MLP and lm_head in one library call per step, on the same kernels and
buffers), ``eager`` in transformers with the packed modules; ``auto`` (default) picks native for the architectures it
runs (Llama family) and eager for the rest. ``lm_head=int8`` (native only) quantizes the lm_head per row to int8
(a quarter of the bytes read per token; logit error and perplexity effect in docs/kernels.md).

Kernels: up to 8 tokens a GEMV that streams the packed weights once (AVX-512 masked expand-loads,
AVX2 permute tables, or portable C++), above that a GEMM tiled so each tile's masks are decoded once
per 128 tokens; OpenMP threads (``threads``, default: the run's ``--threads``). Where the package was
installed without a C++ compiler, ``available()`` says so and how to get the kernels.

Quantized weights (``bits=8`` or ``bits=4``, strataprune/kernels/quantized.py, docs/kernels-quantized.md): the
same bitmask index over int8 codes with symmetric scales (one per row, or per ``groupsize`` columns) or int4 codes
on an asymmetric grid per ``groupsize`` columns (default 128). For ``bits=4`` on a run pruned with SparseGPT's
joint INT4 (``pruner.wbits=4``) the run's own grids (``quantization.safetensors``) are used, so the deployed codes
are exactly the run's weights; otherwise each group's kept weights are rounded to the nearest point of their
min-max grid (0 included). The kernels quantize the *activations* on the fly too (int8, one scale per token and
128 columns, ``max|x| / 127``), so a quantized deployment does not reproduce fp32 PyTorch to 1e-3: its parity
reference is this backend with ``dequantized=true`` (the same packed weights, read back from disk and expanded
to fp32 ``nn.Linear`` in PyTorch), and its tolerance ``QUANTIZED_PARITY_TOLERANCE`` bounds the activation
rounding (see there).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from strataprune.contract.backend import BackendAvailability, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError, DataError
from strataprune.plugins.backends.torch_base import TorchBase, TorchModel

#: the packed model's weights in a prepared folder (``deploy``: OUTPUT/sparse-cpu/), a strataprune-sparse folder
#: (strataprune/deploy/format.py: config.json, strataprune.json, model.safetensors)
WEIGHTS_FILE = "model.safetensors"
#: the older layout of prepared folders, still read: sparse_cpu.json naming the packed modules
MANIFEST = "sparse_cpu.json"
FORMAT = "strataprune-bitmask16"
FORMAT_VERSION = 1  # fp32 SparseLinear modules only
QUANTIZED_FORMAT_VERSION = 2  # some modules are QuantizedSparseLinear (their manifest entry has bits, group_size)
BITS = (32, 8, 4)
GROUP_SIZES = (32, 64, 128)
#: parity of a quantized deployment against its dequantized twin (the same weights, fp32 activations): what is
#: left is the kernels' int8 activation rounding, per token and 128-column block, an error of up to
#: max|x_block| / 254 per input. It is not small on LLMs with outlier activation channels: on SmolLM2-135M pruned to
#: 70% with Wanda (2 WikiText-2 windows of 128 tokens, docs/kernels-quantized.md) the largest |logit difference| was
#: 0.115 of the largest logit with int8 weights (median over positions ~1 logit, while the median top-1/top-2 gap
#: is 0.33) and 0.305 with int4, and greedy tokens first differed at step 5 (int8) and 4 (int4). These bounds are
#: those measurements plus ~30%: they catch a wrong code, scale or index (errors of the size of the logits
#: themselves) and hold for activation rounding on that model; they are measured, not derived.
QUANTIZED_PARITY_TOLERANCE = {8: 0.15, 4: 0.4}
ENGINES = ("auto", "native", "eager")
LM_HEADS = ("fp32", "int8")
#: parity of the native engine with lm_head=int8 against its reference (the same model with the fp32 head): the head's
#: int8 weights (per-row scales) and int8 activations (per 128 columns). Measured on SmolLM2-135M, see
#: docs/kernels.md (8 WikiText-2 windows of 256 tokens: largest |logit difference| 0.084 of the largest logit on the
#: dense model, 0.072 at 70% int4); this bound is that measurement plus ~30%.
LM_HEAD_INT8_PARITY_TOLERANCE = 0.11


@dataclass
class SparseCpuConfig:
    min_sparsity: float = 0.5  # Linears with a smaller fraction of zeros stay dense (0 < min_sparsity <= 1)
    threads: int | None = None  # kernel and PyTorch threads; None: the run's --threads (DeploySettings.threads)
    isa: Literal["auto", "avx512", "avx2", "portable"] = "auto"  # force one kernel path (auto: the CPU's best)
    bits: int = 32  # 32: fp32 values; 8: int8 values (symmetric scales); 4: int4 values (asymmetric group grids)
    groupsize: int | None = None  # columns per scale: 32, 64, 128; None: per row (bits 8), 128 or the run's grid (bits 4)
    dequantized: bool = False  # run the packed quantized weights expanded to fp32 in PyTorch (the parity reference)
    engine: Literal["auto", "native", "eager"] = "auto"  # native: the C++ decoder (Llama family); auto: native when supported
    lm_head: Literal["fp32", "int8"] = "fp32"  # native engine: the lm_head exact in fp32, or int8 per row (4x fewer bytes)

    def __post_init__(self) -> None:  # on construction: a bad spec fails before any model is loaded
        b, g = self.bits, self.groupsize
        if isinstance(b, bool) or b not in BITS:
            raise ConfigError(f"backend 'sparse-cpu': bits={b!r}; allowed: 32 (fp32 values), 8 (int8), 4 (int4)")
        if g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            raise ConfigError(
                f"backend 'sparse-cpu': groupsize={g!r}; allowed: {', '.join(map(str, GROUP_SIZES))} or unset "
                "(bits 8: one scale per row; bits 4: 128, or the run's INT4 grid)"
            )
        if b == 32 and (g is not None or self.dequantized):
            raise ConfigError("backend 'sparse-cpu': groupsize and dequantized apply to bits=8 or bits=4 only; bits=32")
        if self.engine not in ENGINES:
            raise ConfigError(f"backend 'sparse-cpu': engine={self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.lm_head not in LM_HEADS:
            raise ConfigError(f"backend 'sparse-cpu': lm_head={self.lm_head!r}; allowed: {', '.join(LM_HEADS)}")
        if self.dequantized and self.engine == "native":
            raise ConfigError(
                "backend 'sparse-cpu': dequantized=true runs in PyTorch (the parity reference); not with engine=native"
            )
        if self.lm_head != "fp32" and (self.engine == "eager" or self.dequantized):
            raise ConfigError(f"backend 'sparse-cpu': lm_head={self.lm_head} needs the native engine (engine=native or auto)")
        m = self.min_sparsity
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m <= 1.0:
            raise ConfigError(f"backend 'sparse-cpu': min_sparsity {m!r}; allowed: a number in (0, 1]")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ConfigError(f"backend 'sparse-cpu': threads {t!r}; allowed: an integer >= 1 (or unset: the run's --threads)")
        if t is not None:
            from strataprune.contract.threads import check_thread_count

            check_thread_count(t, "backend 'sparse-cpu': threads")


def kernels_version() -> str:
    """The package version plus the kernel path this CPU gets, e.g. '0.1.0 (avx512)'."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("strataprune")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    import strataprune.kernels as kernels

    return f"{version} ({kernels.get_isa()})" if kernels.available() else version


def save_packed_model(model: torch.nn.Module, folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a model whose pruned Linears are SparseLinear / QuantizedSparseLinear into ``folder`` in strataprune's
    checkpoint format (strataprune/deploy/format.py, docs/format.md); returns its manifest (sizes included)."""
    from strataprune.deploy import format as checkpoint

    return checkpoint.write_folder(model, Path(folder), extra=extra)


def load_packed_model(folder: str | Path) -> torch.nn.Module:
    """The model that :func:`save_packed_model` wrote to ``folder``: fp32, CPU, eval mode, KV cache on. The packed
    buffers are the memory-mapped file's bytes (no unpacking copy). Folders of the older sparse-cpu layout
    (``sparse_cpu.json``, ``strataprune-bitmask16`` versions 1 and 2) load too, read into memory."""
    from strataprune.deploy import format as checkpoint

    folder = Path(folder)
    if (folder / checkpoint.MANIFEST).is_file():
        return checkpoint.load_model(folder, kernels=True)
    return _load_legacy_packed_model(folder)


def _load_legacy_packed_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    from strataprune.deploy.storage import load_tensors, read_header
    from strataprune.kernels import KernelInputError, SparseLinear
    from strataprune.kernels.quantized import QuantizedSparseLinear

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"'{folder}' is not a sparse-cpu model folder ({MANIFEST} + config.json): {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
        raise DataError(
            f"'{folder / MANIFEST}': format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this strataprune reads {FORMAT!r} versions {FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION}"
        )
    try:
        header, _ = read_header(folder / WEIGHTS_FILE)
        state = load_tensors(folder / WEIGHTS_FILE, list(header))
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"'{folder / WEIGHTS_FILE}' is not a readable safetensors file: {exc}") from None
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    with no_init_weights():  # every weight comes from the file: skip the (slow, for 1B parameters) random init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, spec in manifest["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if spec.get("bits", 32) == 32:
            module = SparseLinear(spec["in_features"], spec["out_features"], bias=spec["bias"])
        else:
            group = None if spec["group_size"] == spec["in_features"] else spec["group_size"]
            try:
                module = QuantizedSparseLinear(spec["in_features"], spec["out_features"], spec["bits"], group, spec["bias"])
            except KernelInputError as exc:
                raise DataError(f"'{folder / MANIFEST}': module {name}: {exc}") from None
        setattr(parent, child, module)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KernelInputError, RuntimeError) as exc:
        raise DataError(f"'{folder}': the packed weights do not load: {str(exc).splitlines()[0]}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) + sorted(set(missing) - tied)
        raise DataError(f"'{folder}': the packed weights do not match config.json and {MANIFEST} ({', '.join(bad[:4])} ...)")
    model.tie_weights()
    model.eval()
    model.config.use_cache = True
    return model


def quantize_linears(
    model: torch.nn.Module,
    bits: int,
    groupsize: int | None,
    min_sparsity: float,
    grids: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Replace in place every fp32 CPU ``nn.Linear`` with at least ``min_sparsity`` zeros (and a weight of its own,
    not tied) by a ``QuantizedSparseLinear`` of ``bits`` 8 or 4; returns (converted: name -> how the codes were
    found, kept_dense: name -> why). ``grids`` (bits 4): matrix name -> a SparseGPT INT4 record; a matrix with one
    is packed on it exactly (its weights already lie on the grid), the others get the min-max grid."""
    from strataprune.kernels import KernelInputError
    from strataprune.kernels.quantized import QuantizedSparseLinear, pack_int4, pack_int8

    grids = grids or {}
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    converted: dict[str, str] = {}
    kept_dense: dict[str, str] = {}
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            kept_dense[name] = f"{weight.dtype} on {weight.device} (kernels are float32, CPU)"
            continue
        if owners.get(id(linear.weight), 0) > 1:
            kept_dense[name] = "weight shared with another module (tied)"
            continue
        sparsity = float((weight == 0).sum()) / max(1, weight.numel())
        if sparsity < min_sparsity:
            kept_dense[name] = f"sparsity {sparsity:.3f} < {min_sparsity}"
            continue
        grid = grids.get(name, grids.get(f"{name}.weight"))
        try:
            if bits == 8:
                packed, how = pack_int8(weight, group_size=groupsize), "int8 round-to-nearest, symmetric"
            elif grid is not None:
                # the run's grid: q = round(w / scale + zero) recovers its codes (zero is an integer on the grid)
                zero = grid["zero"].detach().float().round()
                packed = pack_int4(weight, weight != 0, grid["groupsize"], grid["scale"], zero)
                how = f"int4 on the run's INT{grid['bits']} grid"
            else:
                packed, how = pack_int4(weight, group_size=groupsize or 128), "int4 round-to-nearest, asymmetric min-max"
        except KernelInputError as exc:
            raise DataError(f"cannot pack {name} as int{bits}: {exc}") from None
        bias = None if linear.bias is None else linear.bias.detach()
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model, child, QuantizedSparseLinear.from_packed(packed, bias)
        )
        converted[name] = how
    return converted, kept_dense


def dequantize_linears(model: torch.nn.Module) -> int:
    """Replace every ``QuantizedSparseLinear`` by the fp32 ``nn.Linear`` its codes stand for (the reference of a
    quantized deployment: the same weights, dense fp32 matmuls, no activation rounding); returns how many."""
    from strataprune.kernels.quantized import QuantizedSparseLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedSparseLinear)]
    for name, module in targets:
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.packed.dequantize()
        if module.bias is not None:
            linear.bias.data = module.bias.clone()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(targets)


class SparseCpuBackend(TorchBase):
    name = "sparse-cpu"
    version = "1"
    summary = "strataprune's C++ sparse kernels (bitmask-16 + packed fp32, AVX-512/AVX2, OpenMP) for pruned Linears"
    Config = SparseCpuConfig
    devices = ("cpu",)
    sparse_formats = ("unstructured", "2:4")  # any zero pattern is skipped; 2:4 is a special case of unstructured

    @property  # type: ignore[override]
    def reference_backend(self) -> str | None:
        """fp32 (bits 32): eager PyTorch; quantized: this backend with the same weights dequantized (see
        ``reference_params``)."""
        return "torch" if self.config.bits == 32 else "sparse-cpu"

    @property  # type: ignore[override]
    def parity_tolerance(self) -> float:
        base = 1e-3 if self.config.bits == 32 else QUANTIZED_PARITY_TOLERANCE[self.config.bits]
        return base + (LM_HEAD_INT8_PARITY_TOLERANCE if self.config.lm_head == "int8" else 0.0)

    def reference_params(self) -> dict[str, Any] | None:
        c = self.config
        if c.bits == 32:
            return super().reference_params()
        if c.dequantized:
            return None  # the dequantized model is the reference of the quantized kernels
        return {
            "min_sparsity": c.min_sparsity,
            "threads": c.threads,
            "bits": c.bits,
            "groupsize": c.groupsize,
            "dequantized": True,
            "engine": "eager",
        }

    def available(self) -> BackendAvailability:
        try:
            import strataprune.kernels as kernels

            state = kernels.available()
            if not state.ok:
                return BackendAvailability(
                    False, f"strataprune's CPU sparse kernels are not built: {state.reason}", kernels_version()
                )
            if self.config.isa != "auto" and self.config.isa not in kernels.isas():
                return BackendAvailability(
                    False,
                    f"isa={self.config.isa} is not supported on this CPU (it has: {', '.join(kernels.isas())}); use isa=auto",
                    kernels_version(),
                )
            return BackendAvailability(True, "", kernels_version())
        except Exception as exc:  # noqa: BLE001 -- available() must never raise
            return BackendAvailability(False, f"the CPU sparse kernels cannot be loaded: {exc}")

    def load(self, model_dir: Path) -> torch.nn.Module:
        from strataprune.deploy.rundir import load_causal_lm

        return load_causal_lm(model_dir, dtype=torch.float32, device="cpu")

    def convert(self, model: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
        """Every fp32 Linear with >= min_sparsity zeros (and not tied to the embeddings) becomes a SparseLinear."""
        from strataprune.kernels import SparsifyReport, sparsify_model

        c = self.config
        if c.bits == 32:
            self.last_report = sparsify_model(model, min_sparsity=c.min_sparsity)
            self.quantization = None
            return model
        grids: dict[str, dict[str, Any]] = {}
        source = "round-to-nearest"
        if c.bits == 4 and (Path(model_dir) / "quantization.json").is_file():
            from strataprune.deploy.rundir import quantization_grids

            summary, grids = quantization_grids(Path(model_dir))
            bits, group = summary.get("bits"), summary.get("groupsize")
            if not isinstance(bits, int) or not 1 < bits <= 4:
                raise DataError(f"'{model_dir}/quantization.json' has bits={bits!r}; bits=4 packs grids of 2 to 4 bits")
            if c.groupsize is not None and c.groupsize != group:
                raise ConfigError(
                    f"backend 'sparse-cpu': groupsize={c.groupsize} but the run's INT{bits} grids have groupsize {group}; "
                    "leave groupsize unset to deploy the run's own grid"
                )
            source = f"the run's INT{bits} grids (groupsize {group})"
        converted, kept_dense = quantize_linears(model, c.bits, c.groupsize, c.min_sparsity, grids)
        self.last_report = SparsifyReport(kept_dense=kept_dense)
        self.quantization = {"bits": c.bits, "groupsize": c.groupsize, "source": source, "converted": converted}
        return model

    def _check_config(self) -> None:
        SparseCpuConfig.__post_init__(self.config)  # a config built without from_params (tests, other hosts)

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        import strataprune.kernels as kernels

        self._check_config()
        threads = self.config.threads or settings.threads
        if threads:
            torch.set_num_threads(threads)
        kernels.set_num_threads(threads)  # None: follow torch's thread count
        kernels.set_isa(self.config.isa)
        model = self.convert(self.load(Path(model_dir)), Path(model_dir))
        report = self.last_report
        extra: dict[str, Any] = {
            "min_sparsity": self.config.min_sparsity,
            "kept_dense": report.kept_dense,
            "source": str(model_dir),
        }
        if self.quantization:
            extra["quantization"] = self.quantization
        manifest = save_packed_model(model, Path(workdir), extra)
        del model
        gc.collect()
        model = load_packed_model(workdir)  # run what is on disk
        sizes = manifest["sizes"]
        bits = self.config.bits
        if bits == 32:
            form = "strataprune-sparse bitmask16-fp32 (packed Linears, memory-mapped) + dense fp32 rest"
        else:
            group = self.config.groupsize or ("row" if bits == 8 else 128)
            form = f"strataprune-sparse bitmask16-int{bits} (group {group}; int8 activations on the fly) + dense fp32 rest"
        if self.config.dequantized:
            dequantize_linears(model)  # the same codes, expanded to fp32 in PyTorch: the quantized kernels' reference
            form = (
                f"int{bits} weights of strataprune-sparse dequantized to dense fp32 nn.Linear (PyTorch eager; parity reference)"
            )
        engine = self.resolve_engine(model)
        meta = {
            "compiled": False,
            "device": "cpu",
            "dtype": "float32",
            "weight_bits": bits,
            "format": form,
            "artifact_bytes": sizes["file_bytes"],
            "converted_linears": sizes["encoded_matrices"],
            "kept_dense_linears": len(report.kept_dense),
            "ratio_packed_matrices": sizes["ratio_packed_matrices"],
            "bytes_per_weight_packed_matrices": sizes["bytes_per_weight_packed_matrices"],
            "ratio_whole_model": sizes["ratio_whole_model"],
            "isa": kernels.get_isa(),
            "threads": kernels.get_num_threads(),
            "engine": engine,
        }
        if engine == "native":
            meta["lm_head"] = self.config.lm_head
            meta["format"] = form + f"; native C++ decoder (lm_head {self.config.lm_head})"
            return NativeModel(model, self.name, Path(workdir) / WEIGHTS_FILE, meta, self.config.lm_head, settings)
        return TorchModel(model, self.name, Path(workdir) / WEIGHTS_FILE, meta)

    def resolve_engine(self, model: torch.nn.Module) -> str:
        """``native`` or ``eager`` for this config and model (engine=native on an unsupported model: ConfigError)."""
        from strataprune.kernels.decoder import unsupported_reason

        c = self.config
        if c.dequantized or c.engine == "eager":
            return "eager"
        reason = unsupported_reason(model)
        if reason and c.engine == "native":
            raise ConfigError(f"backend 'sparse-cpu': engine=native: {reason}; use engine=eager (or auto)")
        if reason and c.lm_head != "fp32":
            raise ConfigError(f"backend 'sparse-cpu': lm_head={c.lm_head} needs the native engine, but {reason}")
        return "eager" if reason else "native"


class _NativeState:
    """What ``NativeModel.prefill`` hands to ``decode``: the engine keeps the caches; this says which prefill."""

    def __init__(self, generation: int, batch: int) -> None:
        self.generation, self.batch = generation, batch


class NativeModel(CompiledModel):
    """The packed model on the native C++ decoder (strataprune/kernels/decoder.py): one batch row per slot."""

    def __init__(self, model: torch.nn.Module, backend: str, artifact: Path, meta: dict[str, Any], lm_head: str,
                 settings: DeploySettings) -> None:  # fmt: skip
        super().__init__(backend, artifact, meta)
        self.model, self.lm_head = model, lm_head
        self.reserve = max(1, int(getattr(settings, "new_tokens", 0) or 0)) + 8  # decode steps after a prefill
        self.engine: Any = None
        self.generation = 0
        self._engine_for(max(1, int(getattr(settings, "batch", 1) or 1)), int(getattr(settings, "prompt_len", 0) or 0))

    def _engine_for(self, batch: int, tokens: int) -> Any:
        from strataprune.kernels.decoder import NativeDecoder

        limit = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        needed = min(limit, tokens + self.reserve)
        engine = self.engine
        if engine is None or engine.max_slots < batch or engine.max_context < needed:
            if engine is not None:
                engine.close()
            self.engine = None
            self.engine = NativeDecoder(
                self.model, max_slots=batch, max_context=min(limit, max(needed, 256)), lm_head=self.lm_head
            )
        return self.engine

    def prefill(self, input_ids: Any) -> tuple[np.ndarray, Any]:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise DataError(f"native engine: input_ids must be [batch, tokens] with tokens >= 1, got shape {ids.shape}")
        engine = self._engine_for(ids.shape[0], ids.shape[1])
        rows = []
        for b in range(ids.shape[0]):
            engine.reset(b)
            rows.append(engine.prefill(b, ids[b], all_logits=True).numpy())
        self.generation += 1
        return np.stack(rows), _NativeState(self.generation, ids.shape[0])

    def decode(self, token_ids: Any, state: Any) -> tuple[np.ndarray, Any]:
        if not isinstance(state, _NativeState) or state.generation != self.generation:
            raise DataError("native engine: decode needs the state of the latest prefill (the engine holds one set of caches)")
        tokens = np.asarray(token_ids).reshape(-1)
        if tokens.shape[0] != state.batch:
            raise DataError(f"native engine: {tokens.shape[0]} token(s) for a batch of {state.batch}")
        logits = self.engine.decode(list(range(state.batch)), tokens).numpy()
        return logits[:, None, :], state

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.model = None  # type: ignore[assignment]
