"""Bias correction: the tap-mean shortcut for 2-D convolutions equals running the conv on the weight difference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from xquant_core.engine.finetune import _conv_of_tap_means, _tap_means  # noqa: E402


@pytest.mark.parametrize(
    "channels, out_channels, kernel, stride, dilation, pads, group",
    [
        (8, 16, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1),  # pointwise
        (8, 8, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 8),  # depthwise
        (6, 12, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 3),  # grouped, strided
        (4, 5, (5, 3), (2, 1), (2, 1), (0, 2, 3, 1), 1),  # rectangular, dilated, asymmetric pads
        (3, 4, (2, 2), (2, 2), (1, 1), (0, 0, 1, 1), 1),  # even kernel, padded at the end only
    ],
)
def test_tap_means_give_the_conv_of_the_weight_difference(
    channels, out_channels, kernel, stride, dilation, pads, group
):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 13, 11, generator=generator) + 0.5  # a non-zero mean, as after a ReLU
    delta = torch.randn(out_channels, channels // group, *kernel, generator=generator) * 1e-2
    operation = SimpleNamespace(
        type="Conv",
        attributes={"strides": list(stride), "dilations": list(dilation), "pads": list(pads), "group": group},
    )
    top, left, bottom, right = pads
    reference = F.conv2d(F.pad(x, (left, right, top, bottom)), delta, stride=stride, dilation=dilation, groups=group)
    expected = reference.double().mean(dim=(0, 2, 3))
    means = _tap_means(operation, x, delta.shape)
    shift = _conv_of_tap_means(operation, delta, means)
    assert shift.shape == (out_channels,)
    assert torch.allclose(shift, expected, rtol=1e-5, atol=1e-9)


def test_other_ops_take_the_general_path():
    x = torch.randn(2, 4, 8)
    assert _tap_means(SimpleNamespace(type="Conv", attributes={}), x, (4, 4, 3)) is None  # 1-D conv
    assert (
        _tap_means(SimpleNamespace(type="Conv", attributes={"auto_pad": "SAME_UPPER"}), x[..., None], (4, 4, 3, 1))
        is None
    )
    assert _tap_means(SimpleNamespace(type="Gemm", attributes={}), x[0], (4, 8)) is None
