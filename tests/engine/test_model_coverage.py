"""Models beyond ImageNet CNNs, each failure seen on a real model reproduced on a tiny one.

- YOLOv8n (Ultralytics, opset 17): "opset version is not supported ... Resize" -> every opset 11-21;
- MTCNN O-net: PRelu slope [C,1,1] -> "Op Execution Error";
- a SAME_UPPER Conv with an even kernel came out too small ("Expected size 24 but got size 22");
- Silero VAD: If subgraphs, an RNN state [2,1,H] and an int64 scalar input;
- BlazeFace: the outputs came out in another order on every run;
- an op PPQ cannot run stopped the whole quantization;
- PP-OCRv4's recogniser: HardSwish written out as Add/Clip/Mul/Div, each inner tensor quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import xquant

RNG = np.random.default_rng(7)


def _weights(*shape, scale=0.3):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _project(tmp_path: Path, model: onnx.ModelProto, inputs: dict[str, list[np.ndarray]],
             **quantization) -> Path:
    """Model, one npy list per input (line k of each list is sample k) and a vendor-format config."""
    onnx.save(model, str(tmp_path / "m.onnx"))
    entries = []
    for name, samples in inputs.items():
        folder = tmp_path / name
        folder.mkdir()
        for index, sample in enumerate(samples):
            np.save(folder / f"{index}.npy", sample)
        (folder / "list.txt").write_text("".join(f"{index}.npy\n" for index in range(len(samples))))
        entries.append({"input_name": name, "file_type": "npy", "data_list_path": f"{name}/list.txt"})
    config = {"model_parameters": {"onnx_model": "m.onnx", "working_dir": "out"},
              "calibration_parameters": {"calibration_step": len(next(iter(inputs.values()))),
                                         "calibration_device": "cpu", "input_parametres": entries},
              "quantization_parameters": {"analysis_enable": False, **quantization}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _qdq_nodes(graph: onnx.GraphProto) -> int:
    count = sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)
    return count + sum(_qdq_nodes(attribute.g) for node in graph.node for attribute in node.attribute
                       if attribute.type == onnx.AttributeProto.GRAPH)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# --------------------------------------------------------------------------- opsets 11-21
def _yolo_like(opset: int) -> onnx.ModelProto:
    """Conv-SiLU, a nearest Resize, Concat, Split, a ReduceMean and a Softmax (YOLOv8's op mix)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Resize", ["c2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "a1"], ["cat"], axis=1),
        helper.make_node("Split", ["cat", "split"], ["p1", "p2"], axis=1),
        helper.make_node("Conv", ["p1", "w3", "b3"], ["c3"]),
        helper.make_node("ReduceMean", ["p2"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Add", ["c3", "mean"], ["sum"]),
        helper.make_node("Reshape", ["sum", "shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["scores"], axis=-1),
    ]
    inits = {"w1": _weights(8, 3, 3, 3), "b1": _weights(8), "w2": _weights(8, 8, 3, 3), "b2": _weights(8),
             "scales": np.array([1, 1, 2, 2], np.float32), "split": np.array([8, 8], np.int64),
             "w3": _weights(8, 8, 1, 1), "b3": _weights(8), "shape": np.array([1, 8, -1], np.int64)}
    graph = helper.make_graph(nodes, "yolo_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 8, 256]),
                               helper.make_tensor_value_info("cat", TensorProto.FLOAT, [1, 16, 16, 16])],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if opset > 13:  # onnx converts up, not down
        model = version_converter.convert_version(model, opset)
        model.ir_version = min(model.ir_version, 10)
    elif opset < 13:  # the opset-11 forms: Split sizes as an attribute, Resize with an (empty) roi
        split = next(node for node in model.graph.node if node.op_type == "Split")
        del split.input[1:]
        split.attribute.append(helper.make_attribute("split", [8, 8]))
        resize = next(node for node in model.graph.node if node.op_type == "Resize")
        resize.input[1] = "roi"
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", opset))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", range(11, 22))
def test_every_opset_from_11_to_21_quantizes_and_keeps_its_opset(tmp_path, opset):
    model = _yolo_like(opset)
    samples = [RNG.normal(size=(3, 32, 32)).astype(np.float32) for _ in range(8)]
    cfg = _project(tmp_path, model, {"x": samples}, finetune_level=0)
    quantized = xquant.quantize_onnx_model(str(cfg))
    versions = {entry.domain: entry.version for entry in quantized.opset_import}
    assert versions[""] == max(opset, 13)
    onnx.checker.check_model(quantized, full_check=True)
    assert [value.name for value in quantized.graph.output] == ["scores", "cat"]
    assert _qdq_nodes(quantized.graph) > 10
    feed = {"x": samples[0][None]}
    for want, got in zip(_run(model, feed), _run(quantized, feed)):
        assert got.shape == want.shape
        assert _cosine(want, got) > 0.99


# --------------------------------------------------------------------------- op semantics, end to end
def _single_input_model(nodes, inits, in_shape, out_name, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _quantizes_close_to_float(tmp_path, model, shape, **quantization):
    samples = [RNG.normal(size=shape).astype(np.float32) for _ in range(8)]
    cfg = _project(tmp_path, model, {"x": samples}, finetune_level=0, **quantization)
    quantized = xquant.quantize_onnx_model(str(cfg))
    feed = {"x": samples[0][None]}
    want, got = _run(model, feed)[0], _run(quantized, feed)[0]
    assert got.shape == want.shape
    assert _cosine(want, got) > 0.99
    return quantized


def test_prelu_with_a_per_channel_slope_quantizes(tmp_path):
    """MTCNN O-net: nn.PReLU(C) exported as a [C,1,1] slope."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["p"]),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    inits = {"w": _weights(6, 3, 3, 3), "b": _weights(6), "slope": RNG.uniform(0, 0.4, (6, 1, 1)).astype(np.float32),
             "w2": _weights(4, 6, 1, 1)}
    quantized = _quantizes_close_to_float(tmp_path, _single_input_model(nodes, inits, [1, 3, 12, 12], "y"), (3, 12, 12))
    assert "PRelu" in {node.op_type for node in quantized.graph.node}


def test_constant_of_shape_without_a_value_quantizes(tmp_path):
    """BlazeFace with skip_onnxsim: a ConstantOfShape with ONNX's default value (no attribute) made
    PPQ's exporter fail (``KeyError: 'value'``, exit 1)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros"]),
             helper.make_node("Concat", ["c", "zeros"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"])]
    inits = {"w": _weights(4, 3, 3, 3), "b": _weights(4), "zeros_shape": np.array([1, 2, 8, 8], np.int64),
             "w2": _weights(5, 6, 1, 1)}
    model = _single_input_model(nodes, inits, [1, 3, 8, 8], "y")
    _quantizes_close_to_float(tmp_path, model, (3, 8, 8))
    (tmp_path / "skip").mkdir()
    config = _project(tmp_path / "skip", model, {"x": [RNG.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(8)]},
                      finetune_level=0)
    raw = json.loads(config.read_text())
    raw["model_parameters"]["skip_onnxsim"] = True
    config.write_text(json.dumps(raw))
    quantized = xquant.quantize_onnx_model(str(config))
    assert _qdq_nodes(quantized.graph) > 0


def test_same_upper_conv_with_an_even_kernel_keeps_its_size(tmp_path):
    """A SAME_UPPER 2x2 conv beside a 3x3 'pads 1' conv, concatenated: sizes must agree."""
    nodes = [helper.make_node("Conv", ["x", "w_even"], ["even"], auto_pad="SAME_UPPER", kernel_shape=[2, 2]),
             helper.make_node("Conv", ["x", "w_odd"], ["odd"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["even", "odd"], ["cat"], axis=1),
             helper.make_node("MaxPool", ["cat"], ["y"], auto_pad="SAME_LOWER", kernel_shape=[2, 2], strides=[2, 2])]
    inits = {"w_even": _weights(4, 3, 2, 2), "w_odd": _weights(4, 3, 3, 3)}
    model = _single_input_model(nodes, inits, [1, 3, 24, 24], "y")
    quantized = _quantizes_close_to_float(tmp_path, model, (3, 24, 24))
    assert _run(quantized, {"x": np.zeros((1, 3, 24, 24), np.float32)})[0].shape == (1, 8, 12, 12)


def test_an_op_ppq_cannot_run_stays_float_and_the_rest_quantizes(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mish", ["c"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    model = _single_input_model(nodes, {"w": _weights(4, 3, 3, 3), "w2": _weights(4, 4, 1, 1)}, [1, 3, 8, 8], "y",
                                opset=18)
    quantized = _quantizes_close_to_float(tmp_path, model, (3, 8, 8))
    assert [node.op_type for node in quantized.graph.node].count("Mish") == 1
    assert _qdq_nodes(quantized.graph) >= 6


# --------------------------------------------------------------------------- decomposed HardSwish
def _decomposed_hard_activations(extra_output: bool = False) -> onnx.ModelProto:
    """paddle2onnx's HardSwish ``x * clip(x + 3, 0, 6) / 6`` and a HardSigmoid ``clip(x + 3, 0, 6) * (1/6)``."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["s1"]),
             helper.make_node("Clip", ["s1", "zero", "six"], ["r1"]),
             helper.make_node("Mul", ["c1", "r1"], ["m1"]),
             helper.make_node("Div", ["m1", "six"], ["hswish"]),
             helper.make_node("Conv", ["hswish", "w2", "b2"], ["c2"]),
             helper.make_node("Add", ["three", "c2"], ["s2"]),
             helper.make_node("Clip", ["s2", "zero", "six"], ["r2"]),
             helper.make_node("Mul", ["r2", "sixth"], ["hsig"]),
             helper.make_node("Mul", ["c2", "hsig"], ["y"])]
    inits = {"w1": _weights(6, 3, 3, 3), "b1": _weights(6), "w2": _weights(6, 6, 1, 1), "b2": _weights(6),
             "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
             "six": np.array(6.0, np.float32), "sixth": np.array([1 / 6], np.float32)}
    model = _single_input_model(nodes, inits, [1, 3, 10, 10], "y")
    if extra_output:
        model.graph.output.append(helper.make_tensor_value_info("m1", TensorProto.FLOAT, None))
    return model


def test_decomposed_hardswish_and_hardsigmoid_fuse_into_hardsigmoid_with_the_same_values():
    """PP-OCRv4's recogniser writes its 28 HardSwish out; int8 on each inner tensor cost 12 points of
    string accuracy. The fused graph computes the same function."""
    from xquant_core.rewrite import fuse_hard_activations

    model = _decomposed_hard_activations()
    fused = fuse_hard_activations(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in fused.graph.node] == ["Conv", "HardSigmoid", "Mul", "Conv", "HardSigmoid", "Mul"]
    assert {init.name for init in fused.graph.initializer} == {"w1", "b1", "w2", "b2"}
    feed = {"x": RNG.normal(size=(1, 3, 10, 10)).astype(np.float32) * 4}
    np.testing.assert_allclose(_run(fused, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)

    # an inner tensor someone else reads (here a model output) keeps that chain as it is
    kept = fuse_hard_activations(_decomposed_hard_activations(extra_output=True))
    assert [node.op_type for node in kept.graph.node].count("Clip") == 1

    # so does one an If branch reads from the outer graph
    branchy = _decomposed_hard_activations()
    branch = helper.make_graph([helper.make_node("Identity", ["s1"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    branchy.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    branchy.graph.node.append(helper.make_node("If", ["cond"], ["branch_out"], then_branch=branch, else_branch=branch))
    branchy.graph.output.append(helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None))
    types = [node.op_type for node in fuse_hard_activations(branchy).graph.node]
    assert types.count("Clip") == 1 and types.count("HardSigmoid") == 1  # the second chain still fuses


def test_a_model_with_decomposed_hardswish_quantizes_with_fewer_tensors(tmp_path):
    quantized = _quantizes_close_to_float(tmp_path, _decomposed_hard_activations(), (3, 10, 10))
    types = [node.op_type for node in quantized.graph.node]
    assert types.count("HardSigmoid") == 2 and "Clip" not in types and "Div" not in types
    assert types.count("QuantizeLinear") <= 7  # x, c1, the two HardSigmoids, hswish, c2, y


# --------------------------------------------------------------------------- outputs: names and order
def test_outputs_keep_their_names_and_order_byte_for_byte(tmp_path):
    """BlazeFace: four outputs, in the model's order (not sorted, not PPQ's), on every run."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    outputs = []
    for index, name in enumerate(["zeta:0", "Identity_1:0", "alpha", "Identity:0"]):
        nodes.append(helper.make_node("Conv", ["r", f"head{index}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    inits = {"w": _weights(8, 3, 3, 3), **{f"head{index}": _weights(index + 1, 8, 1, 1) for index in range(4)}}
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cfg = _project(tmp_path, model, {"x": [RNG.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(8)]})
    written = []
    for attempt in range(3):
        xquant.quantize_onnx_model(str(cfg), output=str(tmp_path / f"q{attempt}.onnx"))
        written.append((tmp_path / f"q{attempt}.onnx").read_bytes())
        quantized = onnx.load(str(tmp_path / f"q{attempt}.onnx"))
        assert [value.name for value in quantized.graph.output] == ["zeta:0", "Identity_1:0", "alpha", "Identity:0"]
        session = ort.InferenceSession(str(tmp_path / f"q{attempt}.onnx"), providers=["CPUExecutionProvider"])
        assert [output.shape[1] for output in session.get_outputs()] == [1, 2, 3, 4]
    assert written[0] == written[1] == written[2]



# --------------------------------------------------------------------------- control flow, any input rank
def _with_odd_interface(kind: str) -> onnx.ModelProto:
    """Conv -> Relu with an interface PPQ's export did not keep: an output that is an Identity of
    another output, one tensor listed twice, a weight as an output, an input nothing reads."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    outputs = [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 8, 8])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if kind == "identity":
        nodes.append(helper.make_node("Identity", ["r"], ["r2"]))
        outputs.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, [1, 4, 8, 8]))
    elif kind == "twice":
        outputs.append(outputs[0])
    elif kind == "weight":
        outputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]))
    elif kind == "unused_input":
        inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1, 2]))
    elif kind == "input_passed_through":  # an input nothing reads, returned as it is
        inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1, 2]))
        outputs.append(inputs[-1])
    inits = [numpy_helper.from_array(_weights(4, 3, 3, 3), "w"), numpy_helper.from_array(_weights(4), "b")]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind", ["identity", "twice", "weight", "unused_input", "input_passed_through"])
def test_the_model_is_called_as_the_float_one_whatever_its_interface(tmp_path, kind):
    """Each was refused (exit 1: "the quantized model's outputs are ['r'], the float model's
    ['r', 'r2']"), crashed in PPQ's exporter (a weight as an output) or lost an input."""
    model = _with_odd_interface(kind)
    samples = {"x": [RNG.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(8)]}
    if kind in ("unused_input", "input_passed_through"):
        samples["unused"] = [np.full((1, 2), 0.5, np.float32)] * 8
    quantized = xquant.quantize_onnx_model(str(_project(tmp_path, model, samples, finetune_level=0)))
    for values in ("input", "output"):
        assert [v.name for v in getattr(quantized.graph, values)] == [v.name for v in getattr(model.graph, values)]
    feed = {name: values[0][None] if name == "x" else values[0] for name, values in samples.items()}
    want, got = _run(model, feed), _run(quantized, feed)
    assert [g.dtype for g in got] == [w.dtype for w in want] and [g.shape for g in got] == [w.shape for w in want]
    assert all(_cosine(w, g) > 0.99 for w, g in zip(want, got))
    assert _qdq_nodes(quantized.graph) > 0
    if kind == "weight":
        assert np.array_equal(got[1], want[1])  # the float weight itself


def _vad_like() -> onnx.ModelProto:
    """Silero VAD's shape: If on an int64 scalar sample rate; each branch a Conv1d encoder reading the
    [1, 64] signal and the [2, 1, 8] RNN state from the outer scope."""
    def branch(tag: str, taps: int) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Unsqueeze", ["x", f"{tag}_axis"], [f"{tag}_x3"]),
            helper.make_node("Conv", [f"{tag}_x3", f"{tag}_w", f"{tag}_b"], [f"{tag}_c"], pads=[1, 1]),
            helper.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"]),
            helper.make_node("Conv", [f"{tag}_r", f"{tag}_w2"], [f"{tag}_c2"]),
            helper.make_node("ReduceMean", [f"{tag}_c2"], [f"{tag}_m"], axes=[2], keepdims=0),
            helper.make_node("Transpose", ["state"], [f"{tag}_st"], perm=[1, 0, 2]),
            helper.make_node("Reshape", [f"{tag}_st", f"{tag}_shape"], [f"{tag}_flat"]),
            helper.make_node("Concat", [f"{tag}_m", f"{tag}_flat"], [f"{tag}_h"], axis=1),
            helper.make_node("Gemm", [f"{tag}_h", f"{tag}_wo"], [f"{tag}_prob_logit"], transB=1),
            helper.make_node("Sigmoid", [f"{tag}_prob_logit"], [f"{tag}_prob"]),
            helper.make_node("Add", ["state", f"{tag}_delta"], [f"{tag}_state_out"]),
        ]
        inits = {f"{tag}_axis": np.array([1], np.int64), f"{tag}_w": _weights(8, 1, taps),
                 f"{tag}_b": _weights(8), f"{tag}_w2": _weights(8, 8, 1), f"{tag}_shape": np.array([1, 16], np.int64),
                 f"{tag}_wo": _weights(1, 24), f"{tag}_delta": _weights(2, 1, 8)}
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_prob", TensorProto.FLOAT, [1, 1]),
                                                  helper.make_tensor_value_info(f"{tag}_state_out", TensorProto.FLOAT,
                                                                                [2, 1, 8])],
                                 [numpy_helper.from_array(value, name) for name, value in inits.items()])

    nodes = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["prob", "stateN"], name="rate", then_branch=branch("k16", 3),
                              else_branch=branch("k8", 5))]
    graph = helper.make_graph(nodes, "vad_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 8]),
                               helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
                               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 8])],
                              [numpy_helper.from_array(np.array(16000, np.int64), "sr16k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _vad_samples(count=10):
    return {"x": [(RNG.normal(size=(1, 64)) * 0.5).astype(np.float32) for _ in range(count)],
            "state": [(RNG.normal(size=(2, 1, 8)) * 0.3).astype(np.float32) for _ in range(count)],
            "sr": [np.array(16000, np.int64) for _ in range(count)]}


@pytest.mark.slow
def test_the_exported_model_has_the_float_models_outputs_and_no_more():
    """Silero VAD with skip_onnxsim: PPQ's export of the lifted If branch carried two outputs more
    than the branch declares (4 against the other branch's 2), kept at the end of the list, and
    onnxruntime refused the If (exit 1). Restoring the interface keeps the float model's outputs."""
    from xquant_core.engine import forms

    reference = _with_odd_interface("identity")
    exported = onnx.ModelProto()
    exported.CopyFrom(reference)
    exported.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))  # an extra
    restored = forms.restore(exported, reference)
    assert [value.name for value in restored.graph.output] == ["r", "r2"]
    assert [value.name for value in restored.graph.input] == ["x"]


@pytest.mark.parametrize("skip_onnxsim", [False, True])
def test_if_branches_quantize_inside_and_the_untaken_branch_stays_float(tmp_path, run_xquant, skip_onnxsim):
    """With skip_onnxsim too (this small model quantized before as well; the real Silero VAD did not:
    :func:`test_the_exported_model_has_the_float_models_outputs_and_no_more`)."""
    model = _vad_like()
    samples = _vad_samples()
    cfg = _project(tmp_path, model, samples)
    raw = json.loads(cfg.read_text())
    raw["model_parameters"]["skip_onnxsim"] = skip_onnxsim
    cfg.write_text(json.dumps(raw))
    result = run_xquant("-c", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "control flow: 1 If branch(es) quantized: rate/then_branch" in result.stdout
    assert "no calibration sample takes rate/else_branch: left in float" in result.stdout
    assert "INT8: 3 of 6 Conv/ConvTranspose/Gemm/MatMul ops" in result.stdout
    quantized = onnx.load(str(tmp_path / "out" / "m.q.onnx"))
    onnx.checker.check_model(quantized, full_check=True)
    branches = {attribute.name: attribute.g for attribute in quantized.graph.node[-1].attribute}
    assert _qdq_nodes(branches["then_branch"]) >= 8
    assert _qdq_nodes(branches["else_branch"]) == 0
    assert [value.name for value in quantized.graph.output] == ["prob", "stateN"]
    for sr in (16000, 8000):  # both branches still run
        feed = {"x": samples["x"][0], "state": samples["state"][0], "sr": np.array(sr, np.int64)}
        for want, got in zip(_run(model, feed), _run(quantized, feed)):
            assert got.shape == want.shape
            assert _cosine(want, got) > 0.99


@pytest.mark.slow
def test_a_model_with_nothing_quantized_says_so(tmp_path, run_xquant):
    """Calibrated at 8 kHz only, the branch with every Conv is never taken: a warning, not a silent success."""
    model = _vad_like()
    samples = {**_vad_samples(8), "sr": [np.array(16000, np.int64)] * 8}
    for node in model.graph.node:  # every compute op in the 8 kHz branch: the 16 kHz one is a Sigmoid of a mean
        if node.op_type == "If":
            then = [attribute for attribute in node.attribute if attribute.name == "then_branch"][0].g
            del then.node[:]
            then.node.extend([helper.make_node("ReduceMean", ["x"], ["k16_m"], axes=[1], keepdims=1),
                              helper.make_node("Sigmoid", ["k16_m"], ["k16_prob"]),
                              helper.make_node("Add", ["state", "k16_delta"], ["k16_state_out"])])
            kept = [init for init in then.initializer if init.name == "k16_delta"]
            del then.initializer[:]
            then.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    cfg = _project(tmp_path, model, samples)
    result = run_xquant("-c", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "xquant: WARNING: nothing was quantized: none of the model's 3 Conv/ConvTranspose/Gemm/MatMul ops" \
        in result.stderr
    assert "no calibration sample takes rate/else_branch: left in float" in result.stdout
    assert "INT8: 0 of 3 Conv/ConvTranspose/Gemm/MatMul ops" in result.stdout


@pytest.mark.slow
def test_rnn_state_and_scalar_inputs_read_from_npy_and_name_the_shape_they_need(tmp_path, run_xquant):
    model = _vad_like()
    samples = _vad_samples(8)
    samples["state"][3] = samples["state"][3][:, 0]  # [2, 8] instead of [2, 1, 8]
    cfg = _project(tmp_path, model, samples)
    result = run_xquant("-c", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"Calibration input state: {tmp_path / 'state' / '3.npy'} holds shape "
                                          "[2, 8], expected [2, 1, 8]")
    assert "Traceback" not in result.stderr
