"""Automatic mixed precision: the search meets reachable targets with few float ops, ends
with a warning on unreachable ones, and its custom_setting reproduces the model."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import xquant
from xquant_core.metrics import Metric
from xquant_core.runtime import onnxruntime_session  # exact int8 arithmetic on every CPU
from xquant_test_models import finish, npy_project


def _model() -> onnx.ModelProto:
    """A CNN whose middle conv output has one channel with rare, huge values: int8 cannot
    hold both that channel's outliers and the other channels' fine detail."""
    rng = np.random.default_rng(0)
    scale = np.ones((8, 1, 1), np.float32)
    scale[3] = 300.0
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "b1": np.zeros(8, np.float32),
        "s": scale,
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "b2": np.zeros(8, np.float32),
        "w3": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "b3": np.zeros(8, np.float32),
        "wf": rng.normal(0, 0.3, (5, 8)).astype(np.float32), "bf": np.zeros(5, np.float32),
    }
    inits["w3"][:, 3] *= 1 / 300.0  # the next conv undoes the scale: the outliers matter downstream
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Mul", ["r1", "s"], ["m"], name="spike"),
        helper.make_node("Conv", ["m", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["m", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Add", ["c2", "c3"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "spiky", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    return finish(graph)


@pytest.fixture
def config(tmp_path) -> dict:
    return npy_project(tmp_path, _model(), 16, 7, "minmax", analysis_enable=True, finetune_level=0)


def _auto(config: dict, value: float, max_float_ops: int = 6, metric: str = "snr") -> dict:
    config = copy.deepcopy(config)
    config["auto_precision"] = {"target": {"metric": metric, "value": value}, "max_float_ops": max_float_ops}
    return config


def _stages(report: str) -> dict[str, tuple[int, float]]:
    """The report's stage table: stage -> (ops in float, metric)."""
    section = report.split("## Automatic mixed precision", 1)[1]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): (int(cells[2]), float(cells[3])) for cells in rows
            if len(cells) == 4 and cells[2].strip().isdigit()}


def _all_int8_snr(config: dict, caplog) -> float:
    """The search's all-INT8 figure, from a run whose target is already met."""
    with caplog.at_level(logging.INFO, logger="xquant"):
        xquant.quantize_onnx_model(_auto(config, 1e9))
    report = (Path(config["model_parameters"]["working_dir"]) / "m.q_report.md").read_text()
    return _stages(report)["all-INT8"][1]


def _held_back_snr(config: dict, model_path: Path) -> float:
    """The written model against the float one on every 4th calibration sample, by onnxruntime."""
    import onnxruntime as ort

    folder = Path(config["calibration_parameters"]["input_parametres"][0]["data_list_path"]).parent
    float_session = onnxruntime_session(config["model_parameters"]["onnx_model"])
    int8_session = onnxruntime_session(str(model_path))
    noise = signal = 0.0
    for index in range(0, 16, 4):
        feed = {"x": np.load(folder / f"x{index}.npy")[None]}
        expected, actual = float_session.run(None, feed)[0], int8_session.run(None, feed)[0]
        noise += float(((actual.astype(np.float64) - expected) ** 2).sum())
        signal += float((expected.astype(np.float64) ** 2).sum())
    return noise / signal


def test_a_stricter_target_is_met_with_few_float_ops(config, caplog):
    baseline = _all_int8_snr(config, caplog)
    target = baseline / 4
    xquant.quantize_onnx_model(_auto(config, target))
    out = Path(config["model_parameters"]["working_dir"])
    report = (out / "m.q_report.md").read_text()
    assert "## Automatic mixed precision" in report and "**met**" in report
    snippet = json.loads((out / "m.q_custom_setting.json").read_text())["custom_setting"]
    assert 1 <= len(snippet) <= 6
    stages = _stages(report)
    float_ops, final = stages["final model"]
    assert float_ops == len(snippet) and final <= target < baseline
    # the reported figure is the written model's, measured independently
    assert _held_back_snr(config, out / "m.q.onnx") == pytest.approx(final, rel=1e-4)  # the report has 6 digits


def test_keep_float_leaves_earlier_float_ops_float(config):
    """An undo of a candidate must not quantize ops an earlier call (or the plan) keeps float."""
    from xquant_core.engine.backend.compat import import_ppq

    import_ppq()  # PPQ imports only through the compatibility layer (protobuf >= 4, onnx >= 1.19)
    from ppq import QuantableOperation

    from xquant_core.calibration import CalibrationContext
    from xquant_core.engine import EnginePlan, keep_float, quantize_graph
    from xquant_core.plugins import registry

    class Probe:
        already_float = ()

        def run(self, graph, executor, device, export, plain=None, progress=None):
            undo_first = keep_float(graph, {"conv2"})
            undo = keep_float(graph, {"conv2", "conv3"})
            both = {name: graph.operations[name]._dequantized for name in ("conv2", "conv3")}
            undo()
            after = {name: graph.operations[name]._dequantized for name in ("conv2", "conv3")}
            undo_first()
            return both, after, isinstance(graph.operations["conv2"], QuantableOperation)

    model = onnx.load(config["model_parameters"]["onnx_model"])
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(0, 1, (1, 3, 10, 10)).astype(np.float32)} for _ in range(8)]
    plan = EnginePlan(algorithm=registry("calibration").get("minmax"), context=CalibrationContext(0.9999),
                      precision_level=0, finetune_level=0, device="cpu")
    both, after, quantable = quantize_graph(model, batches, len(batches), registry("platform").get("spacemit"),
                                            plan, search=Probe())
    assert quantable
    assert both == {"conv2": True, "conv3": True}
    assert after == {"conv2": True, "conv3": False}


def test_the_emitted_custom_setting_reproduces_the_model(config):
    searched = xquant.quantize_onnx_model(_auto(config, 1e-6, max_float_ops=3))
    out = Path(config["model_parameters"]["working_dir"])
    plain = copy.deepcopy(config)
    plain["quantization_parameters"].update(json.loads((out / "m.q_custom_setting.json").read_text()))
    plain["model_parameters"]["output_prefix"] = "reproduced"
    reproduced = xquant.quantize_onnx_model(plain)
    assert plain["quantization_parameters"]["custom_setting"]
    assert searched.SerializeToString() == reproduced.SerializeToString()


@pytest.mark.slow
def test_an_unreachable_target_warns_and_writes_the_best_model(config, tmp_path, run_xquant):
    (tmp_path / "cfg.json").write_text(json.dumps(_auto(config, 1e-12, max_float_ops=2)))
    result = run_xquant("-c", str(tmp_path / "cfg.json"))
    assert result.returncode == 0, result.stderr
    assert "the target was not met within max_float_ops=2" in result.stderr
    assert "auto_precision: 2 op(s) in float" in result.stdout or "auto_precision: 1 op(s) in float" in result.stdout
    assert (tmp_path / "out" / "m.q.onnx").is_file()


def test_a_third_party_metric_drives_the_search(config, monkeypatch, temporary_plugin):
    from xquant_core import hookimpl

    calls = []

    class LargestOutputError(Metric):
        """A task-style metric: the worst absolute error of any output (lower is better)."""

        def measure(self, quantized, reference, feeds) -> float:
            calls.append(len(feeds))
            return max(float(np.abs(quantized(feed)["y"] - reference(feed)["y"]).max()) for feed in feeds)

    class Plugin:
        @hookimpl
        def xquant_register_metrics(self, register):
            register("max_abs_error", LargestOutputError())

    temporary_plugin(Plugin(), "test-metric-plugin")
    xquant.quantize_onnx_model(_auto(config, 1e-6, max_float_ops=2, metric="max_abs_error"))
    assert calls and all(count == 4 for count in calls)  # 16 samples, every 4th held back


def test_the_search_is_explained_even_without_analysis(config):
    config = _auto(config, 1e-6, max_float_ops=2)
    config["quantization_parameters"]["analysis_enable"] = False
    xquant.quantize_onnx_model(config)
    out = Path(config["model_parameters"]["working_dir"])
    report = (out / "m.q_report.md").read_text()
    assert "analysis_enable is false" in report and "Per-op SNR" not in report
    stages = _stages(report)
    assert stages["final model"][0] == len(json.loads((out / "m.q_custom_setting.json").read_text())["custom_setting"])
    assert not list(out.glob("*.png"))
