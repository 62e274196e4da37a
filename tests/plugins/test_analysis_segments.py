"""The report's segmented runs (analysis/segments.py): the whole model's values, less alive at once."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xquant_test_models import finish, npy_project, small_cnn

from xquant_core.runtime import onnxruntime_session
from xquant_plugins.analysis.segments import SegmentedModel, groups_within, tensor_bytes

measure_module = importlib.import_module("xquant_plugins.analysis.measure")
RNG = np.random.default_rng(7)


def _weights(*shape: int) -> np.ndarray:
    return (RNG.normal(size=shape) * 0.3).astype(np.float32)


def skip_and_branch_model() -> onnx.ModelProto:
    """Conv -> Relu -> Conv, a skip connection from the first Relu to the last Add, and an If whose
    branches read the first Relu's output from the outer scope."""

    def branch(tag: str, factor: float) -> onnx.GraphProto:
        nodes = [helper.make_node("Mul", ["r1", f"{tag}_k"], [f"{tag}_out"])]
        return helper.make_graph(
            nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [1, 4, 8, 8])],
            [numpy_helper.from_array(np.array(factor, np.float32), f"{tag}_k")],
        )  # fmt: skip

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "zero"], ["positive"]),
        helper.make_node(
            "If", ["positive"], ["branched"], then_branch=branch("up", 2.0), else_branch=branch("down", 0.5)
        ),
        helper.make_node("Add", ["r2", "branched"], ["y"]),
    ]
    inits = {"w1": _weights(4, 3, 3, 3), "w2": _weights(4, 4, 3, 3), "zero": np.array(0.0, np.float32)}
    graph = helper.make_graph(
        nodes, "skip_and_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )  # fmt: skip
    return finish(graph, opset=13)


def whole_values(model: onnx.ModelProto, names: list[str], batch: dict) -> dict:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        if name not in {value.name for value in copy.graph.output}:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    session = onnxruntime_session(copy)  # the whole run's session, as the report makes it
    return dict(zip(names, session.run(names, batch)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_segments_give_the_whole_models_values_across_skips_and_branches(sign):
    model = skip_and_branch_model()
    batch = {"x": (sign * np.abs(RNG.normal(size=(1, 3, 8, 8)))).astype(np.float32)}
    fetches = [["x", "r1"], ["c2"], ["branched", "y"]]
    segmented = SegmentedModel(model, fetches)
    assert segmented.segments is not None and len(segmented.segments) == 3
    # the If reads r1 from the first segment, the last Add reads r2 from the second
    assert "r1" in segmented.segments[0].outputs and "r1" in segmented.segments[2].inputs
    parts = list(segmented.run(batch))
    assert [sorted(part) for part in parts] == [sorted(names) for names in fetches]
    reference = whole_values(model, ["r1", "c2", "branched", "y"], batch)
    for part in parts:
        for name, value in part.items():
            expected = batch["x"] if name == "x" else reference[name]
            assert np.array_equal(value, expected), name
    again = list(segmented.run(batch))  # the sessions are reused: the same values
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(parts, again) for k in a)


def test_one_group_runs_the_whole_model():
    model = small_cnn()
    first = model.graph.node[0].output[0]
    segmented = SegmentedModel(model, [[first, "input"]])
    assert segmented.segments is None
    (part,) = segmented.run({"input": np.zeros((1, 3, 16, 16), np.float32)})
    assert sorted(part) == sorted([first, "input"])  # what was fetched, a graph input included


def test_groups_stay_within_the_budget_and_keep_the_order():
    assert groups_within("abcde", [3, 3, 3, 9, 1], 6) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert groups_within("ab", [1, 1], 6) == [["a", "b"]]


def test_tensor_sizes_come_from_the_batchs_shapes():
    model = skip_and_branch_model()
    sizes = tensor_bytes(model, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert sizes["c1"] == sizes["r2"] == 4 * 8 * 8 * 4


def test_a_segmented_measurement_equals_the_whole_one(monkeypatch, tmp_path):
    """The report's figures do not depend on the segment budget (the real detector's report in
    4 and in 14 segments was the same Markdown byte for byte as the whole run's)."""
    import xquant

    float_model = small_cnn(seed=3)
    config = npy_project(tmp_path, float_model, 8, 3, "default", analysis_enable=False)
    quant_model = xquant.quantize_onnx_model(config, output=tmp_path / "q.onnx")
    batches = [{"input": np.load(tmp_path / f"x{i}.npy")[None]} for i in range(4)]
    whole = measure_module.measure(float_model, quant_model, batches)
    monkeypatch.setattr(measure_module, "SEGMENT_BYTES", 1)  # every probe a group of its own
    graph = measure_module._QdqGraph(quant_model, float_model)
    probes = sorted({p for op in whole.ops for p in op.inputs + op.outputs + op.raw_outputs}, key=str)
    assert len(measure_module.probe_groups(float_model, graph, probes, batches[0])) == len(probes) > 3
    split = measure_module.measure(float_model, quant_model, batches)
    assert split.stats.keys() == whole.stats.keys() and split.stats == whole.stats
    assert split.outputs == whole.outputs


def test_comparisons_run_in_order_off_the_calling_thread_and_failures_surface():
    import threading

    seen: list[tuple[int, int]] = []
    with measure_module._InOrder() as compare:
        for index in range(20):
            compare.submit(lambda i: seen.append((i, threading.get_ident())), index)
    assert [i for i, _ in seen] == list(range(20))
    assert {thread for _, thread in seen} != {threading.get_ident()}

    def broken(_):
        raise ValueError("comparison failed")

    with pytest.raises(ValueError, match="comparison failed"):
        with measure_module._InOrder() as compare:
            compare.submit(broken, 0)


def test_a_segment_onnxruntime_cannot_run_makes_the_model_run_whole(monkeypatch):
    """The report is advice: a segmentation onnxruntime refuses (here: every segment session
    fails) costs memory, not the report; the values are the whole model's."""
    import xquant_plugins.analysis.segments as segments

    model = skip_and_branch_model()
    batch = {"x": np.abs(RNG.normal(size=(1, 3, 8, 8))).astype(np.float32)}
    fetches = [["x", "r1"], ["c2"], ["branched", "y"]]
    original = segments.onnxruntime_session

    def refusing(model_bytes, *args, low_memory=False, **kwargs):
        if low_memory:  # the segments' sessions
            raise RuntimeError("segment refused")
        return original(model_bytes, *args, **kwargs)

    monkeypatch.setattr(segments, "onnxruntime_session", refusing)
    segmented = SegmentedModel(model, fetches)
    parts = list(segmented.run(batch))
    assert segmented.segments is None and [sorted(p) for p in parts] == [sorted(f) for f in fetches]
    reference = whole_values(model, ["r1", "c2", "branched", "y"], batch)
    assert all(np.array_equal(part[name], batch["x"] if name == "x" else reference[name])
               for part in parts for name in part)  # fmt: skip
