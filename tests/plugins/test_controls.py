"""Quantization controls, read back from the exported graphs: custom_setting,
precision_level, truncate_var_names."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xquant
from xquant_core.errors import ModelError
from xquant_test_models import finish, npy_project


def _swish_model() -> onnx.ModelProto:
    """Conv -> SiLU (Sigmoid x Mul) -> Conv -> Add(residual) -> GAP -> Flatten -> Gemm -> Softmax-free head,
    then a float "post-processing" tail (Mul by a constant + ReduceMax) to cut off."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, (8,)),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)), "b2": rng.normal(0, 0.1, (8,)),
        "wf": rng.normal(0, 0.3, (6, 8)), "bf": rng.normal(0, 0.1, (6,)),
        "k": np.array([2.0]), "axes": np.array([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Sigmoid", ["c1"], ["g1"], name="gate"),
        helper.make_node("Mul", ["c1", "g1"], ["s1"], name="swish"),
        helper.make_node("Conv", ["s1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "s1"], ["a1"], name="residual"),
        helper.make_node("GlobalAveragePool", ["a1"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["head"], transB=1, name="fc"),
        helper.make_node("Mul", ["head", "k"], ["scaled"], name="post_scale"),
        helper.make_node("ReduceMax", ["scaled"], ["y"], keepdims=1, name="post_max"),
    ]
    graph = helper.make_graph(
        nodes, "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(value.astype(np.float32) if value.dtype == np.float64 else value, name)
         for name, value in inits.items()])
    return finish(graph)


@pytest.fixture
def project(tmp_path) -> dict:
    return npy_project(tmp_path, _swish_model(), 10, 5, "percentile", analysis_enable=False, finetune_level=0)


def _with(config: dict, **quant) -> dict:
    config = copy.deepcopy(config)
    config["quantization_parameters"].update(quant)
    return config


def _int8_ops(model: onnx.ModelProto) -> set[str]:
    """Nodes that run in int8, read the QDQ way: every non-constant input comes from a
    DequantizeLinear, and the output goes only into QuantizeLinear (or the node reads int8
    weights: Conv/Gemm/MatMul accumulate in int32 and may write float)."""
    inits = {init.name: init for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    result = set()
    for node in model.graph.node:
        if node.op_type in {"QuantizeLinear", "DequantizeLinear"}:
            continue
        data = [name for name in node.input if name and name not in inits]
        if not data or not all(name in producer and producer[name].op_type == "DequantizeLinear" for name in data):
            continue
        int8_weight = any(producer[name].input[0] in inits
                          and inits[producer[name].input[0]].data_type == TensorProto.INT8 for name in data)
        quantized_out = all(consumer.op_type == "QuantizeLinear"
                            for out in node.output for consumer in consumers.get(out, [None])
                            if consumer is not None) and any(out in consumers for out in node.output)
        if int8_weight or quantized_out:
            result.add(node.name)
    return result


def test_precision_levels_0_1_2(project):
    int8 = {n: _int8_ops(xquant.quantize_onnx_model(_with(project, precision_level=n))) for n in (0, 1, 2)}
    assert {"gate", "swish", "residual"} <= int8[0]
    # level 1: the SiLU product (Sigmoid x Mul of two activations) stays float, the residual Add does not
    assert {"gate", "swish"}.isdisjoint(int8[1]) and "residual" in int8[1]
    # level 2: parameter-free Add too
    assert {"gate", "swish", "residual"}.isdisjoint(int8[2])
    # ops with weights stay int8 at every level
    for ops in int8.values():
        assert {"conv1", "conv2", "fc"} <= ops


def test_global_precision_level_3_is_dynamic_quantization(project, tmp_path):
    model = xquant.quantize_onnx_model(_with(project, precision_level=3))
    ops = [node.op_type for node in model.graph.node]
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and "QuantizeLinear" not in ops
    x = np.load(tmp_path / "x0.npy")[None]
    reference = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    dynamic = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(reference - dynamic).max() < 0.05 * np.abs(reference).max()



def test_global_level_3_on_a_platform_without_a_dynamic_mode_is_a_config_error(project, monkeypatch):
    """Global level 3 is the platform's dynamic mode (SpacemiT's, xquant_plugins/spacemit/dynamic.py);
    a platform that has none refuses it, naming the field, before any data is read."""
    from xquant_core import pipeline
    from xquant_core.errors import ConfigError

    real = pipeline.registry

    class Static:  # the SpacemiT platform without quantize_dynamic
        def __init__(self, base):
            self._base = base

        def __getattr__(self, name):
            if name == "quantize_dynamic":
                raise AttributeError(name)
            return getattr(self._base, name)

    class Platforms:
        def get(self, name):
            return Static(real("platform").get(name))

    monkeypatch.setattr(pipeline, "registry", lambda kind: Platforms() if kind == "platform" else real(kind))
    with pytest.raises(ConfigError,
                       match=r"precision_level: 3 \(dynamic quantization\) is not something platform spacemit"):
        xquant.quantize_onnx_model(_with(project, precision_level=3))

def test_custom_setting_level_3_keeps_the_subgraph_float(project):
    setting = {"input_names": ["s1"], "output_names": ["a1"], "precision_level": 3}
    model = xquant.quantize_onnx_model(_with(project, custom_setting=[setting]))
    int8 = _int8_ops(model)
    assert "conv2" not in int8 and "residual" not in int8  # inside: float
    assert {"conv1", "fc"} <= int8  # outside: int8
    weights = {init.name: init for init in model.graph.initializer}
    assert numpy_helper.to_array(weights["w2"]).dtype == np.float32
    assert numpy_helper.to_array(weights["w1"]).dtype == np.int8


def test_custom_setting_calibration_type_and_percentile_apply_to_the_subgraph_only(project):
    def scales(model):
        inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        return {node.input[0]: float(inits[node.input[1]]) for node in model.graph.node
                if node.op_type == "QuantizeLinear"}

    base = scales(xquant.quantize_onnx_model(project))
    setting = {"input_names": ["s1"], "output_names": ["a1"], "calibration_type": "minmax"}
    tuned = scales(xquant.quantize_onnx_model(_with(project, custom_setting=[setting])))
    changed = {name for name in base if not np.isclose(base[name], tuned[name])}
    assert changed  # minmax widened some ranges inside the subgraph ...
    assert all(name in {"s1", "c2", "a1"} or name.startswith("PPQ_") for name in changed)
    assert np.isclose(base["x"], tuned["x"])  # ... and left the model input alone


@pytest.mark.parametrize("setting, message", [
    ({"input_names": ["nope"], "output_names": ["a1"], "precision_level": 3},
     "custom_setting[0].input_names: var name nope not in the graph."),
    ({"input_names": ["s1"], "output_names": ["x"], "precision_level": 3},
     "custom_setting[0]: no op lies between input_names ['s1'] and output_names ['x']"),
])
def test_custom_setting_errors(project, setting, message):
    with pytest.raises(ModelError, match=None) as error:
        xquant.quantize_onnx_model(_with(project, custom_setting=[setting]))
    assert message in str(error.value)


def test_truncate_keeps_post_processing_float_and_the_interface(project, tmp_path):
    model = xquant.quantize_onnx_model(_with(project, truncate_var_names=["head"]))
    onnx.checker.check_model(model)
    assert [value.name for value in model.graph.input] == ["x"]
    assert [value.name for value in model.graph.output] == ["y"]
    int8 = _int8_ops(model)
    assert {"conv1", "conv2", "fc"} <= int8
    assert "post_scale" not in int8 and "post_max" not in int8
    post = [node for node in model.graph.node if node.name in {"post_scale", "post_max"}]
    assert [node.op_type for node in post] == ["Mul", "ReduceMax"]
    x = np.load(tmp_path / "x0.npy")[None]
    reference = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    quantized = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(reference - quantized).max() < 0.1 * np.abs(reference).max()


@pytest.mark.parametrize("names, message", [
    (["head", "head"], "truncate graph failed. truncate_var_names lists head more than once"),
    (["nope"], "truncate graph failed. var name(s) not in the graph: nope"),
    (["y"], "truncate graph failed. nothing lies below y"),
    (["c2"], "truncate graph failed. tensor(s) s1 also cross from above the cut to below it"),
])
def test_truncate_errors(project, names, message):
    with pytest.raises(ModelError) as error:
        xquant.quantize_onnx_model(_with(project, truncate_var_names=names))
    assert message in str(error.value)


def test_control_errors_exit_2_without_traceback(project, tmp_path, run_xquant):
    config = _with(project, truncate_var_names=["nope"])
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    result = run_xquant("-c", str(tmp_path / "cfg.json"))
    assert result.returncode == 2
    assert "truncate graph failed." in result.stderr and "Traceback" not in result.stderr


def test_default_offers_the_percentile_window_and_the_histogram_search_with_the_same_rules():
    from xquant_core.calibration import CalibrationContext, TensorStatistics, percentile_range
    from xquant_plugins.calibration import Default, _WindowSearch

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 200_000), [40.0]])  # one far outlier
    histogram, _ = np.histogram(values, bins=4096, range=(values.min(), values.max()))
    context = CalibrationContext(max_percentile=0.9999)

    def stats(consumers=("Conv",), output=False):
        return TensorStatistics("t", float(values.min()), float(values.max()), histogram.astype(np.float64),
                                consumers, output)

    percentile, wider, search = Default().candidate_ranges(stats(), context)
    assert 3.0 < percentile[1] < wider[1] < 40.0  # the outlier is clipped, less so by the wider window
    assert wider == percentile_range(stats(), 0.99999)
    assert search == _WindowSearch().compute_range(stats(), context)
    assert Default().compute_range(stats(), context) == percentile
    assert Default().candidate_ranges(stats(output=True), context) == [(values.min(), values.max())]
    wide = TensorStatistics("t", -30.0, 30.0, np.ones(4096), ("Sigmoid",), False)
    assert all(low >= -10.0 and high <= 10.0 for low, high in Default().candidate_ranges(wide, context))


@pytest.mark.parametrize("good", [0, 1])
def test_the_engine_keeps_the_strategy_whose_output_is_closest_to_float(project, good, caplog, temporary_plugin):
    """An algorithm offering a sensible range and one 50x too wide: whichever position the
    sensible one has, the exported model uses it."""
    import logging

    from xquant_core import hookimpl
    from xquant_core.calibration import CalibrationAlgorithm

    class TwoStrategies(CalibrationAlgorithm):
        needs_histogram = False
        strategies = ("first", "second")

        def compute_range(self, stats, ctx):
            return self.candidate_ranges(stats, ctx)[0]

        def candidate_ranges(self, stats, ctx):
            sensible, wide = (stats.min, stats.max), (stats.min * 50, stats.max * 50)
            return [sensible, wide] if good == 0 else [wide, sensible]

    class Plugin:
        @hookimpl
        def xquant_register_calibration_algorithms(self, register):
            register("two_strategies", TwoStrategies())

    temporary_plugin(Plugin(), "test-two-strategies")
    with caplog.at_level(logging.INFO, logger="xquant"):
        chosen = xquant.quantize_onnx_model({**project, "calibration_parameters": {
            **project["calibration_parameters"], "calibration_type": "two_strategies"}})
    minmax = xquant.quantize_onnx_model({**project, "calibration_parameters": {
        **project["calibration_parameters"], "calibration_type": "minmax"}})
    assert f"keeping {('first', 'second')[good]}" in caplog.text
    assert chosen.SerializeToString() == minmax.SerializeToString()
