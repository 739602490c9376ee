"""Convolutions pruned through im2col: the matrix view reproduces the convolution, and the calibration
engine's Wanda/SparseGPT statistics of a conv equal those of explicitly gathered patches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strataprune.contract.layout import LoadedModel
from strataprune.engine.calibration import Calibrator
from strataprune.plugins.adapters.im2col import conv_matrix, conv_patches, prunable_conv
from strataprune.plugins.adapters.vision_units import Unit, VisionAdapter


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2),
        dict(kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
        dict(kernel_size=1),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
    ],
)
def test_patches_times_matrix_is_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, bias=False, **kwargs)
    x = torch.randn(2, 4, 11, 9)
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.allclose(conv_patches(conv, x) @ conv_matrix(conv).T, expected, atol=1e-5)


def test_tf_same_padding_of_efficientnet_is_applied():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    conv = Conv2dStaticSamePadding(3, 8, kernel_size=3, stride=2, image_size=16, bias=False)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(conv_patches(conv, x) @ conv_matrix(conv).T, conv(x).permute(0, 2, 3, 1).reshape(-1, 8), atol=1e-5)


def test_depthwise_and_grouped_convs_are_not_prunable():
    assert prunable_conv(nn.Conv2d(4, 4, 3)) and not prunable_conv(nn.Conv2d(4, 4, 3, groups=4))
    assert not prunable_conv(nn.Conv2d(4, 8, 3, groups=2))


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1)),
                nn.Sequential(nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 1)),
            ]
        )

    def forward(self, pixel_values):  # type: ignore[no-untyped-def]
        x = pixel_values
        for block in self.blocks:
            x = block(x)
        return x


class _TinyCNNAdapter(VisionAdapter):
    name = "tiny_cnn"

    def units(self, model):  # type: ignore[no-untyped-def]
        return [Unit(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def test_calibration_statistics_of_convs_match_a_loop_over_patches():
    torch.manual_seed(1)
    model, adapter = _TinyCNN().eval(), _TinyCNNAdapter()
    x = torch.randn(3, 3, 9, 9)
    layout = adapter.layout(model)
    assert layout.names == ["blocks.0.0", "blocks.1.0", "blocks.1.2"]  # the depthwise conv stays dense
    assert layout["blocks.1.0"].shape == (16, 8 * 9)
    seen = {}
    Calibrator(LoadedModel(model, None, adapter, "tiny"), {"pixel_values": x}, show_progress=False).run(
        {"input_norms", "hessian"}, visit=lambda s: seen.setdefault(s.block, s)
    )
    # reference: gather every 3x3 patch of the block-1 input by hand (stride 2, no padding)
    with torch.no_grad():
        h = model.blocks[0](x)
    rows = []
    for n in range(3):
        for i in range(0, 9 - 2, 2):
            for j in range(0, 9 - 2, 2):
                rows.append(h[n, :, i : i + 3, j : j + 3].reshape(-1))
    patches = torch.stack(rows)
    stats = seen[1]
    assert stats.ntokens == patches.shape[0] == 3 * 16
    assert torch.allclose(stats.input_norms["blocks.1.0"], patches.norm(dim=0), rtol=1e-4)
    assert torch.allclose(stats.hessians["blocks.1.0"], 2 * patches.T @ patches / patches.shape[0], rtol=1e-3, atol=1e-5)
    assert stats.hessians["blocks.1.2"].shape == (16, 16)  # the 1x1 conv: one row per output pixel
