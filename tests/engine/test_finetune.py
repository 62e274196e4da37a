"""Bias correction: the tap-mean shortcut for 2-D convolutions, and the running sum of inputs for the
other convolutions, equal running the conv on the weight difference for every batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

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


@pytest.mark.parametrize(
    "op, attributes, x_shape, w_shape",
    [
        ("ConvTranspose", {"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0]}, (2, 4, 7, 9), (4, 3, 3, 2)),
        ("ConvTranspose", {"group": 2, "strides": [2, 2]}, (2, 4, 6, 6), (4, 2, 2, 2)),
        ("Conv", {"auto_pad": "SAME_UPPER", "strides": [2]}, (2, 4, 21), (5, 4, 4)),
    ],
)
def test_bias_shift_of_a_convolution_sums_inputs_then_runs_the_op_once(op, attributes, x_shape, w_shape):
    """The running sum of batch means, run through the op once in apply(), gives the mean per-batch
    shift that running the op on the weight difference for every batch gives (it is linear)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from xquant_core.engine.backend import compat, ppq_ir
    from xquant_core.engine.finetune import BiasShift

    compat.import_ppq()
    from ppq import TorchExecutor

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(*w_shape, generator=generator)
    out_channels = w_shape[1] * attributes.get("group", 1) if op == "ConvTranspose" else w_shape[0]
    inits = [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(np.zeros(out_channels, np.float32), "b")]
    node = helper.make_node(op, ["x", "w", "b"], ["y"], **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    ppq_graph = ppq_ir.load_graph(onnx.load_from_string(model.SerializeToString()))
    executor = TorchExecutor(ppq_graph, device="cpu")
    operation = next(iter(ppq_graph.operations.values()))
    context = ppq_ir.op_context(executor)
    delta = torch.randn(*w_shape, generator=generator) * 1e-2
    batches = [torch.randn(*x_shape, generator=generator) + 0.5 for _ in range(3)]

    shift = BiasShift(operation, context)
    for x in batches:
        shift.observe([x, weight], [x, weight - delta])
    shift.apply()
    got = operation.inputs[2].value.double()

    expected = torch.zeros(out_channels, dtype=torch.float64)
    for x in batches:
        difference = ppq_ir.run_op(operation, [x, delta], context).double()
        expected += difference.mean(dim=[d for d in range(difference.ndim) if d != 1])
    expected /= len(batches)
    assert got.abs().max() > 1e-4  # the weight difference moves the mean: there is something to compare
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
