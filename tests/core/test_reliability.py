"""Reliability: every bad input gets a clear error, nothing is lost, runs are reproducible.

The golden corpus of bad model/data/environment inputs lives in
``tests/data/inputs/invalid/<case>/``: ``case.json`` says how to build the case's files in a
temporary folder (the model kind, the data files, the config, extra CLI arguments and
environment), ``expected.txt`` is the CLI's exact stderr with the case folder written as
``<CASE>``, and ``exit_code`` the expected exit status. The config-only cases are the
other corpus, ``tests/data/configs/invalid/`` (see test_config.py).

``case.json`` fields:

- ``about``: one line, what the user did wrong;
- ``files``: ``{relative path: {"make": kind, ...}}``, built by :func:`build_file` (a
  ``{i}`` in the path with ``"count": n`` makes n files);
- ``config``: written to ``cfg.json`` in the case folder (``config_text`` writes raw text);
- ``config_path``: what ``-c`` names, relative to the case folder (default ``cfg.json``);
- ``args``: extra CLI arguments (run from the case folder); ``env``: extra environment,
  ``<CASE>`` replaced by the case folder;
- ``xfail``: a reason, when the case shows a known bug whose fix lives in a module this
  test does not own (the test is ``xfail(strict=True)`` so it flips when fixed).

To add a case: write its ``case.json``, run
``XQUANT_UPDATE_GOLDEN=1 pytest tests/core/test_reliability.py -k <case>`` once, read the
written ``expected.txt`` and make sure a user can act on it, then commit it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xquant_test_models import finish, two_input_model

REPO = Path(__file__).resolve().parents[2]
INPUTS = Path(__file__).resolve().parents[1] / "data" / "inputs" / "invalid"
CONFIG_CASES = Path(__file__).resolve().parents[1] / "data" / "configs" / "invalid"
INPUT_CASES = sorted(p for p in INPUTS.iterdir() if p.is_dir())
UPDATE_GOLDEN = os.environ.get("XQUANT_UPDATE_GOLDEN") == "1"
SAMPLE_SHAPE = (3, 16, 16)


# --------------------------------------------------------------------------- models built in code
def conv_model(input_dims=(1, 3, 16, 16), extra_op: str | None = None) -> onnx.ModelProto:
    """Conv-Relu-GlobalAveragePool-Flatten-Gemm; ``extra_op`` (a unary op) goes after the Relu."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (10, 8)).astype(np.float32), "wf"),
             numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    last = "r1"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["r1"], ["odd"], name=f"my_{extra_op.lower()}"))
        last = "odd"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
              helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "small_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return finish(graph)


def qdq_model() -> onnx.ModelProto:
    """An already quantized model: QuantizeLinear/DequantizeLinear around a Conv with int8 weights."""
    weight = np.random.default_rng(4).integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
             numpy_helper.from_array(weight, "w_q"),
             numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["x_q"], name="quant_in"),
         helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dequant_in"),
         helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="dequant_w"),
         helper.make_node("Conv", ["x_dq", "w"], ["out"], pads=[1, 1, 1, 1], name="conv")],
        "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return finish(graph)


def int_input_model() -> onnx.ModelProto:
    """Token ids (int64 [1, 8]) -> embedding Gather -> MatMul: an input calibration data must match exactly."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (16, 4)).astype(np.float32), "embedding"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 4)).astype(np.float32), "w")]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "ids"], ["emb"], axis=0, name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["out"], name="proj")],
        "int_input", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 4])], inits)
    return finish(graph)


def identity_model() -> onnx.ModelProto:
    """Nothing to quantize: it came out as a model with no nodes, inputs or outputs, exit 0."""
    value = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *SAMPLE_SHAPE])
    result = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, *SAMPLE_SHAPE])
    return finish(helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g", [value], [result]))


def float16_model() -> onnx.ModelProto:
    """A float16 export: PPQ failed with "Op Execution Error: Conv_0", exit 1."""
    weight = np.random.default_rng(6).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["out"], pads=[1, 1, 1, 1], name="conv")], "half",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, [1, *SAMPLE_SHAPE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [1, 4, *SAMPLE_SHAPE[1:]])],
        [numpy_helper.from_array(weight, "w")])
    return finish(graph)


def broken_model(fault: str) -> onnx.ModelProto:
    """conv_model with one fault onnx's checker and onnxruntime both refuse."""
    model = conv_model()
    graph = model.graph
    if fault == "dangling_input":
        graph.node[1].input[0] = "does_not_exist"
    elif fault == "unknown_op":
        graph.node[1].op_type = "FancyOp"
    elif fault == "output_not_produced":
        graph.output[0].name = "nonexistent_out"
    elif fault == "future_opset":
        model.opset_import[0].version = 99
    elif fault == "custom_domain":  # an op of another domain, which onnxruntime does not have
        graph.node[1].op_type, graph.node[1].domain = "FancyOp", "com.example"
        model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


MODELS = {
    "conv": lambda spec: conv_model(),
    "broken": lambda spec: broken_model(spec["fault"]),
    "symbolic": lambda spec: conv_model(input_dims=spec["dims"]),
    "two_inputs": lambda spec: two_input_model(),
    "qdq": lambda spec: qdq_model(),
    "extra_op": lambda spec: conv_model(extra_op=spec["op"]),
    "int_input": lambda spec: int_input_model(),
    "identity": lambda spec: identity_model(),
    "float16": lambda spec: float16_model(),
}


def model_bytes(spec: dict) -> bytes:
    return MODELS[spec.get("model", "conv")](spec).SerializeToString()


# --------------------------------------------------------------------------- case files
def png_bytes(height: int, width: int, seed: int) -> bytes:
    import cv2

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def build_file(path: Path, spec: dict, index: int) -> None:
    """Write one case file; ``spec["make"]`` says what kind."""
    make = spec["make"]
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = spec.get("seed", 0) + index
    if make == "model":
        data = model_bytes(spec)
    elif make == "truncated_model":
        full = model_bytes(spec)
        data = full[: int(len(full) * spec.get("keep", 0.5))]
    elif make == "npy":
        shape = tuple(spec.get("shape", SAMPLE_SHAPE))
        dtype = spec.get("dtype", "float32")
        if dtype.startswith("<U"):
            data = npy_bytes(np.full(shape, "pixel", dtype=dtype))
        else:
            array = np.random.default_rng(seed).normal(0, 1, shape).astype(dtype)
            if index == spec.get("put_in", -1):  # one bad value, e.g. {"put_in": 2, "put": "inf"}
                array.flat[7] = float(spec["put"])
            data = npy_bytes(array)
    elif make == "raw":
        data = np.random.default_rng(seed).normal(0, 1, spec["floats"]).astype(np.float32).tobytes()
    elif make == "png":
        data = png_bytes(spec.get("height", 20), spec.get("width", 24), seed)
    elif make == "text":
        data = spec["text"].encode("utf-8")
    elif make == "hex":
        data = bytes.fromhex(spec["hex"])
    elif make == "folder":
        path.mkdir(exist_ok=True)
        return
    else:
        raise AssertionError(f"unknown make {make!r} for {path}")
    path.write_bytes(data)


def build_case(case: Path, work: Path) -> dict:
    """Create the files of ``case`` in ``work``; return the case description."""
    desc = json.loads((case / "case.json").read_text(encoding="utf-8"))
    work.mkdir(parents=True)
    for name, spec in desc.get("files", {}).items():
        for index in range(spec.get("count", 1)):
            build_file(work / name.format(i=index), spec, index)
    if "config_text" in desc:
        (work / "cfg.json").write_text(desc["config_text"], encoding="utf-8")
    elif "config" in desc:
        (work / "cfg.json").write_text(json.dumps(desc["config"], indent=2), encoding="utf-8")
    return desc


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (and folder) under ``folder`` with the sha256 of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def normalize(text: str, work: Path) -> str:
    for form in sorted({str(work.resolve()), str(work)}, key=len, reverse=True):
        text = text.replace(form, "<CASE>")
    return text


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# --------------------------------------------------------------------------- the input corpus
def test_corpora_hold_at_least_40_cases():
    config_cases = [p for p in CONFIG_CASES.iterdir() if p.is_dir()]
    assert len(config_cases) + len(INPUT_CASES) >= 40
    for case in INPUT_CASES:
        desc = json.loads((case / "case.json").read_text(encoding="utf-8"))
        assert desc.get("about"), f"{case.name}: say what the user did wrong"
        assert (case / "expected.txt").is_file() or UPDATE_GOLDEN, case
        assert (case / "exit_code").read_text().strip().isdigit() or UPDATE_GOLDEN, case


#: how each JSON Schema keyword's violation reads in the golden texts
SCHEMA_KEYWORD_MESSAGES = {
    "type": "is not of type", "enum": "is not one of", "minimum": "is less than the minimum of",
    "maximum": "is greater than the maximum of", "exclusiveMinimum": "is less than or equal to the minimum of",
    "minLength": "should be non-empty", "minItems": "must not be empty", "pattern": "is not a file name",
    "required": "is a required property", "additionalProperties": "unknown key", "not": "give either",
}


def test_every_schema_violation_kind_has_a_golden_case():
    from xquant_core.config import load_schema

    used = set()

    def walk(node):
        if isinstance(node, dict):
            used.update(key for key in node if key in SCHEMA_KEYWORD_MESSAGES or key in (
                "maxLength", "maxItems", "exclusiveMaximum", "uniqueItems", "const", "oneOf", "anyOf"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(load_schema())
    assert used <= set(SCHEMA_KEYWORD_MESSAGES), f"add a golden case for {used - set(SCHEMA_KEYWORD_MESSAGES)}"
    goldens = "".join(path.read_text(encoding="utf-8")
                      for path in list(CONFIG_CASES.glob("*/expected.txt")) + list(INPUTS.glob("*/expected.txt")))
    for keyword in sorted(used):
        assert SCHEMA_KEYWORD_MESSAGES[keyword] in goldens, f"no golden case violates '{keyword}'"


def _case_param(case: Path):
    desc = json.loads((case / "case.json").read_text(encoding="utf-8"))
    marks = [pytest.mark.xfail(strict=True, reason=desc["xfail"])] if desc.get("xfail") else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_case_param(c) for c in INPUT_CASES])
def test_golden_bad_input(case, tmp_path, run_xquant):
    work = tmp_path / case.name
    desc = build_case(case, work)
    before = snapshot(work)
    env = {key: value.replace("<CASE>", str(work)) for key, value in desc.get("env", {}).items()}
    env.setdefault("XQUANT_DISABLE_PLUGIN_AUTOLOAD", "0")
    # -q: stage lines ("calibration: 1.1 s") depend on the machine's speed, the messages do not
    args = ["-q", "-c", str(work / desc.get("config_path", "cfg.json")), *desc.get("args", [])]
    result = run_xquant(*args, cwd=work, env=env, timeout=300)
    stderr = normalize(result.stderr, work)

    if UPDATE_GOLDEN and not desc.get("xfail"):
        (case / "expected.txt").write_text(stderr, encoding="utf-8")
        (case / "exit_code").write_text(f"{result.returncode}\n")
    assert_no_traceback(result)
    assert result.stdout == ""
    assert stderr == (case / "expected.txt").read_text(encoding="utf-8")
    assert result.returncode == int((case / "exit_code").read_text())
    assert result.returncode in (1, 2)
    # nothing was written or changed: no output, no report, no temporary file, inputs intact
    assert snapshot(work) == before


# --------------------------------------------------------------------------- a small project, run for real
def make_project(folder: Path, samples: int = 12, **quantization) -> Path:
    """conv_model + ``samples`` npy samples + cfg.json writing ``out/model.q.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(conv_model(), str(folder / "model.onnx"))
    (folder / "data").mkdir()
    rng = np.random.default_rng(7)
    for index in range(samples):
        np.save(folder / "data" / f"s{index:03d}.npy", rng.normal(0, 1, SAMPLE_SHAPE).astype(np.float32))
    (folder / "data" / "list.txt").write_text("".join(f"s{index:03d}.npy\n" for index in range(samples)))
    config = {
        "model_parameters": {"onnx_model": "model.onnx", "working_dir": "out"},
        "calibration_parameters": {"calibration_step": samples, "calibration_device": "cpu",
                                   "input_parametres": [{"file_type": "npy", "data_list_path": "data/list.txt"}]},
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0, **quantization},
    }
    (folder / "cfg.json").write_text(json.dumps(config, indent=2))
    return folder


def inputs_snapshot(project: Path) -> dict[str, str]:
    return {name: digest for name, digest in snapshot(project).items() if not name.startswith("out")}


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files: what an interrupted or failed run must not leave."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".") or p.suffix == ".tmp" or p.name.startswith("xquant-"))


def test_a_config_with_a_utf8_bom_loads(tmp_path):
    from xquant_core.config import load_config

    config = {"model_parameters": {"onnx_model": "m.onnx"},
              "calibration_parameters": {"input_parametres": [{"data_list_path": "list.txt"}]}}
    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())
    assert load_config(path).model.onnx_model == tmp_path / "m.onnx"


def ddddocr_wheel() -> Path | None:
    cache = os.environ.get("XQUANT_TEST_CACHE")
    if not cache:
        return None
    wheels = sorted(Path(cache).glob("ddddocr-1.6.1-*.whl"))
    return wheels[0] if wheels else None


FETCHED_COMMON_OLD = Path(__file__).resolve().parents[2] / "samples" / "material" / "bad_inputs" / "common_old.onnx"


def test_real_already_quantized_model_ddddocr_common_old(tmp_path, run_xquant):
    """``ddddocr/common_old.onnx`` (PyPI ddddocr==1.6.1) is dynamically quantized (ConvInteger ...).

    ``samples/fetch_material.py`` extracts it; else the wheel in ``$XQUANT_TEST_CACHE`` is used. The QDQ
    case of the corpus (``model_already_quantized``) covers the same path without it.
    """
    if FETCHED_COMMON_OLD.is_file():
        (tmp_path / "common_old.onnx").write_bytes(FETCHED_COMMON_OLD.read_bytes())
    else:
        wheel = ddddocr_wheel()
        if wheel is None:
            pytest.skip("run samples/fetch_material.py (or set XQUANT_TEST_CACHE to a folder holding "
                        "ddddocr-1.6.1-py3-none-any.whl)")
        with zipfile.ZipFile(wheel) as archive:
            (tmp_path / "common_old.onnx").write_bytes(archive.read("ddddocr/common_old.onnx"))
    project = make_project(tmp_path / "p")
    before = snapshot(tmp_path)
    result = run_xquant("-c", str(project / "cfg.json"), "-i", str(tmp_path / "common_old.onnx"), cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 2
    assert result.stderr == (f"xquant: error: {tmp_path / 'common_old.onnx'} is already quantized (it contains "
                             "ConvInteger, DynamicQuantizeLinear, MatMulInteger); give xquant the float model\n")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- internal errors: exit 3
def test_unexpected_exception_is_a_bug_with_the_log_path(tmp_path, monkeypatch, capsys):
    from xquant_core import cli, pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero in a place nobody expected")

    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(cli, "LOG_DIR", logs)
    monkeypatch.setattr(pipeline, "run", broken)
    project = make_project(tmp_path / "p")

    assert cli.main(["-c", str(project / "cfg.json")]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    prefix = "xquant: internal error (this is a bug in xquant, please report it); the traceback is in "
    assert err.startswith(prefix) and err.endswith(".log\n") and err.count("\n") == 1
    log_file = Path(err[len(prefix):].strip())
    assert log_file.parent == logs and log_file.name.startswith("xquant-error-")
    logged = log_file.read_text()
    assert logged.startswith("Traceback") and "ZeroDivisionError: division by zero in a place" in logged

    assert cli.main(["-c", str(project / "cfg.json"), "--verbose"]) == 3
    out, err = capsys.readouterr()
    assert "Traceback" in err and "ZeroDivisionError" in err
    second = Path(err.rstrip().rsplit("the traceback is in ", 1)[1])
    assert second != log_file and log_file.read_text() == logged  # a second failure keeps the first log
    assert sorted(logs.iterdir()) == sorted([log_file, second])


@pytest.mark.slow
def test_unexpected_exception_in_the_installed_command_exits_3(tmp_path, run_xquant):
    """The real console script, with a bug planted through sitecustomize on PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import xquant_core.model\n\n"
        "def read_model(source):\n"
        "    return {}['a key the code forgot']\n\n"
        "xquant_core.model.read_model = read_model\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    project = make_project(tmp_path / "p")
    before = inputs_snapshot(project)
    env = {"PYTHONPATH": str(site), "TMPDIR": str(temp)}
    result = run_xquant("-c", "cfg.json", cwd=project, env=env)
    assert result.returncode == 3, result.stderr
    assert_no_traceback(result)
    (log_file,) = temp.glob("xquant-error-*.log")
    assert result.stderr == (f"xquant: internal error (this is a bug in xquant, please report it); "
                             f"the traceback is in {log_file}\n")
    assert "KeyError: 'a key the code forgot'" in log_file.read_text()
    result = run_xquant("-c", "cfg.json", "-v", cwd=project, env=env)
    assert result.returncode == 3
    assert "Traceback" in result.stderr and "KeyError: 'a key the code forgot'" in result.stderr
    assert inputs_snapshot(project) == before
    assert not (project / "out").exists()


# --------------------------------------------------------------------------- nothing is lost
@pytest.mark.slow
def test_an_existing_output_survives_a_failing_run(tmp_path, run_xquant):
    project = make_project(tmp_path / "p")
    (project / "out").mkdir()
    (project / "out" / "model.q.onnx").write_bytes(b"the previous, good output")
    (project / "out" / "model.q_report.md").write_text("the previous report\n")
    np.save(project / "data" / "s005.npy", np.zeros((3, 8, 8), np.float32))  # one bad sample in the middle
    before = snapshot(project)
    result = run_xquant("-c", "cfg.json", cwd=project)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "s005.npy holds shape [3, 8, 8]" in result.stderr
    assert snapshot(project) == before


def test_a_full_disk_at_write_time_is_exit_2_with_the_os_reason_and_the_old_model_survives(
        tmp_path, monkeypatch, capsys):
    """Disk full while writing the model used to exit 3 ("this is a bug in xquant")."""
    from xquant_core import cli, outputs

    project = make_project(tmp_path / "p", analysis_enable=True)
    target = project / "out" / "model.q.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old model")
    report = project / "out" / "model.q_report.md"
    report.write_bytes(b"old report")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", full_disk)
    assert cli.main(["-c", str(project / "cfg.json")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the calibration's INFO line
    assert err.startswith("xquant: error: cannot write ") and "No space left on device" in err, err
    assert "Traceback" not in err and "bug" not in err
    assert target.read_bytes() == b"old model" and report.read_bytes() == b"old report"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.q.onnx", "model.q_report.md"]


def test_a_runs_model_report_and_summary_are_written_together_or_not_at_all(tmp_path, monkeypatch, capsys):
    """An old report that cannot be replaced used to be found after the new model was in place,
    and a full disk at the summary after the model and report were: a half-replaced set of
    files, with exit 2. Now every file is written beside its target first and all are put in
    place at the end, or none (the old files as they were, no temporary file left)."""
    from xquant_core import cli, outputs

    project = make_project(tmp_path / "p", analysis_enable=True)
    out = project / "out"
    out.mkdir()
    old = {"model.q.onnx": b"old model", "model.q_report.md": b"old report", "model.q_report.png": b"old chart"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    replace, mkstemp = os.replace, outputs.tempfile.mkstemp

    def report_cannot_be_replaced(src, dst):
        if str(src).endswith("model.q_report.md"):  # moved aside before anything is replaced
            raise OSError(1, "Operation not permitted")
        return replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", report_cannot_be_replaced)
    assert cli.main(["-c", str(project / "cfg.json")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "model.q_report.md: Operation not permitted (the previous file is unchanged)" in err, err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == old and leftovers(project) == []

    def full_disk_at_the_summary(*args, prefix="", **kwargs):
        if prefix.startswith(".summary.json."):
            raise OSError(28, "No space left on device")
        return mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(outputs.os, "replace", replace)
    monkeypatch.setattr(outputs.tempfile, "mkstemp", full_disk_at_the_summary)
    assert cli.main(["-c", str(project / "cfg.json"), "--summary-json", str(project / "summary.json")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == old and leftovers(project) == []
    assert not (project / "summary.json").exists()

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    assert cli.main(["-c", str(project / "cfg.json"), "--summary-json", str(project / "summary.json")]) == 0
    assert all((out / name).read_bytes() != data for name, data in old.items()) and leftovers(project) == []
    assert json.loads((project / "summary.json").read_text())["report"] == str(out / "model.q_report.md")


def test_a_signal_during_the_commit_waits_for_it_and_an_exception_in_it_rolls_it_back(tmp_path, monkeypatch):
    """Ctrl-C reaches the main thread's handler whichever thread the OS gave it to: arriving
    between the renames, it cut the commit short (the old model moved aside and lost from sight,
    "no output was written"). Now it waits for the renames; anything else raised rolls them back."""
    from xquant_core import outputs

    old = {name: f"old {name}".encode() for name in ("m.onnx", "m_report.md")}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    replace, calls = os.replace, []

    def signalled(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # Python runs the handler at once, here
        return replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", signalled)
    outputs.forget_written()
    with pytest.raises(KeyboardInterrupt):
        with outputs.all_or_nothing():
            for name in old:
                outputs.write_bytes_atomically(tmp_path / name, b"new")
    assert {name: (tmp_path / name).read_bytes() for name in old} == {name: b"new" for name in old}
    assert outputs.written() == [tmp_path / name for name in old] and leftovers(tmp_path) == []

    def cut(src, dst):
        if str(dst).endswith("m_report.md") and not str(src).endswith(".old"):
            raise RuntimeError("cut short")
        return replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", cut)
    outputs.forget_written()
    with pytest.raises(RuntimeError, match="cut short"):
        with outputs.all_or_nothing():
            for name in old:
                outputs.write_bytes_atomically(tmp_path / name, b"newer")
    assert {name: (tmp_path / name).read_bytes() for name in old} == {name: b"new" for name in old}
    assert outputs.written() == [] and leftovers(tmp_path) == []


def test_a_folder_where_the_report_goes_is_found_before_any_work(tmp_path, run_xquant):
    """The commit moved it aside like an old report, out of sight under a temporary name."""
    project = make_project(tmp_path / "p", analysis_enable=True)
    (project / "out" / "model.q_report.md").mkdir(parents=True)
    before = snapshot(project)
    result = run_xquant("-c", "cfg.json", cwd=project)
    assert result.returncode == 2, result.stderr
    assert f"the analysis report {project / 'out' / 'model.q_report.md'} is a folder" in result.stderr
    assert snapshot(project) == before


def test_the_output_may_not_be_the_input_models_external_data(tmp_path, run_xquant):
    """The model's weights in a file beside it: ``-o`` naming that file used to replace it (exit 0,
    and the input model no longer loaded)."""
    project = make_project(tmp_path / "p")
    model = onnx.load(str(project / "model.onnx"))
    onnx.save(model, str(project / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.weights", size_threshold=0)
    before = snapshot(project)
    result = run_xquant("-c", "cfg.json", "-o", "model.weights", cwd=project)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "is the input model's external data" in result.stderr, result.stderr
    assert snapshot(project) == before
    assert run_xquant("-c", "cfg.json", cwd=project).returncode == 0  # the model reads its weights


@pytest.mark.slow
def test_repeated_runs_are_byte_identical_and_leave_inputs_untouched(tmp_path, run_xquant):
    """Default calibration, fine-tuning level 1 and the report (test_cli checks percentile/level 0 with -o)."""
    project = make_project(tmp_path / "p", analysis_enable=True, finetune_level=1)
    config = json.loads((project / "cfg.json").read_text())
    config["calibration_parameters"]["calibration_type"] = "default"
    (project / "cfg.json").write_text(json.dumps(config, indent=2))
    before = inputs_snapshot(project)
    outputs = []
    for seed in ("0", "4242"):
        result = run_xquant("-c", "cfg.json", cwd=project, env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        assert_no_traceback(result)
        outputs.append((project / "out" / "model.q.onnx").read_bytes())
        assert (project / "out" / "model.q_report.md").is_file()
        assert leftovers(project) == []
    assert outputs[0] == outputs[1]
    assert inputs_snapshot(project) == before


def test_an_interrupt_after_the_files_are_in_place_says_they_were_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the commit (while the summary lines print) said "no output was written"."""
    from xquant_core import cli

    project = make_project(tmp_path / "p")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Stages, "summary", interrupted)
    assert cli.main(["-c", str(project / "cfg.json")]) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"xquant: interrupted; after writing {project / 'out' / 'model.q.onnx'}", last
    assert (project / "out" / "model.q.onnx").is_file() and leftovers(project) == []


def test_interrupt_during_analysis_tells_the_truth_about_the_output(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the model was written (during the report): the message must not say 'no output'."""
    from xquant_core import cli
    from xquant_plugins import analysis

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis, "write_report", interrupted)
    project = make_project(tmp_path / "p", analysis_enable=True)
    assert cli.main(["-c", str(project / "cfg.json")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert leftovers(project) == []
    written = (project / "out" / "model.q.onnx").exists()
    if "no output was written" in err:
        assert not written, "the CLI says no output was written, but out/model.q.onnx is there"


SLOW_PREPROCESS = """\
import os
import time

import numpy as np


def load(paths, params):
    with open(os.environ["XQ_TEST_CALLS"], "a") as calls:
        calls.write("x")
    time.sleep(0.05)
    return np.stack([np.load(path) for path in paths])
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_mid_calibration(tmp_path, signum, code, word):
    """SIGINT (or SIGTERM, which used to end the run at once, temporary files left in the output
    folder when it came during the final write) while calibration reads its samples: exit 130
    (143), one line, nothing written or left behind."""
    project = make_project(tmp_path / "p", samples=200)
    (project / "slow_prep.py").write_text(SLOW_PREPROCESS)
    config = json.loads((project / "cfg.json").read_text())
    config["calibration_parameters"]["calibration_type"] = "minmax"
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "slow_prep.py:load"
    (project / "cfg.json").write_text(json.dumps(config, indent=2))
    (project / "out").mkdir()
    (project / "out" / "model.q.onnx").write_bytes(b"the previous, good output")
    temp, calls = tmp_path / "tmp", tmp_path / "calls.txt"
    temp.mkdir()
    calls.write_text("")
    before = snapshot(project)

    env = {**os.environ, "TMPDIR": str(temp), "XQ_TEST_CALLS": str(calls), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("xquant")), "-c", "cfg.json"], cwd=project,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    try:
        # batch 0 is read once up front (fail fast); more reads mean the calibration pass is running
        deadline = time.monotonic() + 120
        while len(calls.read_text()) < 5:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "calibration did not start within 120 s"
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert len(calls.read_text()) < 200, "the run finished before the interrupt: make calibration slower"
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    *stages, last = stderr.splitlines()  # stage lines first ("xquant: INFO: onnxsim: 1.7 s")
    assert last == f"xquant: {word}; no output was written" and stderr.endswith("\n")
    assert all(re.fullmatch(r"xquant: INFO: [a-z (),-]+: \d+\.\d s", line) for line in stages), stderr
    assert stdout == ""
    assert snapshot(project) == before  # the old output is intact, nothing new, inputs unchanged
    assert leftovers(project) == []
    assert list(temp.glob("xquant-*")) == []  # the engine's temporary copy of the model is gone too


# --------------------------------------------------------------------------- the last check before writing
def test_the_final_gate_names_what_is_wrong_with_a_quantized_model():
    """A quantized model that cannot be used is exit 1 naming the cause, never written with exit 0."""
    from xquant_core.errors import QuantizationError
    from xquant_core.verify import verify_model

    quantized = qdq_model()
    weight = numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == "w_q")) * 0.01
    float_model = finish(helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["out"], pads=[1, 1, 1, 1])], "float",
        list(quantized.graph.input), list(quantized.graph.output),
        [numpy_helper.from_array(weight.astype(np.float32), "w")]))
    feed = {"input": np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)}
    verify_model(quantized, float_model, feed)  # a sound model passes

    for name, value, cause in (("x_scale", np.inf, "the quantization scale of input"),
                               ("w_scale", 0.0, "the quantization scale of w_q")):
        broken = onnx.ModelProto.FromString(quantized.SerializeToString())
        index = next(i for i, init in enumerate(broken.graph.initializer) if init.name == name)
        broken.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array(value, np.float32), name))
        with pytest.raises(QuantizationError, match=cause):
            verify_model(broken, float_model, feed)

    renamed = onnx.ModelProto.FromString(quantized.SerializeToString())
    renamed.graph.output[0].name = "other"
    renamed.graph.node[-1].output[0] = "other"
    with pytest.raises(QuantizationError, match=r"outputs are \['other'\], the float model's \['out'\]"):
        verify_model(renamed, float_model, feed)

    nan_weights = onnx.ModelProto.FromString(quantized.SerializeToString())
    nan_weights.graph.node[-1].input.append("nan_bias")
    nan_weights.graph.initializer.append(numpy_helper.from_array(np.full(4, np.nan, np.float32), "nan_bias"))
    with pytest.raises(QuantizationError, match="output out of the quantized model holds NaN or Inf"):
        verify_model(nan_weights, float_model, feed)


@pytest.mark.slow
def test_a_run_leaves_nothing_in_the_home_and_temp_folders_but_its_onnxsim_cache(tmp_path, run_xquant):
    """onnxruntime's telemetry wrote ~/.cache/Microsoft/DeveloperTools/... and $TMPDIR/.ses. What
    a run may leave is the one entry of its onnxsim cache (``~/.cache/xquant/onnxsim``)."""
    project = make_project(tmp_path / "p", analysis_enable=True)
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    result = run_xquant("-c", str(project / "cfg.json"), cwd=project,
                        env={"HOME": str(home), "TMPDIR": str(temp), "XDG_CACHE_HOME": "",
                             "XQUANT_CACHE_DIR": None,  # the default place (the tests set their own)
                             "ORT_DISABLE_TELEMETRY": ""})  # as if unset (this process has it set)
    assert result.returncode == 0, result.stderr
    cache = home / ".cache" / "xquant" / "onnxsim"
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".onnxsim", entries
    assert sorted(home.rglob("*")) == sorted([home / ".cache", cache.parent, cache, entries[0]])
    assert list(temp.rglob("*")) == []


def test_an_unwritable_output_folder_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    """It was found only after the full run, and the message first said the model was fine."""
    import tempfile

    from xquant_core import cli, pipeline

    project = make_project(tmp_path / "p")
    (project / "out").mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == project / "out":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    def no_quantization(*args, **kwargs):
        raise AssertionError("the quantization started")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(pipeline.model_io, "simplify", no_quantization)
    assert cli.main(["-c", str(project / "cfg.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"xquant: error: cannot write to the output folder {project / 'out'}: Permission denied\n"
    assert list((project / "out").iterdir()) == []


@pytest.mark.slow
def test_the_report_and_chart_get_the_models_file_mode(tmp_path, run_xquant):
    """They were written 0600 while the model got 0644."""
    project = make_project(tmp_path / "p", analysis_enable=True)
    result = run_xquant("-c", str(project / "cfg.json"), cwd=project)
    assert result.returncode == 0, result.stderr
    modes = {path.name: path.stat().st_mode & 0o777 for path in (project / "out").iterdir()}
    assert set(modes) == {"model.q.onnx", "model.q_report.md", "model.q_report.png"}
    assert len(set(modes.values())) == 1 and modes["model.q.onnx"] & 0o044, modes


# --------------------------------------------------------------------------- xquant check
def test_check_reads_every_sample_writes_nothing_and_imports_neither_ppq_nor_torch(tmp_path):
    project = make_project(tmp_path / "p")
    code = ("import sys; from xquant_core.cli import main; code = main(['check', '-c', 'cfg.json']); "
            "print('imported:', sorted(m for m in ('ppq', 'torch') if m in sys.modules)); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "xquant: check: config cfg.json: valid"
    assert lines[1].startswith("xquant: check: model ") and "1 input(s), 1 output(s), 2 Conv/ConvTranspose" in lines[1]
    assert lines[2].startswith("xquant: check: input input [1, 3, 16, 16] float32: 12 sample(s) from ")
    assert lines[-3] == f"xquant: check: output {project / 'out' / 'model.q.onnx'} can be written"
    assert lines[-2].startswith("xquant: check: ok: ready to quantize (")
    assert lines[-1] == "imported: []"
    assert not (project / "out").exists()


def test_check_finds_a_bad_sample_anywhere_with_the_runs_message(tmp_path, run_xquant):
    """A run reads the first batch before the expensive parts; check reads them all."""
    project = make_project(tmp_path / "p")
    bad = np.load(project / "data" / "s009.npy")
    bad.flat[3] = np.nan
    np.save(project / "data" / "s009.npy", bad)
    result = run_xquant("check", "-c", str(project / "cfg.json"), cwd=project)
    assert result.returncode == 2 and result.stdout == "xquant: check: config " + str(project / "cfg.json") + ": valid\n"
    assert result.stderr == (f"xquant: error: Calibration input input: {project / 'data' / 's009.npy'} holds 1 NaN "
                             "and 0 infinite value(s) after preprocessing: calibration needs finite numbers\n")


@pytest.mark.parametrize("name", ["npy_token_id_outside_the_vocabulary", "model_has_an_op_of_another_domain"])
def test_check_finds_what_the_float_model_fails_on_with_the_runs_message(tmp_path, run_xquant, name):
    """The float model run in onnxruntime on every batch: check said "ok" where the run then
    failed (a token id outside the vocabulary; an op of another domain onnxruntime cannot run)."""
    case = next(case for case in INPUT_CASES if case.name == name)
    work = tmp_path / name
    build_case(case, work)
    result = run_xquant("check", "-q", "-c", str(work / "cfg.json"), cwd=work)
    expected = (case / "expected.txt").read_text(encoding="utf-8").splitlines()[-1]
    assert result.returncode == int((case / "exit_code").read_text()) == 2, result.stderr
    assert normalize(result.stderr, work).splitlines()[-1] == expected


# --------------------------------------------------------------------------- xquant compare
@pytest.mark.slow
def test_compare_reports_int8_against_fp32_and_gates_on_snr(tmp_path, run_xquant):
    project = make_project(tmp_path / "p")
    assert run_xquant("-c", "cfg.json", cwd=project).returncode == 0
    args = ("compare", "model.onnx", "out/model.q.onnx")
    text = run_xquant(*args, "-c", "cfg.json", cwd=project)
    assert text.returncode == 0, text.stderr
    head, samples = text.stdout.splitlines()
    assert head.startswith("xquant: compare: output logits: SNR ") and ", top-1 agreement " in head
    assert samples == "xquant: compare: 12 sample(s)"

    as_json = run_xquant(*args, "-c", "cfg.json", "--json", cwd=project)
    figures = json.loads(as_json.stdout)
    (logits,) = figures["outputs"]
    assert figures["samples"] == 12 and logits["name"] == "logits"
    assert 0 < logits["snr"] < 0.05 and logits["cosine"] > 0.97 and logits["max_abs"] > 0
    assert 0.5 <= logits["top1_agreement"] <= 1.0

    # npy lists without a config give the same figures; an SNR gate fails the command
    npy = json.loads(run_xquant(*args, "--data", "data/list.txt", "--json", cwd=project).stdout)
    assert npy == figures
    gated = run_xquant(*args, "--data", "data/list.txt", "--fail-snr", "1e-9", cwd=project)
    assert gated.returncode == 1 and "is above --fail-snr 1e-09" in gated.stderr
    itself = json.loads(run_xquant("compare", "model.onnx", "model.onnx", "--data", "data/list.txt", "--json",
                                   cwd=project).stdout)
    assert itself["outputs"][0]["snr"] == 0.0 and itself["outputs"][0]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_compare_names_what_is_wrong(tmp_path, run_xquant):
    project = make_project(tmp_path / "p")
    onnx.save(identity_model(), str(project / "other.onnx"))
    cases = [(("compare", "model.onnx"), "compare needs two models"),
             (("compare", "model.onnx", "model.onnx"), "give -c cfg.json (its inputs and preprocessing) or --data"),
             (("compare", "model.onnx", "missing.onnx", "--data", "data/list.txt"), "missing.onnx does not exist"),
             (("compare", "model.onnx", "other.onnx", "--data", "data/list.txt"), "are they the same model?")]
    for args, message in cases:
        result = run_xquant(*args, cwd=project)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


# --------------------------------------------------------------------------- xquant init
@pytest.mark.slow
def test_init_writes_a_config_that_checks_and_quantizes_and_overwrites_nothing(tmp_path, run_xquant):
    project = make_project(tmp_path / "p")
    (project / "data" / "list.txt").unlink()  # DATA_DIR holds the samples only
    result = run_xquant("init", "model.onnx", "data", "-o", "start/cfg.json", cwd=project)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "xquant: init: wrote start/cfg.json for model.onnx"
    assert out[1] == ("xquant: init: input input [1, 3, 16, 16] float32, NCHW (guessed: 3 channels in dim 1): npy "
                      "files, 10 for calibration then 2 held back in start/cfg_calib.txt (the report measures on "
                      "those), the held-back ones alone in start/cfg_holdout.txt")
    config = json.loads((project / "start" / "cfg.json").read_text())
    assert config["model_parameters"]["onnx_model"] == str(project / "model.onnx")
    (entry,) = config["calibration_parameters"]["input_parametres"]
    assert entry == {"input_name": "input", "input_shape": [1, 3, 16, 16], "dtype": "float32", "file_type": "npy",
                     "data_list_path": "cfg_calib.txt"}
    calib = (project / "start" / "cfg_calib.txt").read_text().split()
    held = (project / "start" / "cfg_holdout.txt").read_text().split()
    assert held == [str(project / "data" / f"s{i:03d}.npy") for i in (4, 9)]
    assert len(calib) == 12 and calib[10:] == held and not set(calib[:10]) & set(held)
    assert config["calibration_parameters"]["calibration_step"] == 10

    assert run_xquant("check", "-c", "start/cfg.json", cwd=project).returncode == 0
    assert run_xquant("-c", "start/cfg.json", cwd=project).returncode == 0
    assert (project / "start" / "output" / "model.q.onnx").is_file()

    before = (project / "start" / "cfg.json").read_bytes()
    again = run_xquant("init", "model.onnx", "data", "-o", "start/cfg.json", cwd=project)
    assert again.returncode == 2 and "exists: xquant init does not overwrite files" in again.stderr
    assert (project / "start" / "cfg.json").read_bytes() == before


def test_init_names_samples_it_cannot_read_and_writes_all_its_files_or_none(tmp_path, monkeypatch, capsys):
    """An empty or non-numpy ``.npy`` in DATA_DIR used to go into the lists, which ``xquant check``
    then refused; a folder that could not take the last file left the first ones behind."""
    from xquant_core import cli, outputs

    project = make_project(tmp_path / "p")
    (project / "data" / "list.txt").unlink()
    (project / "data" / "s005.npy").write_bytes(b"")
    (project / "data" / "s007.npy").write_text("not numpy")
    monkeypatch.chdir(project)
    before = snapshot(project)
    assert cli.main(["init", "model.onnx", "data", "-o", "new/cfg.json"]) == 2
    err = capsys.readouterr().err
    assert "data: 2 file(s) cannot be read as npy samples: s005.npy (empty), s007.npy (ValueError" in err, err
    assert snapshot(project) == before

    (project / "data" / "s005.npy").unlink()
    (project / "data" / "s007.npy").unlink()
    before = snapshot(project)
    mkstemp = outputs.tempfile.mkstemp

    def no_room_for_the_config(*args, prefix="", **kwargs):
        if prefix.startswith(".cfg.json."):
            raise OSError(28, "No space left on device")
        return mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", no_room_for_the_config)
    assert cli.main(["init", "model.onnx", "data", "-o", "new/cfg.json"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(project) == before  # no list, no folder left behind


def test_the_api_names_a_model_or_output_argument_of_the_wrong_type(tmp_path):
    import xquant
    from xquant_core.outputs import OutputError

    project = make_project(tmp_path / "p")
    for model, match in ((12345, "model= must be a path or an onnx.ModelProto, not int"),
                         (b"\x08\x07", "model= is bytes: give a path, or onnx.load_model_from_string")):
        with pytest.raises(xquant.XQuantError, match=match):
            xquant.quantize_onnx_model(str(project / "cfg.json"), model=model)
    with pytest.raises(OutputError, match="output= must be a path, not int"):
        xquant.quantize_onnx_model(str(project / "cfg.json"), output=7)
    assert not (project / "out").exists()


def test_compare_refuses_a_gate_that_cannot_fail(capsys):
    """``--fail-snr nan`` was accepted, and no SNR is above NaN: the CI gate never fired."""
    from xquant_core import cli

    for value in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit) as info:
            cli.main(["compare", "f.onnx", "q.onnx", "--data", "l.txt", "--fail-snr", value])
        assert info.value.code == 2
        assert f"argument --fail-snr: '{value}' is not a finite number >= 0" in capsys.readouterr().err


def test_a_max_percentile_that_clips_most_activations_is_warned_about(tmp_path, run_xquant):
    """0.9 is valid, exits 0, and left MTCNN O-net's outputs at cosine 0.59 without a word."""
    project = make_project(tmp_path / "p", max_percentile=0.9)
    result = run_xquant("check", "-c", "cfg.json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "xquant: WARNING: max_percentile is 0.9: the clip windows may then cut off 10% of every" in result.stderr


def test_mean_and_std_given_for_npy_samples_are_named_as_ignored(tmp_path, run_xquant):
    project = make_project(tmp_path / "p")
    config = json.loads((project / "cfg.json").read_text())
    config["calibration_parameters"]["input_parametres"][0].update(mean_value=[1.0], std_value=[2.0])
    (project / "cfg.json").write_text(json.dumps(config))
    result = run_xquant("check", "-c", "cfg.json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert ("xquant: WARNING: input input: mean_value/std_value apply to images (file_type img); its npy samples "
            "are fed as they are, so they are ignored") in result.stderr


def test_samples_that_overflow_the_float_model_are_exit_2_naming_the_tensor(tmp_path, run_xquant):
    """Finite samples of 3e38 overflow in the first Conv: exit 3 with an OverflowError; and what
    xquant's calibration raises inside PPQ's forward came out as PPQ's "Op Execution Error"."""
    project = make_project(tmp_path / "p", samples=4)
    for index in range(4):
        np.save(project / "data" / f"s{index:03d}.npy", np.full(SAMPLE_SHAPE, 3e38, np.float32))
    before = snapshot(project)
    result = run_xquant("-c", "cfg.json", cwd=project)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "of the float model holds inf or NaN on calibration batch 1" in result.stderr, result.stderr
    assert snapshot(project) == before


def _saturating_conv() -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """A QDQ 1x1 Conv of 64 channels, int8 input and weights at 127: products whose pairwise
    16-bit sums VPMADDUBSW (x86 without VNNI) can saturate, depending on the kernel onnxruntime picks."""
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 4, 4])]
    weight = np.full((8, 64, 1, 1), 127, np.int8)
    weight[1::2] = -127  # channels of both signs
    constants = [numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.array(0.01, np.float32), "w_s"),
                 numpy_helper.from_array(np.array(1 / 127, np.float32), "x_s"),
                 numpy_helper.from_array(np.array(0, np.int8), "x_z"), numpy_helper.from_array(np.array(0, np.int8), "w_z")]
    quantized = finish(helper.make_graph([
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_d"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"]),
        helper.make_node("Conv", ["x_d", "w"], ["y"])], "q", inputs, outputs, constants))
    float_weight = numpy_helper.from_array(weight.astype(np.float32) * 0.01, "w")
    float_model = finish(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "f", inputs, outputs,
                                            [float_weight]))
    return quantized, float_model, {"x": np.ones((1, 64, 4, 4), np.float32)}


def test_measurements_use_exact_int8_arithmetic_and_the_user_hears_when_this_cpus_kernels_differ(monkeypatch):
    """On an AMD Zen 3 (AVX2, no VNNI) onnxruntime's fused int8 kernels gave the MobileNetV2 sample
    a logits SNR of 0.096 against 0.011 in exact arithmetic (what the chip computes): xquant's
    sessions are exact on every CPU, and the final gate warns when the default session differs."""
    from xquant_core import verify
    from xquant_core.runtime import onnxruntime_session

    quantized, float_model, feed = _saturating_conv()
    exact = onnxruntime_session(quantized).run(None, feed)[0]
    expected = onnxruntime_session(float_model).run(None, feed)[0]
    np.testing.assert_allclose(exact, expected, rtol=1e-5)  # 64 x 127 x 127 x scales, on any CPU
    fused = onnxruntime_session(quantized, fused=True).run(None, feed)[0]
    saturates = not np.allclose(fused, expected, rtol=1e-3)
    warning = verify.verify_model(quantized, float_model, feed)
    assert (warning is not None) == saturates, (warning, fused.ravel()[:4], expected.ravel()[:4])

    def perturbed(model, threads=None, fused=False):  # as if this CPU's fused kernels saturated
        session = onnxruntime_session(model, threads)
        if not fused:
            return session

        class Off:
            def get_inputs(self):
                return session.get_inputs()

            def run(self, names, inputs):
                return [value * 0.8 for value in session.run(names, inputs)]
        return Off()

    monkeypatch.setattr(verify, "onnxruntime_session", perturbed)
    warning = verify.verify_model(quantized, float_model, feed)
    assert warning is not None and "output y SNR 0.04 with a default onnxruntime session" in warning
    assert "xquant compare" in warning and "ORT_ENABLE_BASIC" in warning

    def refused(model, threads=None, fused=False):  # a default session that cannot run the model
        if fused:
            raise RuntimeError("MatMulIntegerToFloat: b zero point is not valid")
        return onnxruntime_session(model, threads)

    monkeypatch.setattr(verify, "onnxruntime_session", refused)
    warning = verify.verify_model(quantized, float_model, feed)  # was None: nothing said
    assert warning is not None and "default session on this CPU cannot run the quantized model" in warning
    assert "b zero point is not valid" in warning


def test_a_batched_matmul_weight_is_quantized_per_tensor_and_runs_in_a_default_session(tmp_path):
    """A rank-3 constant MatMul weight got one scale per column on axis 2: onnxruntime's default
    session (MatMulIntegerToFloat) refused to run the exported model, which exited 0."""
    import xquant
    from xquant_core.runtime import onnxruntime_session

    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (2, 8, 6)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    samples = [rng.normal(0, 1, (2, 4, 8)).astype(np.float32) for _ in range(8)]
    for index, sample in enumerate(samples):
        np.save(tmp_path / f"{index}.npy", sample)
    (tmp_path / "list.txt").write_text("".join(f"{index}.npy\n" for index in range(8)))
    config = {"model_parameters": {"onnx_model": "m.onnx", "working_dir": "out"},
              "calibration_parameters": {"calibration_step": 8, "calibration_device": "cpu",
                                         "input_parametres": [{"file_type": "npy", "data_list_path": "list.txt"}]},
              "quantization_parameters": {"analysis_enable": False, "finetune_level": 0}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    quantized = xquant.quantize_onnx_model(str(tmp_path / "cfg.json"))
    feed = {"x": samples[0]}
    got = onnxruntime_session(quantized, fused=True).run(None, feed)[0]  # the default session runs it
    want = onnxruntime_session(model).run(None, feed)[0]
    assert float(np.square(got - want).sum() / np.square(want).sum()) < 1e-3
