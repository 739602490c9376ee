"""sparse-cpu backend: pruned Linears on strataprune's own CPU sparse kernels (strataprune/kernels), the rest in PyTorch.

    strataprune bench RUN_DIR --backends onnxruntime,torch,sparse-cpu --threads 2
    strataprune bench RUN_DIR --backends sparse-cpu:min_sparsity=0.6:isa=avx2
    strataprune deploy RUN_DIR --backend sparse-cpu --output deployed/      # deployed/sparse-cpu/ is the packed model

    from strataprune.plugins.backends.sparse_cpu import load_packed_model
    model = load_packed_model("deployed/sparse-cpu")   # a transformers model whose pruned Linears are SparseLinear
    model.generate(input_ids, max_new_tokens=32)       # KV cache as usual

``prepare`` loads the saved model (dense safetensors or the sparse-bitmask checkpoint of ``deploy``),
replaces every fp32 ``nn.Linear`` with at least ``min_sparsity`` zeros by a ``SparseLinear``
(16-bit mask per 16 weights + packed fp32 nonzeros + an int32 offset per 256-column chunk:
``0.141 + 4 d`` bytes per weight at density ``d``, 0.335 of dense fp32 at 70%; see
strataprune/kernels/format.py), writes the converted model to ``workdir`` (``model.safetensors`` with
the packed buffers, ``config.json``, ``sparse_cpu.json`` naming the packed modules) and runs the
model *loaded back from that folder*, so what is timed and parity-checked is what is on disk.
Linears below ``min_sparsity``, tied to the embeddings (SmolLM2's ``lm_head``) or not fp32 stay
dense in PyTorch. Generation (prefill, decode with transformers' ``DynamicCache``), parity against
PyTorch eager fp32 and timing come from ``torch_base.TorchBase`` (what the ``torch`` backend runs), which
this one extends through its ``convert(model, model_dir)`` hook.

Kernels: up to 8 tokens a GEMV that streams the packed weights once (AVX-512 masked expand-loads,
AVX2 permute tables, or portable C++), above that a GEMM tiled so each tile's masks are decoded once
per 128 tokens; OpenMP threads (``threads``, default: the run's ``--threads``). Where the package was
installed without a C++ compiler, ``available()`` says so and how to get the kernels.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from strataprune.contract.backend import BackendAvailability, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError, DataError
from strataprune.plugins.backends.torch_base import TorchBase, TorchModel

#: the packed model's files in a prepared folder (``deploy``: OUTPUT/sparse-cpu/)
WEIGHTS_FILE = "model.safetensors"
MANIFEST = "sparse_cpu.json"
FORMAT = "strataprune-bitmask16"
FORMAT_VERSION = 1


@dataclass
class SparseCpuConfig:
    min_sparsity: float = 0.5  # Linears with a smaller fraction of zeros stay dense (0 < min_sparsity <= 1)
    threads: int | None = None  # kernel and PyTorch threads; None: the run's --threads (DeploySettings.threads)
    isa: Literal["auto", "avx512", "avx2", "portable"] = "auto"  # force one kernel path (auto: the CPU's best)

    def __post_init__(self) -> None:  # on construction: a bad spec fails before any model is loaded
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
    """Write a model whose pruned Linears are SparseLinear into ``folder``; returns the manifest (sizes included)."""
    from strataprune.deploy.storage import save_tensors
    from strataprune.kernels import SparseLinear

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sparse = {name: module for name, module in model.named_modules() if isinstance(module, SparseLinear)}
    packed_names = {f"{name}.{part}" for name in sparse for part in ("masks", "values", "offsets")}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    dense_params = sum(m.in_features * m.out_features for m in sparse.values())  # what the model holds as dense fp32
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:  # tied (lm_head = embed_tokens): written once, tied again at load
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
        dense_params += 0 if name in packed_names else tensor.numel()
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    packed_bytes = sum(m.packed.nbytes for m in sparse.values())
    packed_dense = sum(m.packed.dense_nbytes for m in sparse.values())
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    file_bytes = (folder / WEIGHTS_FILE).stat().st_size
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": "per SparseLinear M: M.masks int16 [rows, ceil(cols/16)], M.values float32 [nnz], "
        "M.offsets int32 [rows * ceil(cols/256) + 1] (strataprune/kernels/format.py), M.bias",
        "modules": {
            name: {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
                "sparsity": round(m.packed.sparsity, 6),
            }
            for name, m in sparse.items()
        },
        **(extra or {}),
        "sizes": {
            "file_bytes": file_bytes,
            "dense_fp32_bytes": 4 * dense_params,
            "ratio_whole_model": file_bytes / (4 * dense_params) if dense_params else 1.0,
            "packed_matrices_bytes": packed_bytes,
            "packed_matrices_dense_bytes": packed_dense,
            "ratio_packed_matrices": packed_bytes / packed_dense if packed_dense else 1.0,
            "bytes_per_weight_packed_matrices": 4 * packed_bytes / packed_dense if packed_dense else None,
            "bytes_per_weight_formula": "2/16 + 4 d + 4/256 per fp32 weight (d = density; masks, values, chunk offsets)",
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_packed_model(folder: str | Path) -> torch.nn.Module:
    """The model that :func:`save_packed_model` wrote to ``folder``: fp32, CPU, eval mode, KV cache on."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    from strataprune.deploy.storage import load_tensors, read_header
    from strataprune.kernels import SparseLinear

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"'{folder}' is not a sparse-cpu model folder ({MANIFEST} + config.json): {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"'{folder / MANIFEST}': format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this strataprune reads {FORMAT!r} version {FORMAT_VERSION}"
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
        setattr(parent, child, SparseLinear(spec["in_features"], spec["out_features"], bias=spec["bias"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) + sorted(set(missing) - tied)
        raise DataError(f"'{folder}': the packed weights do not match config.json and {MANIFEST} ({', '.join(bad[:4])} ...)")
    model.tie_weights()
    model.eval()
    model.config.use_cache = True
    return model


class SparseCpuBackend(TorchBase):
    name = "sparse-cpu"
    version = "1"
    summary = "strataprune's C++ sparse kernels (bitmask-16 + packed fp32, AVX-512/AVX2, OpenMP) for pruned Linears"
    Config = SparseCpuConfig
    devices = ("cpu",)
    sparse_formats = ("unstructured", "2:4")  # any zero pattern is skipped; 2:4 is a special case of unstructured

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
        from strataprune.kernels import sparsify_model

        self.last_report = sparsify_model(model, min_sparsity=self.config.min_sparsity)
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
        manifest = save_packed_model(
            model,
            Path(workdir),
            {"min_sparsity": self.config.min_sparsity, "kept_dense": report.kept_dense, "source": str(model_dir)},
        )
        del model
        gc.collect()
        model = load_packed_model(workdir)  # run what is on disk
        sizes = manifest["sizes"]
        meta = {
            "compiled": False,
            "device": "cpu",
            "dtype": "float32",
            "format": f"{FORMAT} (packed Linears) + dense fp32 rest",
            "artifact_bytes": sizes["file_bytes"],
            "converted_linears": len(manifest["modules"]),
            "kept_dense_linears": len(report.kept_dense),
            "ratio_packed_matrices": sizes["ratio_packed_matrices"],
            "bytes_per_weight_packed_matrices": sizes["bytes_per_weight_packed_matrices"],
            "ratio_whole_model": sizes["ratio_whole_model"],
            "isa": kernels.get_isa(),
            "threads": kernels.get_num_threads(),
        }
        return TorchModel(model, self.name, Path(workdir) / WEIGHTS_FILE, meta)
