"""Convolutions as matrices: the im2col view used to prune them like Linear layers.

A Conv2d weight W of shape (out, in/groups, kh, kw) is seen as the matrix W.reshape(out, in·kh·kw)
(for groups == 1), and its input x [N, C, H, W] as the unfolded patches

    X = unfold(pad(x), kernel, dilation, stride)  ->  [N·L, C·kh·kw]   (L output positions)

so that conv(x) = X @ W_matᵀ (+ bias) at every output position, column j of W_mat reading column j
of X (torch.nn.functional.unfold orders a patch as channel, then kernel row, then kernel column,
exactly like ``weight.reshape(out, -1)``). Wanda's ||X_j||_2 and SparseGPT's H = 2XᵀX/n are then the
statistics of these rows (Sun et al. 2024 and Frantar & Alistarh 2023 prune convolutions this way;
AlphaPruning's ESD of a conv layer uses the same reshaped matrix).

Which convolutions are prunable (``prunable_conv``): groups == 1 only. Depthwise convolutions
(groups == in_channels: each output channel reads one input channel through kh·kw weights, e.g. 9
or 25) and other grouped convolutions stay dense: a depthwise "row" has so few weights that per-row
pruning removes whole spatial taps of a channel, they hold few parameters (3.9% of EfficientNet-Lite0,
~1.5% of ConvNeXt-T), and their im2col matrix is block-diagonal rather than dense.

    python -c "from strataprune.plugins.adapters.im2col import conv_patches"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prunable_conv(module: nn.Module) -> bool:
    """A 2-D convolution pruned through its im2col matrix: not depthwise, not grouped."""
    return isinstance(module, nn.Conv2d) and module.groups == 1


def conv_matrix(module: nn.Conv2d) -> torch.Tensor:
    """The (out, in·kh·kw) view of a conv weight (shares storage with it)."""
    weight = module.weight.data
    return weight.reshape(weight.shape[0], -1)


def _padding(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Apply the padding the module applies inside its forward; return the input and the padding unfold adds."""
    static = getattr(module, "static_padding", None)  # TF-style "same" convs (EfficientNet-Lite) pad in forward
    if isinstance(static, nn.Module):
        x = static(x)
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice  # noqa: SLF001 - what Conv2d._conv_forward pads with
        return F.pad(x, pad, mode=module.padding_mode), (0, 0)
    padding = module.padding
    if padding == "valid":
        return x, (0, 0)
    if padding == "same":  # stride 1 only (torch's rule): total padding d·(k-1), the extra one on the right
        total = [module.dilation[i] * (module.kernel_size[i] - 1) for i in range(2)]
        pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        return F.pad(x, pad), (0, 0)
    return x, (int(padding[0]), int(padding[1]))  # type: ignore[index]


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` as im2col rows [N·L, in·kh·kw], matching ``conv_matrix(module)``'s columns."""
    x, padding = _padding(module, x)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if module.kernel_size == (1, 1) and module.stride == (1, 1) and padding == (0, 0):  # pointwise: the pixels are the patches
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
