"""``SparseLinear`` (an ``nn.Linear`` whose weight lives in the packed format) and ``sparsify_model``.

``sparsify_model(model, min_sparsity=0.5)`` replaces, in place, every fp32 ``nn.Linear`` whose weight is
at least ``min_sparsity`` zeros by a :class:`SparseLinear`; the others (e.g. a dense ``lm_head``, or a
weight tied to the embeddings) stay dense. A transformers model converted this way runs ``generate``
with its KV cache unchanged: only the Linear calls go through the C kernels.

    from transformers import AutoModelForCausalLM
    from strataprune.kernels import sparsify_model, set_num_threads
    model = AutoModelForCausalLM.from_pretrained("strataprune-runs/latest/model", torch_dtype="float32")
    report = sparsify_model(model, min_sparsity=0.5)
    print(report)                       # layers converted, bytes read per token vs dense
    set_num_threads(2)
    model.generate(input_ids, max_new_tokens=32)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops  # also registers torch.ops.strataprune.sparse_linear
from ._library import KernelInputError, set_num_threads
from .format import PackedWeight, chunks_of, groups_of, pack, validate


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as buffers ``masks``, ``values``, ``offsets`` (see format.py).

    Inference only. Input must be float32 on the CPU; any leading shape, any strides (copied to
    contiguous when needed). The buffers are saved by ``state_dict`` and validated when loaded.
    """

    masks: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("masks", torch.zeros(out_features, groups_of(in_features), dtype=torch.int16))
        self.register_buffer("values", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("offsets", torch.zeros(out_features * chunks_of(in_features) + 1, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.register_load_state_dict_post_hook(SparseLinear._check_loaded)
        self._checked: tuple = ()  # (buffers, their versions, their data pointers) when last checked

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> SparseLinear:
        rows, cols = packed.shape
        module = cls(cols, rows, bias=bias is not None)
        module.masks, module.values, module.offsets = packed.masks, packed.values, packed.offsets
        if bias is not None:
            module.bias = bias.detach().to(torch.float32).contiguous().clone()
        validate(module.masks, module.values, module.offsets, packed.shape)
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        """Pack ``linear``'s weight (its zeros are skipped; values are copied exactly)."""
        if not isinstance(linear, nn.Linear):
            raise KernelInputError(f"from_dense needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_packed(pack(linear.weight.detach()), None if linear.bias is None else linear.bias.detach())

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.masks, self.values, self.offsets, (self.out_features, self.in_features))

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.packed.unpack())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and not x.is_contiguous():
            x = x.contiguous()
        if type(x) is torch.Tensor and not x.requires_grad and not torch.compiler.is_compiling():
            return self._eager(x)
        # tracing (torch.compile / export: fake tensors) or autograd: the registered op, one node in the graph
        return torch.ops.strataprune.sparse_linear(x, self.masks, self.values, self.offsets, self.bias, self.in_features)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """The op's implementation without the dispatcher: on a small layer the dispatcher, buffer lookups and
        argument conversions cost more than the matmul. The packed buffers are re-checked (and their pointers
        taken) only when one of them was replaced or modified in place."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != self.in_features:
            ops.check_input(x, self.in_features)  # raises, naming the problem
        buffers = self._buffers
        masks, values, offsets, bias = buffers["masks"], buffers["values"], buffers["offsets"], buffers["bias"]
        versions = (masks._version, values._version, offsets._version, -1 if bias is None else bias._version)
        checked = self._checked
        if (
            not checked
            or checked[0] is not masks
            or checked[1] is not values
            or checked[2] is not offsets
            or checked[3] is not bias
            or checked[4] != versions
        ):
            ops.check_weight(masks, values, offsets, bias, self.in_features)
            pointers = (masks.data_ptr(), values.data_ptr(), offsets.data_ptr(), None if bias is None else bias.data_ptr())
            self._checked = checked = (masks, values, offsets, bias, versions, pointers)
        return ops.launch_pointers(x, checked[5], self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the number of packed values depends on the weight: take the incoming sizes instead of failing on a mismatch
        key = prefix + "values"
        if key in state_dict and isinstance(state_dict[key], torch.Tensor):
            self.values = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    def _check_loaded(module: nn.Module, incompatible_keys: Any) -> None:
        validate(module.masks, module.values, module.offsets, (module.out_features, module.in_features))

    def extra_repr(self) -> str:
        p = self.packed
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={p.sparsity:.3f}, bytes={p.nbytes / max(1, p.dense_nbytes):.3f} of dense"
        )


@dataclass
class SparsifyReport:
    """What :func:`sparsify_model` did: layers converted (with their sparsity), layers kept dense (with why)."""

    converted: dict[str, float] = field(default_factory=dict)
    kept_dense: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0  # fp32 bytes of the converted layers' weights
    packed_bytes: int = 0  # bytes the kernels read for them

    def __str__(self) -> str:
        ratio = self.packed_bytes / self.dense_bytes if self.dense_bytes else 1.0
        return (
            f"{len(self.converted)} Linear layers converted to SparseLinear ({self.packed_bytes / 1e6:.1f} MB packed vs "
            f"{self.dense_bytes / 1e6:.1f} MB dense fp32, {ratio:.3f}); {len(self.kept_dense)} kept dense"
        )


def sparsify_model(model: nn.Module, min_sparsity: float = 0.5, threads: int | None = None) -> SparsifyReport:
    """Replace in place every fp32 CPU ``nn.Linear`` with at least ``min_sparsity`` zeros by a SparseLinear.

    Linears whose weight is shared with another module (tied embeddings) stay dense, as do those below
    ``min_sparsity`` or not fp32 on the CPU. ``threads`` (optional) sets the kernels' thread count.
    """
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0:
        raise KernelInputError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    if threads is not None:
        set_num_threads(threads)
    report = SparsifyReport()
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        weight = linear.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            report.kept_dense[name] = f"{weight.dtype} on {weight.device} (kernels are float32, CPU)"
            continue
        if owners.get(id(weight), 0) > 1:
            report.kept_dense[name] = "weight shared with another module (tied)"
            continue
        sparsity = float((weight == 0).sum()) / max(1, weight.numel())
        if sparsity < min_sparsity:
            report.kept_dense[name] = f"sparsity {sparsity:.3f} < {min_sparsity}"
            continue
        sparse = SparseLinear.from_dense(linear)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
        report.converted[name] = sparsity
        report.dense_bytes += sparse.packed.dense_nbytes
        report.packed_bytes += sparse.packed.nbytes
    return report
