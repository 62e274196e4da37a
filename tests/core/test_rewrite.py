"""The exact float rewrites of xquant_core.rewrite: constant scales and shifts folded into Conv.

PP-OCRv4's recogniser (PP-LCNetV3) follows each activation with a learnable ``x * s + b`` and
paddle2onnx writes some Conv biases as a separate Add: each is one more int8 tensor. Folded, the
graph computes the same function (checked with onnxruntime) with fewer tensors to quantize.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xquant_core.rewrite import fold_affine_into_conv

RNG = np.random.default_rng(11)


def _array(*shape, scale=0.5, offset=0.0):
    return (RNG.normal(size=shape) * scale + offset).astype(np.float32)


def _model(nodes, inits, shape=(1, 4, 9, 9), outputs=("y",), constant_nodes=()) -> onnx.ModelProto:
    """A float model with input ``x``; ``constant_nodes`` of ``inits`` are stored as Constant nodes."""
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(inits[name], name))
             for name in constant_nodes] + list(nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()
                               if name not in constant_nodes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _folded(model: onnx.ModelProto, keep=()) -> onnx.ModelProto:
    """Fold a copy of ``model``, and check it computes what the model does."""
    folded = fold_affine_into_conv(onnx.ModelProto.FromString(model.SerializeToString()), keep)
    feed = {"x": _array(*[dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim], scale=2)}
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
                 for m in (model, folded))
    assert [value.name for value in folded.graph.output] == [value.name for value in model.graph.output]
    for expected, actual in zip(want, got):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    return folded


def _types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node if node.op_type != "Constant"]


def test_constant_ops_after_a_conv_go_into_its_weights_and_bias():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "bias"], ["a"]),  # paddle2onnx's separate bias
             helper.make_node("Mul", ["scale", "a"], ["m"]),  # constant first
             helper.make_node("Sub", ["m", "shift"], ["d"]),
             helper.make_node("Div", ["d", "two"], ["y"])]
    inits = {"w": _array(6, 4, 3, 3), "bias": _array(1, 6, 1, 1), "scale": _array(6, 1, 1, offset=1),
             "shift": _array(6, 1, 1), "two": np.array(2.0, np.float32)}
    folded = _folded(_model(nodes, inits))
    assert _types(folded) == ["Conv"]
    assert folded.graph.node[0].output[0] == "y"
    assert {init.name for init in folded.graph.initializer} == {"w", "w_bias"}  # the others are gone


def test_a_scale_and_shift_before_an_unpadded_depthwise_conv_fold_in_two_passes():
    """PP-LCNetV3's learnable affine ``x * s + b`` after an activation, in front of a 1x1 depthwise
    Conv: the shift goes into the bias, then the scale into the weights."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Conv", ["a", "w", "cb"], ["y"], group=4)]
    inits = {"s": _array(1, 4, 1, 1, offset=1), "b": _array(1, 4, 1, 1), "w": _array(4, 1, 1, 1), "cb": _array(4)}
    folded = _folded(_model(nodes, inits))
    assert _types(folded) == ["Relu", "Conv"] and folded.graph.node[1].input[0] == "r"


def test_a_scale_and_shift_before_a_padded_conv_stay():
    """``Conv(W * s)(x + b / s)`` would be the same function, but the int8 tensor ``x + b / s``
    spans ``b / s`` of the smallest ``s``: not done."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Conv", ["a", "w", "cb"], ["y"], pads=[1, 1, 1, 1], group=4)]
    inits = {"s": _array(1, 4, 1, 1, offset=1), "b": _array(1, 4, 1, 1), "w": _array(4, 1, 3, 3), "cb": _array(4)}
    assert _types(_folded(_model(nodes, inits))) == ["Relu", "Mul", "Add", "Conv"]


def test_a_scale_before_a_padded_conv_and_a_shift_before_an_unpadded_one_fold():
    nodes = [helper.make_node("Div", ["x", "d"], ["q"]),
             helper.make_node("Conv", ["q", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Sub", ["r", "mean"], ["centred"]),
             helper.make_node("Conv", ["centred", "w2", "b2"], ["y"], group=2)]
    inits = {"d": np.array(3.0, np.float32), "w1": _array(6, 4, 3, 3), "mean": _array(1, 6, 1, 1),
             "w2": _array(4, 3, 1, 1), "b2": _array(4)}
    assert _types(_folded(_model(nodes, inits))) == ["Conv", "Relu", "Conv"]


def test_a_shift_before_a_padded_conv_is_left_alone():
    """Padding would see zeros where the shifted tensor has ``b``: not the same function."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Add", ["r", "b"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
    folded = _folded(_model(nodes, {"b": _array(1, 4, 1, 1), "w": _array(6, 4, 3, 3)}))
    assert _types(folded) == ["Relu", "Add", "Conv"]


def test_weights_in_constant_nodes_fold_too():
    """PP-OCRv4's detector and recogniser store their weights as Constant nodes."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["y"])]
    inits = {"w": _array(6, 4, 1, 1), "b": _array(6), "s": _array(1, 6, 1, 1, offset=1)}
    folded = _folded(_model(nodes, inits, constant_nodes=("w", "b", "s")))
    assert _types(folded) == ["Conv"]
    assert [node.output[0] for node in folded.graph.node if node.op_type == "Constant"] == ["w", "b"]


@pytest.mark.parametrize("why", ["model output", "named in the config", "read by a branch", "shared weight",
                                 "channel-last constant", "integer constant"])
def test_tensors_others_need_are_not_folded_away(why):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Add", ["c", "b"], ["y"])]
    inits = {"w": _array(4, 4, 1, 1), "b": _array(1, 4, 1, 1)}
    outputs, keep = ["y"], ()
    if why == "model output":
        outputs.append("c")
    elif why == "named in the config":
        keep = ("c",)
    elif why == "read by a branch":
        branch = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "then", [],
                                   [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
        inits["cond"] = np.array(True)
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
        outputs.append("z")
    elif why == "shared weight":
        nodes.append(helper.make_node("Conv", ["y", "w"], ["z"]))
        outputs = ["z"]
    elif why == "channel-last constant":  # [C] broadcasts on the last axis, W here, not channels
        inits["b"] = _array(4)
        nodes[0] = helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 0, 0, 0])
        return _assert_unchanged(_model(nodes, inits, shape=(1, 4, 4, 4), outputs=outputs), keep)
    else:
        nodes[1] = helper.make_node("Add", ["c", "one"], ["y"])
        nodes.insert(0, helper.make_node("Cast", ["b"], ["one"], to=TensorProto.FLOAT))
        inits["b"] = np.ones((1, 4, 1, 1), np.int64)
    _assert_unchanged(_model(nodes, inits, outputs=outputs), keep)


def _assert_unchanged(model: onnx.ModelProto, keep) -> None:
    assert _types(_folded(model, keep)) == _types(model)


def test_a_folded_model_quantizes_with_fewer_tensors(tmp_path):
    """The point of folding: ``Conv -> Mul -> Add -> Relu -> Mul -> Add -> Conv`` is ``Conv -> Relu -> Conv``,
    two int8 activations: the input and the Relu's output."""
    import json

    import xquant

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "s1"], ["m1"]),
             helper.make_node("Add", ["m1", "t1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Mul", ["r1", "s2"], ["m2"]),
             helper.make_node("Add", ["m2", "t2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w2", "b2"], ["y"])]
    inits = {"w1": _array(6, 3, 3, 3), "b1": _array(6), "s1": _array(1, 6, 1, 1, offset=1),
             "t1": _array(1, 6, 1, 1), "s2": _array(1, 6, 1, 1, offset=1), "t2": _array(1, 6, 1, 1),
             "w2": _array(4, 6, 1, 1), "b2": _array(4)}
    model = _model(nodes, inits, shape=(1, 3, 10, 10))
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "data").mkdir()
    for index in range(8):
        np.save(tmp_path / "data" / f"{index}.npy", _array(1, 3, 10, 10, scale=1))
    (tmp_path / "list.txt").write_text("".join(f"data/{index}.npy\n" for index in range(8)))
    config = {"model_parameters": {"onnx_model": "m.onnx", "working_dir": str(tmp_path)},
              "calibration_parameters": {"calibration_step": 8, "calibration_device": "cpu",
                                         "input_parametres": [{"input_name": "x", "file_type": "npy",
                                                               "data_list_path": "list.txt"}]},
              "quantization_parameters": {"finetune_level": 0, "analysis_enable": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    quantized = xquant.quantize_onnx_model(str(tmp_path / "cfg.json"))
    types = [node.op_type for node in quantized.graph.node]
    assert [t for t in types if t not in ("QuantizeLinear", "DequantizeLinear")] == ["Conv", "Relu", "Conv"]
    assert types.count("QuantizeLinear") == 2  # the input and the Relu's output (the model output stays float)
    feed = {"x": _array(1, 3, 10, 10, scale=1)}
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                 for m in (model, quantized))
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99
