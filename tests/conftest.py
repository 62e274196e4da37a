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

REPO = Path(__file__).resolve().parent.parent


def _register_models():
    """``tests/models.py`` as ``xquant_test_models``, importable by every test module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("xquant_test_models", Path(__file__).with_name("models.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["xquant_test_models"] = module
    spec.loader.exec_module(module)
    return module


small_cnn = _register_models().small_cnn
SAMPLES = REPO / "samples"
MATERIAL = SAMPLES / "material"
SAMPLE_MODEL = SAMPLES / "mobilenet_v2" / "mobilenet_v2.onnx"


@pytest.fixture(autouse=True, scope="session")
def onnxsim_cache(tmp_path_factory) -> Path:
    """The tests' own onnxsim cache (``XQUANT_CACHE_DIR``, inherited by the runs in subprocesses):
    empty when the session starts, nothing written to the user's ``~/.cache``."""
    folder = tmp_path_factory.mktemp("xquant_cache")
    saved = os.environ.get("XQUANT_CACHE_DIR")
    os.environ["XQUANT_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("XQUANT_CACHE_DIR", None)
    else:
        os.environ["XQUANT_CACHE_DIR"] = saved


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
    """Run the CLI in a subprocess: ``run_xquant(*args, cwd=None, env=None, module=False)``; a
    variable set to None in ``env`` is left out."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, module: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
        if module:
            command = [sys.executable, "-m", "xquant", *args]
        else:
            command = [str(Path(sys.executable).with_name("xquant")), *args]
        full_env = {key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None}
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
    """The small CNN of ``tests/models.py`` saved at ``path``."""
    onnx.save(small_cnn(seed, channels, size), str(path))
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


@pytest.fixture
def temporary_plugin():
    """``add(plugin, name)`` registers a plugin on the process-wide host; every plugin added is
    unregistered afterwards, and the registries must be as they were."""
    from xquant_core.plugins import KINDS, get_host, registry

    host = get_host()
    before = {kind: registry(kind).names() for kind in KINDS}
    added = []

    def add(plugin, name):
        host.register(plugin, name, distribution="xquant-tests", version="0")
        added.append(name)
        return plugin

    try:
        yield add
    finally:
        for name in reversed(added):
            host.unregister(name)
        assert {kind: registry(kind).names() for kind in KINDS} == before
