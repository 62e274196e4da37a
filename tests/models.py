"""Small models built in code, and the npy projects that calibrate them, shared by the tests.

Imported as ``xquant_test_models`` (``conftest.py`` registers it: never ``import tests``, PPQ's
wheel installs an unrelated top-level ``tests`` package).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def finish(graph: onnx.GraphProto, opset: int = 13) -> onnx.ModelProto:
    """The graph as a checked model at ``opset`` (IR version 8, what onnxruntime here loads)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def small_cnn(seed: int = 0, channels: int = 3, size: int = 16) -> onnx.ModelProto:
    """Conv-Relu-Conv-Add-Relu-GAP-Gemm with random weights: the fast pipeline tests' model."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": rng.normal(0, 0.3, (8, channels, 3, 3)),
        "b1": rng.normal(0, 0.1, (8,)),
        "w2": rng.normal(0, 0.3, (8, 8, 3, 3)),
        "b2": rng.normal(0, 0.1, (8,)),
        "wf": rng.normal(0, 0.3, (10, 8)),
        "bf": rng.normal(0, 0.1, (10,)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(array.astype(np.float32), name) for name, array in arrays.items()],
    )
    return finish(graph)


def two_input_model() -> onnx.ModelProto:
    """``Conv(left + right)``: two graph inputs, ``left`` and ``right``, [1, 3, 16, 16] each."""
    weight = numpy_helper.from_array(np.random.default_rng(3).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["left", "right"], ["sum"], name="add"),
            helper.make_node("Conv", ["sum", "w"], ["out"], pads=[1, 1, 1, 1], name="conv"),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("left", TensorProto.FLOAT, [1, 3, 16, 16]),
            helper.make_tensor_value_info("right", TensorProto.FLOAT, [1, 3, 16, 16]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])],
        [weight],
    )
    return finish(graph)


def npy_project(folder: Path, model: onnx.ModelProto, count: int, seed: int, calibration_type: str, **quant) -> dict:
    """``model`` saved as ``m.onnx`` in ``folder`` with ``count`` random normal npy samples of its
    input's shape (without the batch dimension) and their list; returns a config (dict) for them:
    onnxsim skipped, cpu, ``quantization_parameters`` = ``quant``."""
    onnx.save(model, str(folder / "m.onnx"))
    shape = [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(seed)
    for index in range(count):
        np.save(folder / f"x{index}.npy", rng.normal(0, 1, shape).astype(np.float32))
    (folder / "list.txt").write_text("\n".join(f"x{index}.npy" for index in range(count)))
    return {
        "model_parameters": {
            "onnx_model": str(folder / "m.onnx"),
            "working_dir": str(folder / "out"),
            "skip_onnxsim": True,
        },
        "calibration_parameters": {
            "calibration_step": count,
            "calibration_device": "cpu",
            "calibration_type": calibration_type,
            "input_parametres": [{"file_type": "npy", "data_list_path": str(folder / "list.txt")}],
        },
        "quantization_parameters": dict(quant),
    }


def depthwise_block(seed: int = 0) -> onnx.ModelProto:
    """BlazeFace's blocks in small: Conv-Relu, then a depthwise Conv -> pointwise Conv with no
    activation between them (what cross-layer equalization rescales; the depthwise filters' gains
    span 200x), added to the Relu's output padded with zero channels (a Concat, whose inputs share
    one scale) and Relu'd, then a 1x1 Conv. The exporter folds each Relu into the Q after it. The
    pointwise Conv's first output channel reads only the first depthwise channel, so its weights
    also change by one factor per output channel when that channel is equalized."""
    rng = np.random.default_rng(seed)
    gains = np.array([0.1, 1.0, 10.0, 0.3, 3.0, 1.0, 0.05, 5.0]).reshape(8, 1, 1, 1)
    arrays = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "b1": rng.normal(0, 0.1, (8,)),
        "wd": rng.normal(0, 0.3, (8, 1, 3, 3)) * gains,
        # the pointwise Conv's first output channel reads one input channel: it scales with it
        "wp": rng.normal(0, 0.3, (12, 8, 1, 1)) / gains.reshape(1, 8, 1, 1) ** 0.5 * (np.arange(12) > 0)[:, None, None, None]
        + np.eye(12, 8)[:, :, None, None] * (np.arange(12) == 0)[:, None, None, None],
        "bp": rng.normal(0, 0.1, (12,)),
        "zeros": np.zeros((1, 4, 16, 16)),
        "wo": rng.normal(0, 0.3, (4, 12, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["dw"], pads=[1, 1, 1, 1], group=8, name="depthwise"),
        helper.make_node("Conv", ["dw", "wp", "bp"], ["pw"], name="pointwise"),
        helper.make_node("Concat", ["r1", "zeros"], ["padded"], axis=1, name="pad"),
        helper.make_node("Add", ["pw", "padded"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "wo"], ["out"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(array.astype(np.float32), name) for name, array in arrays.items()],
    )
    return finish(graph)
