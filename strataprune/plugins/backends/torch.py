"""PyTorch backend: the saved model in eager PyTorch (optionally ``torch.compile``), the parity reference.

    strataprune bench RUN_DIR --backends torch,torch:compile=true

Generation uses transformers' ``DynamicCache``: ``prefill`` runs the prompt and returns the cache,
``decode`` appends one token per call. Every other engine's logits are checked against this one
(fp32, CPU, eager attention). ``torch.compile`` (``compile: true``, inductor, dynamic shapes)
compiles on first use (about a minute for SmolLM2; the benchmark's warm-up absorbs it); it helped
PyTorch by ~15% at prefill in deploy.md's measurements and little at decode.

Extending: a backend that runs the model in PyTorch with other modules (e.g. a ``SparseLinear``
that replaces ``nn.Linear``) subclasses ``TorchBackend`` (or, inside strataprune, where no plugin
imports another, ``torch_base.TorchBase``) and overrides ``convert(model, model_dir)``; loading,
generation, parity and timing come with it.
"""

from __future__ import annotations

from typing import Any

from strataprune.plugins.backends.torch_base import DTYPES, TorchBase, TorchConfig, TorchModel

__all__ = ["DTYPES", "TorchBackend", "TorchConfig", "TorchModel"]


class TorchBackend(TorchBase):
    name = "torch"
    version = "2"
    summary = "PyTorch eager (or torch.compile), dense kernels; the parity reference"
    Config = TorchConfig

    def reference_params(self) -> dict[str, Any] | None:
        if type(self) is TorchBackend and not self.config.compile:
            return None  # eager PyTorch is the reference itself
        # compiled, or a subclass that converts modules: checked against plain eager PyTorch, same device and dtype
        return super().reference_params()
