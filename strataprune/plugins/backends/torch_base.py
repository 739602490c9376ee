"""What every backend that runs the saved model in PyTorch shares: loading, generation, timing, parity.

``torch`` (eager or ``torch.compile``), ``torch-2:4`` (semi-structured sparse Linears) and ``sparse-cpu``
(strataprune's CPU kernels) are ``TorchBase`` subclasses: a subclass states its name and Config and, to run
other modules, overrides ``convert(model, model_dir)``. Generation uses transformers' ``DynamicCache``:
``prefill`` runs the prompt and returns the cache, ``decode`` appends one token per call. Parity is checked
against the ``torch`` backend in eager mode on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from strataprune.contract.backend import Backend, BackendAvailability, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TorchConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = False  # torch.compile the forward (inductor, dynamic shapes)


class TorchModel(CompiledModel):
    """A transformers causal LM driven token by token with its DynamicCache (the state is consumed by decode)."""

    def __init__(self, model: torch.nn.Module, backend: str, artifact: Path | None, meta: dict[str, Any]) -> None:
        super().__init__(backend, artifact, meta)
        self.model = model
        self.device = next(model.parameters()).device
        self.forward = torch.compile(model.forward, dynamic=True) if meta.get("compiled") else model.forward

    def _run(self, ids: Any, cache: Any) -> tuple[np.ndarray, Any]:
        tokens = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.forward(input_ids=tokens, past_key_values=cache, use_cache=True)
            logits = out.logits.float().cpu().numpy()
        return logits, out.past_key_values

    def prefill(self, input_ids: Any) -> tuple[np.ndarray, Any]:
        from transformers import DynamicCache

        return self._run(input_ids, DynamicCache())

    def decode(self, token_ids: Any, state: Any) -> tuple[np.ndarray, Any]:
        return self._run(token_ids, state)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self.forward = None  # type: ignore[assignment]


class TorchBase(Backend):
    """A backend that runs the saved model in PyTorch (not registered itself: see the module docstring)."""

    Config = TorchConfig
    devices = ("cpu", "cuda")
    sparse_formats: tuple[str, ...] = ()
    reference_backend = "torch"

    def available(self) -> BackendAvailability:
        device = torch.device(self.config.device) if self.config.device else torch.device("cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            return BackendAvailability(False, "needs CUDA: no CUDA device is visible to this torch", torch.__version__)
        return BackendAvailability(True, "", torch.__version__)

    def reference_params(self) -> dict[str, Any] | None:
        # checked against plain eager PyTorch on the same device and in the same dtype
        return {"device": getattr(self.config, "device", "cpu"), "dtype": getattr(self.config, "dtype", "float32")}

    def load(self, model_dir: Path) -> torch.nn.Module:
        from strataprune.deploy.rundir import load_causal_lm

        if self.config.dtype not in DTYPES:
            raise ConfigError(f"backend '{self.name}': dtype {self.config.dtype!r}; allowed: {', '.join(DTYPES)}")
        return load_causal_lm(model_dir, dtype=DTYPES[self.config.dtype], device=self.config.device)

    def convert(self, model: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
        """Turn the loaded model into what this engine runs (here: unchanged). Subclasses swap modules."""
        return model

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        from strataprune.deploy.rundir import weight_files

        if settings.threads:
            torch.set_num_threads(settings.threads)
        model = self.convert(self.load(Path(model_dir)), Path(model_dir))
        files = weight_files(Path(model_dir))
        meta = {
            "compiled": bool(self.config.compile),
            "device": self.config.device,
            "dtype": self.config.dtype,
            "artifact_bytes": sum(f.stat().st_size for f in files),
            "format": "safetensors checkpoint",
        }
        return TorchModel(model, self.name, files[0], meta)
