"""Real 4-bit weights for ONNX Runtime: the pruner's INT4 grids packed into ``MatMulNBits``.

    rewrite_matmuls(onnx_model, weights, grids)     # MatMul(x, W^T) -> com.microsoft.MatMulNBits

A sparse+INT4 run (``pruner.wbits: 4``) saves dequantized values ``w = scale * (q - zero)`` and the
grids (``quantization.safetensors``, see strataprune/engine/quantization.py). Here the integer codes are recovered
(``q = round(w / scale + zero)``, checked to reproduce w) and packed the way ONNX Runtime's
``MatMulNBits`` (com.microsoft, ORT >= 1.17) reads them, for a weight in torch's (N = out, K = in)
layout and blocks of ``block_size`` consecutive input columns:

- ``B``: uint8 [N, ceil(K / block), block / 2]; two codes per byte, the even column in the low nibble;
- ``scales``: float32 [N * ceil(K / block)];
- ``zero_points``: uint8 [N * ceil(ceil(K / block) / 2)], 4-bit, low nibble first, each row padded
  to whole bytes;
- ``Y = X @ ((B - zero_points) * scales)^T``.

A block must lie inside one group of the grid, so ``block_size`` is the group size (a power of two
>= 16) or, for per-channel grids, 128 (the scale repeats). Columns past K in the last block hold the
zero point (they dequantize to 0). Pruned weights are code ``zero`` exactly (0 is on the grid), so
the graph computes with the same zeros. Storage: 0.5 B per weight + 4.5 B per block of scales/zero
points, about 0.129 of fp32 at block 128.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strataprune.contract.errors import DataError
from strataprune.engine.quantization import expand

BITS = 4


def block_size_for(groupsize: int | None, cols: int) -> int:
    if groupsize is None:
        return 128 if cols >= 128 else max(16, 1 << (max(cols, 16) - 1).bit_length())
    g = int(groupsize)
    if g >= 16 and g & (g - 1) == 0:
        return g
    raise DataError(f"INT4 group size {g} cannot be run by MatMulNBits (block sizes are powers of two >= 16)")


def codes_of(weight: torch.Tensor, quant: dict[str, Any], name: str) -> torch.Tensor:
    """Integer codes q [N, K] of a dequantized weight on its grid; DataError when they do not reproduce it."""
    w = weight.detach().float()
    cols = w.shape[1]
    scale = expand(quant["scale"].float(), cols, quant["groupsize"])
    zero = expand(quant["zero"].float(), cols, quant["groupsize"])
    q = torch.clamp(torch.round(w / scale + zero), 0, 2**BITS - 1)
    err = float(((q - zero) * scale - w).abs().max()) if w.numel() else 0.0
    if err > 1e-5 * max(1.0, float(w.abs().max())):
        raise DataError(
            f"INT4 weight '{name}' is off its recorded grid by {err:.3g}; the run folder's quantization files do not match its "
            "weights"
        )
    if not bool((zero == torch.round(zero)).all()) or float(zero.min()) < 0 or float(zero.max()) > 2**BITS - 1:
        raise DataError(f"INT4 weight '{name}': zero points must be integers in [0, 15] for MatMulNBits")
    return q.to(torch.uint8)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[..., 2m] codes in [0, 15] -> [..., m] bytes, even index in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


def pack_weight(weight: torch.Tensor, quant: dict[str, Any], name: str = "weight") -> dict[str, Any]:
    """One weight (N, K) and its grid -> MatMulNBits inputs and attributes."""
    n, k = weight.shape
    block = block_size_for(quant["groupsize"], k)
    blocks = -(-k // block)
    q = codes_of(weight, quant, name).numpy()
    group_of_block = (np.arange(blocks) * block) // (int(quant["groupsize"]) if quant["groupsize"] else k)
    scales = quant["scale"].float().numpy()[:, group_of_block].astype(np.float32)  # [N, blocks]
    zeros = quant["zero"].float().numpy()[:, group_of_block].astype(np.uint8)  # [N, blocks]
    padded = np.repeat(zeros, block, axis=1)  # columns past K get the zero point
    padded[:, :k] = q
    b = pack_nibbles(padded.reshape(n, blocks, block))
    zp_cols = blocks + (blocks % 2)
    zp = np.zeros((n, zp_cols), dtype=np.uint8)
    zp[:, :blocks] = zeros
    return {
        "B": b,
        "scales": scales.reshape(-1),
        "zero_points": pack_nibbles(zp).reshape(-1),
        "K": k,
        "N": n,
        "block_size": block,
        "blocks": blocks,
    }


def unpack_weight(packed: dict[str, Any]) -> np.ndarray:
    """The dequantized (N, K) float32 weight that MatMulNBits computes with (the reference of the packing)."""
    n, k, block, blocks = packed["N"], packed["K"], packed["block_size"], packed["blocks"]
    q = unpack_nibbles(packed["B"], block).reshape(n, blocks * block).astype(np.float32)
    zp = unpack_nibbles(packed["zero_points"].reshape(n, -1), blocks).astype(np.float32)
    scales = packed["scales"].reshape(n, blocks)
    w = (q - np.repeat(zp, block, axis=1)) * np.repeat(scales, block, axis=1)
    return w[:, :k]


def rewrite_matmuls(
    model: Any, weights: dict[str, torch.Tensor], grids: dict[str, dict[str, Any]], accuracy_level: int = 0
) -> dict[str, Any]:
    """Replace every ``MatMul(x, W^T)`` whose constant operand is a quantized weight by ``MatMulNBits``.

    The exporter folds each Linear's transposed weight into an anonymous initializer, so weights are
    found by content: the initializer equal to ``W^T`` byte for byte. Returns what was replaced.
    """
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    wanted: dict[str, str] = {}
    for name, grid in grids.items():
        key = f"{name}.weight" if f"{name}.weight" in weights else name
        if key not in weights:
            raise DataError(f"quantization grid '{name}' matches no weight of the model")
        wt = weights[key].detach().float().t().contiguous().numpy()
        wanted[hashlib.sha1(wt.tobytes()).hexdigest() + str(wt.shape)] = name
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for inp in node.input:
            consumers[inp] = consumers.get(inp, 0) + 1
    replaced: dict[str, str] = {}
    new_nodes = []
    packed_bytes = 0
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if init is None or len(init.dims) != 2:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(init)
        matrix = wanted.get(hashlib.sha1(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest() + str(arr.shape))
        if matrix is None:
            new_nodes.append(node)
            continue
        key = f"{matrix}.weight" if f"{matrix}.weight" in weights else matrix
        packed = pack_weight(weights[key], grids[matrix], matrix)
        base = f"{init.name}_q4"
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed["B"], base),
                numpy_helper.from_array(packed["scales"], base + "_scales"),
                numpy_helper.from_array(packed["zero_points"], base + "_zp"),
            ]
        )
        packed_bytes += packed["B"].nbytes + packed["scales"].nbytes + packed["zero_points"].nbytes
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], base, base + "_scales", base + "_zp"],
                list(node.output),
                name=(node.name or base) + "_nbits",
                domain="com.microsoft",
                K=packed["K"],
                N=packed["N"],
                bits=BITS,
                block_size=packed["block_size"],
                accuracy_level=accuracy_level,
            )
        )
        consumers[init.name] -= 1
        replaced[matrix] = node.name
    del graph.node[:]
    graph.node.extend(new_nodes)
    unused = [i for i in graph.initializer if consumers.get(i.name, 0) == 0 and i.name in inits]
    for init in unused:
        graph.initializer.remove(init)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    missing = sorted(set(grids) - set(replaced))
    return {"replaced": len(replaced), "missing": missing, "packed_bytes": packed_bytes, "accuracy_level": accuracy_level}
