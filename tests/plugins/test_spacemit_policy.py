"""The SpacemiT policy, read back from exported graphs of small models built in code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xquant
from xquant_core.runtime import onnxruntime_session  # exact int8 arithmetic on every CPU


def _project(tmp_path: Path, model: onnx.ModelProto, shape, samples: int = 10, **quant) -> Path:
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(3)
    lines = []
    for index in range(samples):
        np.save(tmp_path / f"x{index}.npy", rng.normal(0, 1, shape[1:]).astype(np.float32))
        lines.append(f"x{index}.npy")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    config = {
        "model_parameters": {"onnx_model": "m.onnx"},
        "calibration_parameters": {"calibration_step": samples, "calibration_device": "cpu",
                                   "calibration_type": "minmax",
                                   "input_parametres": [{"file_type": "npy", "data_list_path": "list.txt"}]},
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, **quant},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def _model(nodes, inits, in_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(array, name) for name, array in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _conv_block(bias_scale: float = 0.1):
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
             "b": (rng.normal(0, 1, (4,)) * bias_scale).astype(np.float32),
             "shape": np.array([1, -1], dtype=np.int64), "wo": rng.normal(0, 0.1, (6, 256)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("Sigmoid", ["flat"], ["s"]),
             helper.make_node("Add", ["s", "flat"], ["sum"]),
             helper.make_node("Gemm", ["sum", "wo"], ["y"], transB=1)]
    return _model(nodes, inits, [1, 3, 8, 8], [1, 6])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return onnxruntime_session(str(path)).run(None, {"x": x})[0]


def test_exported_model_runs_and_tracks_float(tmp_path):
    config = _project(tmp_path, _conv_block(), (1, 3, 8, 8))
    model = xquant.quantize_onnx_model(str(config))
    onnx.checker.check_model(model)
    x = np.load(tmp_path / "x0.npy")[None]
    reference, quantized = _run(tmp_path / "m.onnx", x), _run(tmp_path / "m.q.onnx", x)
    # int8 over a range of ~4 has steps of ~0.016; a few steps of accumulated error at most
    assert np.abs(reference - quantized).max() < 0.1


def test_shape_op_shares_its_input_quantization(tmp_path):
    config = _project(tmp_path, _conv_block(), (1, 3, 8, 8))
    model = xquant.quantize_onnx_model(str(config))
    by_output = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    # the Reshape reads a dequantized tensor and its output is re-quantized with the same parameters
    before = by_output[reshape.input[0]]
    assert before.op_type == "DequantizeLinear"
    after = next(node for node in model.graph.node if node.op_type == "QuantizeLinear"
                 and node.input[0] == reshape.output[0])
    assert np.allclose(inits[before.input[1]], inits[after.input[1]])
    assert np.array_equal(inits[before.input[2]], inits[after.input[2]])


def test_model_output_stays_float(tmp_path):
    config = _project(tmp_path, _conv_block(), (1, 3, 8, 8))
    model = xquant.quantize_onnx_model(str(config))
    producer = {out: node for node in model.graph.node for out in node.output}["y"]
    assert producer.op_type == "Gemm"  # not a DequantizeLinear: the output is not rounded to int8


def test_bias_that_overflows_stays_float(tmp_path):
    # a bias of ~1e6 with input and weight scales of ~1e-2 needs > 2^20 in int32 units
    config = _project(tmp_path, _conv_block(bias_scale=1e6), (1, 3, 8, 8))
    model = xquant.quantize_onnx_model(str(config))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert conv.input[2] in {init.name for init in model.graph.initializer}  # a float initializer, no DQ
    (tmp_path / "small").mkdir()
    small = xquant.quantize_onnx_model(str(_project(tmp_path / "small", _conv_block(), (1, 3, 8, 8))))
    conv = next(node for node in small.graph.node if node.op_type == "Conv")
    producer = {out: node for node in small.graph.node for out in node.output}
    assert producer[conv.input[2]].op_type == "DequantizeLinear"


@pytest.mark.parametrize("level", [0, 2])
def test_precision_level_2_keeps_parameter_free_ops_float(tmp_path, level):
    config = _project(tmp_path, _conv_block(), (1, 3, 8, 8), precision_level=level)
    model = xquant.quantize_onnx_model(str(config))
    producer = {out: node for node in model.graph.node for out in node.output}
    sigmoid = next(node for node in model.graph.node if node.op_type == "Sigmoid")
    add = next(node for node in model.graph.node if node.op_type == "Add")
    sigmoid_output_quantized = any(node.op_type == "QuantizeLinear" and node.input[0] == sigmoid.output[0]
                                   for node in model.graph.node)
    add_reads_int8 = all(producer[name].op_type == "DequantizeLinear" for name in add.input)
    assert sigmoid_output_quantized == (level == 0)
    assert add_reads_int8 == (level == 0)


def test_matmul_constant_weight_is_per_channel_over_outputs(tmp_path):
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(0, 0.5, (16, 6)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    config = _project(tmp_path, _model(nodes, inits, [1, 16], [1, 6]), (1, 16))
    model = xquant.quantize_onnx_model(str(config))
    matmul = next(node for node in model.graph.node if node.op_type == "MatMul")
    producer = {out: node for node in model.graph.node for out in node.output}
    weight_dq = producer[matmul.input[1]]
    axis = next(attr.i for attr in weight_dq.attribute if attr.name == "axis")
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == weight_dq.input[1]))
    assert axis == 1 and scale.shape == (6,)
    x = np.load(tmp_path / "x0.npy")[None]
    assert np.abs(_run(tmp_path / "m.onnx", x) - _run(tmp_path / "m.q.onnx", x)).max() < 0.1


def test_post_processing_tail_after_the_last_compute_ops_stays_float(tmp_path):
    """Ops from which no Conv/Gemm/MatMul can be reached (a detector's Sigmoid, decode, output
    Concat) run in float; the convs that feed them read int8 and write float."""
    rng = np.random.default_rng(2)
    inits = {"wa": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "ba": np.zeros(4, np.float32),
             "wb": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "bb": np.zeros(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["sa"]),
             helper.make_node("Conv", ["x", "wb", "bb"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["b", "sa"], ["pixels"]),
             helper.make_node("Concat", ["sa", "pixels"], ["y"], axis=1)]
    config = _project(tmp_path, _model(nodes, inits, [1, 3, 8, 8], [1, 8, 8, 8]), (1, 3, 8, 8), finetune_level=1)
    model = xquant.quantize_onnx_model(str(config))
    producer = {out: node for node in model.graph.node for out in node.output}
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    assert [producer[name].op_type for name in concat.input] == ["Sigmoid", "Mul"]
    assert producer["sa"].input[0] == "a" and producer["a"].op_type == "Conv"  # Conv writes float
    conv = producer["a"]
    assert producer[conv.input[0]].op_type == "DequantizeLinear"  # and reads int8
    x = np.load(tmp_path / "x0.npy")[None]
    assert np.abs(_run(tmp_path / "m.onnx", x) - _run(tmp_path / "m.q.onnx", x)).max() < 0.1


def test_a_constant_concatenated_with_activations_keeps_its_zeros(tmp_path):
    """BlazeFace pads channels by concatenating zeros: the constant shares the Concat's int8 grid,
    whose zero point (-128 for a Relu output) the weights' [-127, 127] range could not write, and
    every padded channel came back as one step (0.027) instead of 0."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "zeros": np.zeros((1, 4, 8, 8), np.float32),
             "w2": rng.normal(0, 0.3, (5, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Concat", ["r", "zeros"], ["padded"], axis=1),
             helper.make_node("Conv", ["padded", "w2"], ["y"])]
    config = _project(tmp_path, _model(nodes, inits, [1, 3, 8, 8], [1, 5, 8, 8]), (1, 3, 8, 8))
    model = xquant.quantize_onnx_model(str(config))
    producer = {out: node for node in model.graph.node for out in node.output}
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    dq = producer[concat.input[1]]
    assert dq.op_type == "DequantizeLinear"
    restored = (values[dq.input[0]].astype(np.float64) - values[dq.input[2]]) * values[dq.input[1]]
    assert np.array_equal(restored, np.zeros_like(restored))


def _residual_relu_block():
    """Conv -> Add(residual) -> Relu -> Conv: the Add's sum has a negative half the Relu drops."""
    rng = np.random.default_rng(5)
    inits = {"w1": rng.normal(0, 0.4, (3, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(0, 0.4, (4, 3, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return _model(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8])


def test_add_then_relu_is_quantized_once_after_the_relu(tmp_path):
    """Like Conv -> Relu: the sum is not rounded on its own grid (its negative half wasted) before the Relu."""
    config = _project(tmp_path, _residual_relu_block(), [1, 3, 8, 8])
    out = tmp_path / "q.onnx"
    xquant.quantize_onnx_model(str(config), output=str(out))
    model = onnx.load(str(out))
    readers = {name: node for node in model.graph.node for name in node.input}
    add = next(node for node in model.graph.node if node.op_type == "Add")
    assert readers[add.output[0]].op_type == "Relu"  # no QuantizeLinear between them
    relu = readers[add.output[0]]
    assert readers[relu.output[0]].op_type == "QuantizeLinear"
    x = np.random.default_rng(9).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    reference = onnxruntime_session(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    got = _run(out, x)
    assert ((got - reference) ** 2).sum() / (reference ** 2).sum() < 0.01


def _depthwise_pointwise(gains):
    """Depthwise 3x3 (channel gains far apart, no activation) -> pointwise 1x1, and a second,
    regular Conv -> Conv pair that must be left alone."""
    rng = np.random.default_rng(6)
    channels = len(gains)
    depthwise = rng.normal(0, 1, (channels, 1, 3, 3)).astype(np.float32) * np.array(gains, np.float32)[:, None, None, None]
    inits = {"wd": depthwise, "wp": rng.normal(0, 0.5, (channels, channels, 1, 1)).astype(np.float32),
             "wr": rng.normal(0, 0.5, (channels, channels, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], pads=[1, 1, 1, 1], group=channels),
             helper.make_node("Conv", ["d", "wp"], ["p"]),
             helper.make_node("Conv", ["p", "wr"], ["y"])]
    return _model(nodes, inits, [1, channels, 8, 8], [1, channels, 8, 8])


def test_depthwise_pointwise_pairs_are_equalized_exactly():
    """The float graph computes the same; the depthwise output's channel ranges come together;
    the regular Conv -> Conv pair keeps its weights (equalizing those hurt the MobileNetV2 sample)."""
    import torch

    from xquant_core.engine.backend.ppq_ir import load_graph
    from xquant_core.engine.equalize import equalize_depthwise_pairs
    from ppq import TorchExecutor

    gains = [0.02, 1.0, 30.0, 0.5]
    graph = load_graph(_depthwise_pointwise(gains))
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    executor = TorchExecutor(graph, device="cpu")
    before_y, before_d = executor.forward({"x": x}, output_names=["y", "d"])
    regular = graph.operations[next(n for n, op in graph.operations.items() if op.inputs[1].name == "wr")].inputs[1].value.clone()
    assert equalize_depthwise_pairs(graph) == 1
    after_y, after_d = TorchExecutor(graph, device="cpu").forward({"x": x}, output_names=["y", "d"])
    torch.testing.assert_close(after_y, before_y, rtol=1e-4, atol=1e-4)
    spread = lambda d: (d.abs().amax(dim=(0, 2, 3)).max() / d.abs().amax(dim=(0, 2, 3)).min()).item()
    assert spread(before_d) > 500 and spread(after_d) < 30, (spread(before_d), spread(after_d))
    assert torch.equal(graph.operations[next(n for n, op in graph.operations.items() if op.inputs[1].name == "wr")].inputs[1].value, regular)


def test_a_clip_in_the_float_tail_quantizes(tmp_path):
    """Conv -> Relu -> Clip(min, max as inputs, opset 11) as the model's end: the Clip is in the
    float tail; PPQ's clip-value pass raised on it (found by the fuzz test)."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(0, 0.4, (2, 3, 3, 3)).astype(np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["y"])]
    model = _model(nodes, inits, [1, 3, 8, 8], [1, 2, 8, 8])
    model.opset_import[0].version = 11
    out = tmp_path / "q.onnx"
    xquant.quantize_onnx_model(str(_project(tmp_path, model, [1, 3, 8, 8])), output=str(out))
    x = np.random.default_rng(1).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    reference = onnxruntime_session(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    assert ((_run(out, x) - reference) ** 2).sum() / (reference ** 2).sum() < 0.01
    assert "QuantizeLinear" in _ops(onnx.load(str(out)))
