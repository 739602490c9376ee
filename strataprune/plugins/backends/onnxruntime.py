"""ONNX Runtime backend: the decoder exported with its KV cache, run in ORT CPU sessions.

    strataprune deploy RUN_DIR --backend onnxruntime --output deployed/
    strataprune bench RUN_DIR --backends onnxruntime --threads 2

The model is exported once (strataprune/deploy/onnx_export.py: dynamic batch, length and past
length, no ``position_ids``/``attention_mask`` inputs) and run with ``intra_op_num_threads`` set to
the requested threads, one inter-op thread and every graph optimisation on. ORT's CPU kernels are
dense: the zeros of a pruned model cost what nonzeros cost, so a pruned fp32 model runs at the
dense speed (the verdict says so). ONNX Runtime is the fastest dense CPU engine measured here and
the baseline of every verdict.

A sparse+INT4 run (quantization.json in the run folder) runs as real 4-bit weights
(``weights: auto``; ``weights: fp32`` runs the dequantized values): every quantized Linear becomes a
``MatMulNBits`` node holding the pruner's codes, scales and zero points (strataprune/deploy/int4.py),
0.13 of the fp32 bytes. ``accuracy_level``
0 computes in fp32 (parity with the dequantized PyTorch model); 4 lets ORT quantize activations to
int8 (faster on VNNI CPUs, looser parity).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from strataprune.contract.backend import Backend, BackendAvailability, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError, DataError

INSTALL = "pip install 'strataprune[deploy]' (onnx, onnxruntime, onnxscript)"


@dataclass
class OnnxRuntimeConfig:
    weights: Literal["auto", "int4", "fp32"] = (
        "auto"  # int4: MatMulNBits from the run's INT4 grids; auto: int4 when the run has them
    )
    accuracy_level: int = 0  # MatMulNBits compute: 0 = fp32, 4 = int8 activations


def engine_versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


class OrtModel(CompiledModel):
    """An ORT session over the exported graph; the state is the list of present key/value arrays."""

    def __init__(
        self,
        session: Any,
        layers: int,
        kv_heads: int,
        head_dim: int,
        artifact: Path,
        meta: dict[str, Any],
        backend: str = "onnxruntime",
    ) -> None:
        super().__init__(backend, artifact, meta)
        self.session = session
        self.past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def _run(self, ids: Any, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), **dict(zip(self.past_names, past))}
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def prefill(self, input_ids: Any) -> tuple[np.ndarray, Any]:
        batch = np.asarray(input_ids).shape[0]
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return self._run(input_ids, [empty] * len(self.past_names))

    def decode(self, token_ids: Any, state: Any) -> tuple[np.ndarray, Any]:
        return self._run(token_ids, state)

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    version = "2"
    summary = "ONNX Runtime CPU sessions over a KV-cache export (dense kernels; INT4 via MatMulNBits); the verdict's baseline"
    Config = OnnxRuntimeConfig
    devices = ("cpu",)
    sparse_formats: tuple[str, ...] = ("int4",)  # 4-bit weights shrink bytes; zeros themselves are not exploited

    def available(self) -> BackendAvailability:
        versions = engine_versions("onnxruntime", "onnx", "onnxscript")
        missing = [name for name, v in versions.items() if v is None]
        if missing:
            return BackendAvailability(False, f"{', '.join(missing)} not installed: {INSTALL}", versions["onnxruntime"] or "")
        try:
            import onnxruntime  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken install must not break `doctor`
            return BackendAvailability(
                False, f"onnxruntime fails to import ({type(exc).__name__}: {exc})", versions["onnxruntime"] or ""
            )
        return BackendAvailability(True, "", versions["onnxruntime"] or "")

    def uses_int4(self, model_dir: Path) -> bool:
        has_grids = (Path(model_dir) / "quantization.json").is_file()
        if self.config.weights == "int4" and not has_grids:
            raise ConfigError(
                f"backend onnxruntime: weights=int4 but '{model_dir}' has no quantization.json (run with pruner.wbits=4)"
            )
        return has_grids and self.config.weights != "fp32"

    def export(self, model_dir: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
        """model_dir -> workdir/model.onnx (INT4 MatMulNBits when the run has grids); returns (path, export info)."""
        import onnx

        from strataprune.deploy import int4
        from strataprune.deploy.onnx_export import export_decoder, save
        from strataprune.deploy.rundir import load_causal_lm, quantization_grids

        model = load_causal_lm(model_dir)
        path = Path(workdir) / "model.onnx"
        info = export_decoder(model, path, past=True)
        if self.uses_int4(model_dir):
            summary, grids = quantization_grids(Path(model_dir))
            if int(summary.get("bits", 0)) != 4:
                raise DataError(
                    f"'{model_dir}/quantization.json' has bits={summary.get('bits')}; MatMulNBits here packs 4-bit grids"
                )
            graph = onnx.load(str(path))
            info["int4"] = int4.rewrite_matmuls(graph, dict(model.state_dict()), grids, self.config.accuracy_level)
            if info["int4"]["missing"]:
                raise DataError(
                    f"INT4 export: {len(info['int4']['missing'])} quantized matrices were not found in the graph "
                    f"(first: {info['int4']['missing'][0]})"
                )
            save(graph, path)
        return path, info

    def session(self, path: Path, threads: int | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
            raise DataError(f"ONNX Runtime cannot load '{path}': {str(exc).splitlines()[0]}") from None

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        from strataprune.deploy.onnx_export import artifact_bytes

        available = self.available()
        if not available.ok:
            raise ConfigError(f"backend onnxruntime is not available here: {available.reason}")
        path, info = self.export(Path(model_dir), Path(workdir))
        meta = {
            "format": "onnx" + (" + MatMulNBits int4" if "int4" in info else " fp32"),
            "artifact_bytes": artifact_bytes(path),
            "threads": settings.threads,
            **({"int4": info["int4"]} if "int4" in info else {}),
        }
        return OrtModel(
            self.session(path, settings.threads), info["layers"], info["kv_heads"], info["head_dim"], path, meta, self.label()
        )
