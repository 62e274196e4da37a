"""Whole-pipeline calibration data: a BERT-like model with int64 and float inputs fed from
npy lists (``samples/multi_input/build.py``), a raw-fed CNN, the custom preprocess sample,
and the CLI's exit code 2 + message for bad data (custom preprocess file, list lengths,
empty list, input count, dtype).

Measured (2-core x86, onnxruntime CPU): BERT-like block, the sample config (precision_level
2, default calibration, finetune 1), 32 calibration samples, 40 fresh samples: worst cosine
0.99976, worst max |q - f| 0.086 (outputs within about +-1.7); the test allows 0.999 / 0.15.
Raw-fed CNN, 12 samples, 8 fresh inputs: worst cosine 0.99999; the test allows 0.999.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import xquant
from xquant_core.runtime import onnxruntime_session

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"

BERT_MIN_COSINE = 0.999
BERT_MAX_ABS = 0.15
RAW_MIN_COSINE = 0.999


def session(path: Path) -> ort.InferenceSession:
    return onnxruntime_session(path)  # exact int8 arithmetic on every CPU


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


@pytest.fixture(scope="module")
def bert_project(tmp_path_factory, sample_module):
    """The multi-input sample built into a temporary folder with its own config.json."""
    folder = tmp_path_factory.mktemp("bert")
    builder = sample_module("multi_input/build.py")
    onnx.save(builder.build_model(), str(folder / "bert_block.onnx"))
    builder.write_samples(folder / "data", 32)
    config = json.loads((SAMPLES / "multi_input" / "config.json").read_text())
    config["calibration_parameters"]["calibration_step"] = 32
    config["quantization_parameters"]["analysis_enable"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, builder


@pytest.fixture(scope="module")
def bert_quantized(bert_project):
    folder, builder = bert_project
    xquant.quantize_onnx_model(str(folder / "config.json"))
    return folder / "output" / "bert_block.q.onnx"


def test_multi_input_model_from_npy_lists_runs_close_to_float(bert_project, bert_quantized):
    folder, builder = bert_project
    model = onnx.load(str(bert_quantized))
    onnx.checker.check_model(model)
    inputs = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    assert inputs == {"input_ids": onnx.TensorProto.INT64, "token_type_ids": onnx.TensorProto.INT64,
                      "attention_mask": onnx.TensorProto.FLOAT}
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    matmul_weights = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
                      and node.input[0] in {init.name for init in model.graph.initializer}]
    assert len(matmul_weights) >= 6  # Q, K, V, O and the two FFN weights are int8

    float_session, quant_session = session(folder / "bert_block.onnx"), session(bert_quantized)
    rng = np.random.default_rng(1234)  # fresh sentences, not the calibration ones
    worst_cos, worst_abs = 1.0, 0.0
    for _ in range(40):
        feed = builder.make_sample(rng)
        reference = float_session.run(None, feed)[0]
        quantized = quant_session.run(None, feed)[0]
        worst_cos = min(worst_cos, cosine(reference, quantized))
        worst_abs = max(worst_abs, float(np.abs(reference - quantized).max()))
    print(f"BERT-like block: worst cosine {worst_cos:.5f}, worst max abs error {worst_abs:.4f}")
    assert worst_cos >= BERT_MIN_COSINE and worst_abs <= BERT_MAX_ABS


def test_raw_fed_model_runs_close_to_float(small_project):
    (small_project / "raw").mkdir()
    lines = []
    for index, path in enumerate(sorted((small_project / "data").glob("sample_*.npy"))):
        np.load(path).astype(np.float32).tofile(small_project / "raw" / f"s{index}.bin")
        lines.append(f"  s{index}.bin \n\n")
    (small_project / "raw" / "list.txt").write_text("".join(lines))
    config = json.loads((small_project / "cfg.json").read_text())
    config["calibration_parameters"].update(calibration_type="default", input_parametres=[
        {"file_type": "raw", "data_list_path": "raw/list.txt"}])
    config["quantization_parameters"]["finetune_level"] = 1
    write_config(small_project, config)
    xquant.quantize_onnx_model(str(small_project / "cfg.json"))
    float_session = session(small_project / "small.onnx")
    quant_session = session(small_project / "out" / "small.q.onnx")
    rng = np.random.default_rng(7)
    worst = min(cosine(float_session.run(None, {"input": sample})[0], quant_session.run(None, {"input": sample})[0])
                for sample in [rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(8)])
    print(f"raw-fed CNN: worst cosine {worst:.5f}")
    assert worst >= RAW_MIN_COSINE


@pytest.mark.slow
def test_custom_preprocess_sample_quantizes(material, sample_model, tmp_path):
    folder = SAMPLES / "custom_preprocess"
    config = json.loads((folder / "config.json").read_text())
    config["model_parameters"]["onnx_model"] = str(sample_model)
    config["model_parameters"]["working_dir"] = str(tmp_path)
    item = config["calibration_parameters"]["input_parametres"][0]
    item["preprocess_file"] = str(folder / item["preprocess_file"])
    item["data_list_path"] = str(material / "calib" / "list.txt")
    config["calibration_parameters"].update(calibration_step=4, calibration_type="minmax")
    config["quantization_parameters"].update(analysis_enable=False, finetune_level=0)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    model = xquant.quantize_onnx_model(str(tmp_path / "cfg.json"))
    assert (tmp_path / "mobilenet_v2_letterbox.q.onnx").is_file()
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)


# --------------------------------------------------------------------------- CLI errors (exit 2)

def write_config(folder: Path, config: dict) -> Path:
    path = folder / "cfg.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def bert_config(folder: Path, **changes) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_parameters"]["analysis_enable"] = False
    for index, change in changes.items():
        config["calibration_parameters"]["input_parametres"][int(index[1:])].update(change)
    return config


PREPROCESS = '''
def raises(path_list, params):
    raise ValueError("corrupt sample " + path_list[0])
'''


@pytest.mark.parametrize("spec, expected", [
    ("missing.py:prep", "does not exist"),
    ("prep.py:nothing_here", "has no function 'nothing_here'"),
    ("prep.py:raises", "raised ValueError: corrupt sample"),
])
def test_cli_custom_preprocess_errors_exit_2_naming_file_and_function(small_project, run_xquant, spec, expected):
    (small_project / "prep.py").write_text(PREPROCESS)
    config = json.loads((small_project / "cfg.json").read_text())
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = spec
    result = run_xquant("-c", str(write_config(small_project, config)))
    assert result.returncode == 2, result.stderr
    file_part, func = spec.split(":")
    assert f"{small_project / file_part}:{func}" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["lengths", "empty", "count", "dtype", "lossy"])
def test_bad_multi_input_data_is_a_usage_error(bert_project, tmp_path, case):
    """Through the API (the CLI prints the same message with the error's exit code, 2)."""
    folder, _ = bert_project
    config = bert_config(folder)
    inputs = config["calibration_parameters"]["input_parametres"]
    for item in inputs:
        item["data_list_path"] = str(folder / item["data_list_path"])
    config["model_parameters"]["onnx_model"] = str(folder / "bert_block.onnx")
    config["model_parameters"]["working_dir"] = str(tmp_path)
    if case == "lengths":
        short = tmp_path / "short.txt"
        short.write_text("".join(line + "\n" for line in
                                 Path(inputs[1]["data_list_path"]).read_text().splitlines()[:10]))
        inputs[1]["data_list_path"] = str(short)
        expected = ["different lengths", "input_ids: 32", "token_type_ids: 10"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("\n \n")
        inputs[2]["data_list_path"] = str(tmp_path / "empty.txt")
        expected = ["Calibration input attention_mask finds 0 items.", str(tmp_path / "empty.txt")]
    elif case == "count":
        del inputs[2]
        expected = ["Calibration input_parametres size should equal to model inputs size.",
                    "input_ids, token_type_ids, attention_mask"]
    elif case == "dtype":
        inputs[0]["dtype"] = "float32"
        expected = ["dtype is float32", "'input_ids' is int64"]
    else:
        bad = tmp_path / "ids_float.npy"
        np.save(bad, np.full((1, 16), 2.5, np.float32))
        (tmp_path / "ids.txt").write_text(f"{bad}\n" * 32)
        inputs[0]["data_list_path"] = str(tmp_path / "ids.txt")
        expected = [str(bad), "fractional values", "int64"]
    with pytest.raises(xquant.XQuantError) as info:
        xquant.quantize_onnx_model(str(write_config(tmp_path, config)))
    assert info.value.exit_code == 2
    for text in expected:
        assert text in str(info.value), (text, str(info.value))
