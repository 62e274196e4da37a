"""Shared fixtures.

Never ``import tests``: PPQ's wheel installs an unrelated top-level ``tests`` package.
Test modules are collected with ``--import-mode=importlib`` (see pyproject.toml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
MATERIAL = SAMPLES / "material"
SAMPLE_MODEL = SAMPLES / "mobilenet_v2" / "mobilenet_v2.onnx"


@pytest.fixture
def repo_root() -> Path:
    return REPO


_SAMPLE_MODULES: dict[str, object] = {}


def _load_sample_module(relative: str):
    """Import a script under samples/ by its path (samples/ is not a package); cached."""
    import importlib.util

    if relative not in _SAMPLE_MODULES:
        name = "xquant_sample_" + relative.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, SAMPLES / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _SAMPLE_MODULES[relative] = module
    return _SAMPLE_MODULES[relative]


@pytest.fixture(scope="session")
def sample_module():
    """``sample_module("mobilenet_v2/evaluate.py")``: a sample script imported by path."""
    return _load_sample_module


@pytest.fixture
def run_xquant():
    """Run the CLI in a subprocess: ``run_xquant(*args, cwd=None, env=None, module=False)``."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, module: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
        if module:
            command = [sys.executable, "-m", "xquant", *args]
        else:
            command = [str(Path(sys.executable).with_name("xquant")), *args]
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    return run


@pytest.fixture
def material() -> Path:
    """The fetched sample material (skips when `samples/fetch_material.py` was not run)."""
    if not (MATERIAL / "calib" / "list.txt").is_file():
        pytest.skip("sample material missing: run `python samples/fetch_material.py`")
    return MATERIAL


@pytest.fixture
def sample_model(material) -> Path:
    if not SAMPLE_MODEL.is_file():
        pytest.skip("sample model missing: run `python samples/mobilenet_v2/export.py`")
    return SAMPLE_MODEL


def make_conv_model(path: Path, seed: int = 0, channels: int = 3, size: int = 16) -> Path:
    """A small real-weights-free CNN (Conv-Relu-Conv-Add-GAP-Gemm) for fast pipeline tests."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, channels, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    wf = rng.normal(0, 0.3, (10, 8)).astype(np.float32)
    bf = rng.normal(0, 0.1, (10,)).astype(np.float32)
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
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (wf, "wf"), (bf, "bf")]]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def small_project(tmp_path) -> Path:
    """A folder with a small CNN, 12 npy calibration samples, their list and a config."""
    make_conv_model(tmp_path / "small.onnx")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for index in range(12):
        np.save(data / f"sample_{index:02d}.npy", rng.normal(0, 1, (3, 16, 16)).astype(np.float32))
        lines.append(f"sample_{index:02d}.npy")
    (data / "list.txt").write_text("\n".join(lines) + "\n")
    config = {
        "model_parameters": {"onnx_model": "small.onnx", "working_dir": "out"},
        "calibration_parameters": {
            "calibration_step": 12, "calibration_device": "cpu", "calibration_type": "percentile",
            "input_parametres": [{"file_type": "npy", "data_list_path": "data/list.txt"}],
        },
        "quantization_parameters": {"analysis_enable": False, "finetune_level": 0},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config, indent=2))
    return tmp_path
