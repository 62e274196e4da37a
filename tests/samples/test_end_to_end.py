"""End to end on the real sample: MobileNetV2 (torchvision weights), real photos.

Calibration uses the 40 calibration photos; accuracy is measured on the 20 labelled
ImageNet photos that calibration never sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import xquant

pytestmark = pytest.mark.slow  # quantizes the real sample models (the fast lane: pytest -m "not slow")

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CONFIG = REPO / "samples" / "mobilenet_v2" / "config.json"

#: measured on this sample (2026-12-02, the same bytes at XQUANT_NUM_THREADS 1 / 2 / 4 / 8): AMD EPYC
#: agreement 100 %, cosine 0.9947, SNR 0.0112; Intel Xeon (one thread) agreement 100 %, SNR 0.0111.
#: Two near-tie photos flip with any change to the model: the agreement floor is two photos lower.
MIN_AGREEMENT = 0.90
MIN_COSINE = 0.99
MAX_SNR = 0.02


@pytest.fixture(scope="module")
def quantized_sample(tmp_path_factory):
    if not (REPO / "samples" / "material" / "calib" / "list.txt").is_file():
        pytest.skip("sample material missing: run scripts/setup.sh")
    model = REPO / "samples" / "mobilenet_v2" / "mobilenet_v2.onnx"
    if not model.is_file():
        pytest.skip("sample model missing: run scripts/setup.sh")
    out = tmp_path_factory.mktemp("sample") / "mobilenet_v2.q.onnx"
    returned = xquant.quantize_onnx_model(str(SAMPLE_CONFIG), output=str(out))
    return model, out, returned



def test_sample_is_the_same_bytes_at_another_thread_count(quantized_sample, tmp_path, monkeypatch):
    """torch splits float sums by its thread count: at 1, 2 and 8 threads this sample came out as
    three different models (logits SNR 0.0118 / 0.0131), so two machines built different models."""
    from xquant_core.runtime import num_threads

    _, out, _ = quantized_sample
    monkeypatch.setenv("XQUANT_NUM_THREADS", "5" if num_threads() == 3 else "3")
    again = tmp_path / "threads.q.onnx"
    xquant.quantize_onnx_model(str(SAMPLE_CONFIG), output=str(again))
    assert again.read_bytes() == out.read_bytes()

def test_sample_is_the_same_bytes_on_one_core(quantized_sample, tmp_path, monkeypatch):
    """With a second core the histograms are counted on it, one batch behind the forward pass;
    on one core they are counted in line. The model must not tell which."""
    import os

    _, out, _ = quantized_sample
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    again = tmp_path / "one_core.q.onnx"
    xquant.quantize_onnx_model(str(SAMPLE_CONFIG), output=str(again))
    assert again.read_bytes() == out.read_bytes()


def test_sample_int8_agrees_with_fp32_on_held_out_photos(quantized_sample, sample_module):
    model, out, _ = quantized_sample
    evaluator = sample_module("mobilenet_v2/evaluate.py")
    result = evaluator.evaluate(model, out)
    print(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=1))
    assert result["images"] == 20
    assert result["top1_agreement"] >= MIN_AGREEMENT, result
    assert result["logits_cosine"] >= MIN_COSINE, result
    assert result["logits_snr"] <= MAX_SNR, result


def test_sample_api_returns_what_it_wrote(quantized_sample):
    _, out, returned = quantized_sample
    assert returned.SerializeToString() == out.read_bytes()


def test_sample_follows_spacemit_policy(quantized_sample):
    _, out, _ = quantized_sample
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    opsets = {opset.domain: opset.version for opset in model.opset_import}
    assert opsets.get("", 0) >= 13 and "ai.onnx" not in opsets
    assert dict((p.key, p.value) for p in model.metadata_props)["xquant_version"] == xquant.__version__

    inits = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    conv_weights = conv_biases = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight_dq = producers[node.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight = numpy_helper.to_array(inits[weight_dq.input[0]])
        scale = numpy_helper.to_array(inits[weight_dq.input[1]])
        zero = numpy_helper.to_array(inits[weight_dq.input[2]])
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)  # per-channel, axis 0
        assert not zero.any() and np.abs(weight).max() <= 127  # symmetric
        conv_weights += 1
        if len(node.input) > 2 and node.input[2] in producers:
            bias_dq = producers[node.input[2]]
            assert numpy_helper.to_array(inits[bias_dq.input[0]]).dtype == np.int32
            conv_biases += 1
    assert conv_weights == 52 and conv_biases == 52

    activation_zero_points = [numpy_helper.to_array(inits[node.input[2]]) for node in model.graph.node
                              if node.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.int8 and z.size == 1 for z in activation_zero_points)
    assert any(int(z) != 0 for z in activation_zero_points)  # asymmetric: real zero points are used


#: measured on this sample (2026-12-02, AMD EPYC, the same at any thread count): the target snr 0.011
#: (all-INT8 0.0120 on the held-back samples) is met with 7 ops in float (0.0107); on the 20 held-out
#: photos logits SNR 0.0112 -> 0.0092, cosine 0.9947 -> 0.9956, agreement stays 100 %
AUTO_CONFIG = REPO / "samples" / "mobilenet_v2" / "config_auto_precision.json"


def test_sample_auto_precision_meets_a_stricter_target_and_improves_held_out_photos(
        quantized_sample, sample_module, tmp_path):
    model, plain, _ = quantized_sample
    auto = json.loads(AUTO_CONFIG.read_text())
    target = auto["auto_precision"]["target"]["value"]
    auto["model_parameters"]["working_dir"] = str(tmp_path)
    auto["model_parameters"]["onnx_model"] = str(model)
    auto["calibration_parameters"]["input_parametres"][0]["data_list_path"] = str(
        REPO / "samples" / "material" / "calib" / "list.txt")
    xquant.quantize_onnx_model(auto)
    report = (tmp_path / "mobilenet_v2.auto.q_report.md").read_text()
    section = report.split("## Automatic mixed precision", 1)[1]
    rows = {cells[0].strip(): cells for cells in
            (line.strip("|").split("|") for line in section.splitlines() if line.startswith("| "))}
    all_int8, final = float(rows["all-INT8"][3]), float(rows["final model"][3])
    float_ops = int(rows["final model"][2])
    assert final <= target < all_int8, rows  # stricter than plain INT8, and met
    assert final < float(rows["all-INT8, recalibrated"][3])  # same calibration, same samples: better
    assert 1 <= float_ops <= auto["auto_precision"]["max_float_ops"]

    # the emitted custom_setting, without auto_precision, gives the same bytes
    reproduce = json.loads(json.dumps(auto))
    del reproduce["auto_precision"]
    reproduce["quantization_parameters"].update(
        json.loads((tmp_path / "mobilenet_v2.auto.q_custom_setting.json").read_text()))
    reproduce["quantization_parameters"]["analysis_enable"] = False
    reproduce["model_parameters"]["output_prefix"] = "reproduced"
    reproduced = xquant.quantize_onnx_model(reproduce)
    assert reproduced.SerializeToString() == (tmp_path / "mobilenet_v2.auto.q.onnx").read_bytes()

    evaluator = sample_module("mobilenet_v2/evaluate.py")
    before = evaluator.evaluate(model, plain)
    after = evaluator.evaluate(model, tmp_path / "mobilenet_v2.auto.q.onnx")
    print(json.dumps({"float_ops": float_ops, "held_back": [all_int8, final],
                      "before": {k: v for k, v in before.items() if k != "per_image"},
                      "after": {k: v for k, v in after.items() if k != "per_image"}}, indent=1))
    assert after["top1_agreement"] >= before["top1_agreement"]
    assert after["logits_snr"] < before["logits_snr"] and after["logits_cosine"] > before["logits_cosine"]


#: measured on this sample (2026-12-02, AMD EPYC): the report's two blocks in float give logits SNR
#: 0.0108 and cosine 0.9948 on the 20 held-out photos (all-INT8: 0.0112 / 0.9947). Top-1 agreement
#: moves by one photo either way (here 100 -> 95 %; with torch on 2 or 4 threads, before calibration
#: ran on one, 95 -> 95 %): a photo whose top two classes are nearly tied, so the continuous figures decide.
CUSTOM_CONFIG = REPO / "samples" / "mobilenet_v2" / "config_custom_setting.json"


def test_sample_custom_setting_keeps_the_reported_blocks_float_and_helps(quantized_sample, sample_module, tmp_path):
    model, plain, _ = quantized_sample
    out = tmp_path / "custom.q.onnx"
    quantized = xquant.quantize_onnx_model(str(CUSTOM_CONFIG), output=str(out))
    producers = {output: node for node in quantized.graph.node for output in node.output}
    float_convs = {node.name for node in quantized.graph.node if node.op_type == "Conv"
                   and producers.get(node.input[1], node).op_type != "DequantizeLinear"}
    assert float_convs == {f"/features/features.{block}/conv/{conv}" for block in (15, 16)
                           for conv in ("conv.1/conv.1.0/Conv", "conv.2/Conv")}
    evaluator = sample_module("mobilenet_v2/evaluate.py")
    before, after = evaluator.evaluate(model, plain), evaluator.evaluate(model, out)
    assert after["logits_snr"] < before["logits_snr"] and after["logits_cosine"] > before["logits_cosine"]
    assert after["top1_agreement"] >= before["top1_agreement"] - 1 / before["images"]
