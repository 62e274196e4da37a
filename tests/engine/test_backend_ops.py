"""The float graph as PPQ runs it equals onnxruntime, op class by op class, at opsets 11 to 21.

Each case is a one-node model built here; xquant parses it the way the engine does
(:mod:`xquant_core.engine.forms`, :mod:`xquant_core.engine.backend.ops`) and runs it in
float with PPQ's executor. Before these fixes, PPQ 0.6.6 failed or disagreed on every
case marked "was:".
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
X4 = RNG.normal(size=(1, 4, 11, 12)).astype(np.float32)
X3 = RNG.normal(size=(1, 4, 20)).astype(np.float32)
X2 = RNG.normal(size=(1, 576)).astype(np.float32)


def _model(op, inputs, attrs, x, inits=None, opset=13, outputs=1):
    inits = inits or {}
    node = helper.make_node(op, list(inputs), [f"y{i}" for i in range(outputs)], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _f32(*shape, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


def _cases():
    cases = {}
    for shape in [(4, 1, 1), (1, 4, 1, 1), (1,), (), (12,), (11, 12), (4, 11, 12)]:  # was: all but (1,) and ()
        cases[f"PRelu slope {shape}"] = _model("PRelu", ["x", "s"], {}, X4, {"s": _f32(*shape, low=0, high=0.5)})
    for auto_pad in ["SAME_UPPER", "SAME_LOWER", "VALID"]:
        for k in [2, 3, 4]:
            for stride in [1, 2]:
                tag = f"{auto_pad} k{k} s{stride}"
                cases[f"Conv {tag}"] = _model("Conv", ["x", "w"], {"auto_pad": auto_pad, "strides": [stride] * 2}, X4,
                                              {"w": _f32(6, 4, k, k)})  # was: SAME gave the wrong size
                cases[f"ConvTranspose {tag}"] = _model("ConvTranspose", ["x", "w"],
                                                       {"auto_pad": auto_pad, "strides": [stride] * 2}, X4,
                                                       {"w": _f32(4, 3, k, k)})
                cases[f"MaxPool {tag}"] = _model("MaxPool", ["x"], {"auto_pad": auto_pad, "strides": [stride] * 2,
                                                                    "kernel_shape": [k, k]}, X4)
                cases[f"AveragePool {tag}"] = _model("AveragePool", ["x"], {"auto_pad": auto_pad,  # was: wrong values
                                                                            "strides": [stride] * 2,
                                                                            "kernel_shape": [k, k]}, X4)
    cases["Conv1d SAME_UPPER"] = _model("Conv", ["x", "w"], {"auto_pad": "SAME_UPPER"}, X3, {"w": _f32(5, 4, 3)})
    for pads in [[1, 1, 1, 1], [0, 1, 1, 0]]:
        for include in [0, 1]:
            for ceil in [0, 1]:
                cases[f"AveragePool pads {pads} count_include_pad {include} ceil {ceil}"] = _model(
                    "AveragePool", ["x"], {"strides": [2, 2], "kernel_shape": [3, 3], "pads": pads,
                                           "count_include_pad": include, "ceil_mode": ceil}, X4)
    weight = _f32(4, 3, 3, 3)
    for output_padding in [[1, 1], [0, 1]]:
        for pads in [[1, 1, 1, 1], [0, 1, 1, 0]]:  # was: wrong values with asymmetric pads
            cases[f"ConvTranspose output_padding {output_padding} pads {pads}"] = _model(
                "ConvTranspose", ["x", "w"], {"strides": [2, 2], "output_padding": output_padding, "pads": pads}, X4,
                {"w": weight})
    for auto_pad in ["NOTSET", "SAME_UPPER", "SAME_LOWER"]:  # was: failed
        attrs = {"strides": [2, 2], "output_shape": [22, 25], **({"auto_pad": auto_pad} if auto_pad != "NOTSET" else {})}
        cases[f"ConvTranspose output_shape {auto_pad}"] = _model("ConvTranspose", ["x", "w"], attrs, X4, {"w": weight})
    cases["Gelu tanh"] = _model("Gelu", ["x"], {"approximate": "tanh"}, X4, opset=20)  # was: exact gelu
    for mode in ["nearest", "linear", "cubic"]:
        for transform in ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"]:
            opset = 19 if transform == "half_pixel_symmetric" else 13
            for scales in [[1, 1, 2, 2], [1, 1, 1.5, 0.7]]:
                cases[f"Resize {mode} {transform} scales {scales}"] = _model(
                    "Resize", ["x", "", "sc"], {"mode": mode, "coordinate_transformation_mode": transform}, X4,
                    {"sc": np.array(scales, np.float32)}, opset=opset)
            cases[f"Resize {mode} {transform} sizes"] = _model(  # was: failed
                "Resize", ["x", "", "", "sz"], {"mode": mode, "coordinate_transformation_mode": transform}, X4,
                {"sz": np.array([1, 4, 17, 30], np.int64)}, opset=opset)
    for nearest in ["round_prefer_ceil", "floor", "ceil"]:
        cases[f"Resize nearest_mode {nearest}"] = _model("Resize", ["x", "", "sc"],
                                                         {"mode": "nearest", "nearest_mode": nearest}, X4,
                                                         {"sc": np.array([1, 1, 1.7, 0.6], np.float32)})
    for opset in [17, 18, 19, 21]:  # was: "opset version is not supported" at any opset but 10-13
        cases[f"Resize opset {opset}"] = _model("Resize", ["x", "", "sc"], {"mode": "nearest"}, X4,
                                                {"sc": np.array([1, 1, 2, 2], np.float32)}, opset=opset)
    cases["Resize antialias (onnxruntime)"] = _model("Resize", ["x", "", "sc"], {"mode": "linear", "antialias": 1}, X4,
                                                     {"sc": np.array([1, 1, 0.5, 0.5], np.float32)}, opset=18)
    cases["ReduceMean opset 18 axes input"] = _model("ReduceMean", ["x", "ax"], {"keepdims": 0}, X4,
                                                     {"ax": np.array([2, 3], np.int64)}, opset=18)
    cases["ReduceMax opset 18 no axes"] = _model("ReduceMax", ["x"], {"keepdims": 1}, X4, opset=18)
    cases["ReduceMean opset 13"] = _model("ReduceMean", ["x"], {"axes": [1], "keepdims": 1}, X4)
    cases["Split opset 18 num_outputs"] = _model("Split", ["x"], {"axis": 2, "num_outputs": 3}, X4, opset=18, outputs=3)
    cases["Split opset 18 sizes"] = _model("Split", ["x", "sp"], {"axis": 3}, X4, {"sp": np.array([5, 7], np.int64)},
                                           opset=18, outputs=2)
    cases["Pad opset 18 axes"] = _model("Pad", ["x", "p", "", "ax"], {}, X4,
                                        {"p": np.array([1, 2, 2, 1], np.int64), "ax": np.array([2, 3], np.int64)},
                                        opset=18)
    cases["Pad opset 18 negative axis reflect"] = _model("Pad", ["x", "p", "", "ax"], {"mode": "reflect"}, X4,
                                                         {"p": np.array([1, 2], np.int64),
                                                          "ax": np.array([-1], np.int64)}, opset=18)
    cases["Pad opset 19 wrap (onnxruntime)"] = _model("Pad", ["x", "p"], {"mode": "wrap"}, X4,
                                                      {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, opset=19)
    for mode in ["reflect", "edge", "wrap"]:  # was: reflect/edge failed outside torch's own cases
        cases[f"Pad {mode} rank 2"] = _model("Pad", ["x", "p"], {"mode": mode}, X2,
                                             {"p": np.array([0, 64, 0, 64], np.int64)}, opset=19)
        cases[f"Pad {mode} every axis"] = _model("Pad", ["x", "p"], {"mode": mode}, X4,
                                                 {"p": np.array([0, 1, 2, 1, 0, 1, 1, 2], np.int64)}, opset=19)
    cases["Pad constant value, negative pads"] = _model("Pad", ["x", "p", "v"], {}, X4,
                                                        {"p": np.array([0, 1, -2, 1, 0, 0, 2, -1], np.int64),
                                                         "v": np.array(0.5, np.float32)})
    cases["Mish (onnxruntime)"] = _model("Mish", ["x"], {}, X4, opset=18)  # was: PPQ cannot run it
    cases["LpNormalization (onnxruntime)"] = _model("LpNormalization", ["x"], {"axis": 1}, X4)
    cases["Softmax opset 11 (converted)"] = _model("Softmax", ["x"], {"axis": 1}, X4, opset=11)
    cases["Squeeze opset 11 (converted)"] = _model("Squeeze", ["x"], {"axes": [0]}, X4, opset=11)
    cases["LayerNormalization opset 21"] = _model("LayerNormalization", ["x", "g", "b"], {"axis": -1}, X4,
                                                  {"g": _f32(12), "b": _f32(12)}, opset=21)
    cases["HardSwish opset 14"] = _model("HardSwish", ["x"], {}, X4, opset=14)
    cases["Reshape opset 14 allowzero 0"] = _model("Reshape", ["x", "s"], {"allowzero": 0}, X4,
                                                   {"s": np.array([0, 4, -1], np.int64)}, opset=14)
    return cases


CASES = _cases()


def _run_as_ppq(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import torch

    from xquant_core.engine.backend.ppq_ir import load_graph
    from xquant_core.engine.backend.compat import import_ppq

    import_ppq()
    from ppq import TorchExecutor

    executor = TorchExecutor(load_graph(model), device="cpu")
    outputs = executor.forward({name: torch.from_numpy(value) for name, value in feeds.items()},
                               output_names=[value.name for value in model.graph.output])
    return [output.numpy() for output in outputs]


@pytest.mark.parametrize("name", list(CASES))
def test_float_graph_as_ppq_runs_it_equals_onnxruntime(name):
    model = CASES[name]
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    feeds = {"x": {2: X2, 3: X3, 4: X4}[rank]}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = _run_as_ppq(model, feeds)
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


def test_caffe_descriptor_is_read_from_the_generated_module_without_parsing_it():
    """PPQ's Caffe ``_pb2`` is rebuilt from its ``serialized_pb`` literal (protobuf >= 4): the
    literal is read from its tokens, the same bytes a full parse of the 0.5 MB module gives."""
    import ast
    import importlib.util
    from pathlib import Path

    from xquant_core.engine.backend import compat

    spec = importlib.util.find_spec("ppq")
    source = (Path(spec.submodule_search_locations[0]) / "parser" / "caffe" / "ppl_caffe_pb2.py").read_text()
    parsed = next(
        ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb"
    )
    assert compat._serialized_descriptor(source) == parsed and len(parsed) > 10000
    assert compat._serialized_descriptor("f(serialized_pb=b'ab'\n    b'cd', x=1)") == b"abcd"
    assert compat._serialized_descriptor("f(serialized_pb=None)") is None
    assert compat._serialized_descriptor("no descriptor here") is None
    # not written as protoc writes it: the whole module is parsed instead, and nothing raises
    assert compat._serialized_descriptor("f(\n  serialized_pb=b'ab'\n    b'cd'\n  , x=1)") == b"abcd"
    assert compat._serialized_descriptor("f(serialized_pb=b'ab' + x)") is None
    assert compat._serialized_descriptor("f(serialized_pb=_b('x'))") is None
    compat.import_ppq()
    from ppq.parser.caffe import ppl_caffe_pb2

    assert ppl_caffe_pb2.NetParameter.DESCRIPTOR.full_name == "caffe.NetParameter"
