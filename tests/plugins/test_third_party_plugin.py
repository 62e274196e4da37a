"""A third-party plugin package, installed through its entry point and used by the CLI.

``samples/plugins/xquant-example-plugin`` is built with pip (setuptools, offline) into a
temporary folder that the CLI subprocesses get on ``PYTHONPATH``; xquant finds it through
the ``xquant`` entry-point group exactly as it finds an installed third-party package.
A second, deliberately broken package checks how a plugin that fails to import is reported.
The component unit tests import the plugin module from its source folder (no PPQ needed).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from xquant_core import hookimpl
from xquant_core.config import InputConfig
from xquant_core.data import InputSpec
from xquant_core.errors import DataError
from xquant_core.runtime import onnxruntime_session  # exact int8 arithmetic on every CPU

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SRC = REPO / "samples" / "plugins" / "xquant-example-plugin"
PLUGIN_DIST = "xquant-example-plugin"
PLUGIN_VERSION = "0.1.0"
PLUGIN_HEADER = f"{PLUGIN_DIST}:example  ({PLUGIN_DIST} {PLUGIN_VERSION}, third-party)"
SAMPLE_SHAPE = (3, 16, 16)  # the input of conftest's small CNN, without the batch dimension

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "xquant-broken-plugin"
version = "0.0.1"

[project.entry-points.xquant]
broken = "xquant_broken_plugin"

[tool.setuptools]
py-modules = ["xquant_broken_plugin"]
"""
BROKEN_MODULE = 'raise ImportError("xquant_broken_plugin needs libfoo, which is not installed")\n'


def pip_install(source: Path, target: Path, scratch: Path) -> Path:
    """Build and install ``source`` into ``target`` offline, as a plugin author would."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the plugin packages' build backend) is not installed in this "
                    "environment; --no-build-isolation cannot build without it")
    if not has_bdist_wheel():
        pytest.skip("setuptools < 70.1 without the `wheel` package cannot build wheels; "
                    "--no-build-isolation needs one of them installed")
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    copy = scratch / f"{source.name}-src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(copy)],
        check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"pip install {source.name} failed:\n{result.stdout}\n{result.stderr}"
    return target


def has_bdist_wheel() -> bool:
    """Whether the installed setuptools can build a wheel (it ships bdist_wheel since 70.1)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the installed example plugin (its code and dist-info)."""
    scratch = tmp_path_factory.mktemp("example-plugin")
    return pip_install(PLUGIN_SRC, scratch / "site", scratch)


@pytest.fixture(scope="module")
def broken_plugin_path(tmp_path_factory) -> Path:
    """A folder holding an installed plugin whose module raises ImportError."""
    scratch = tmp_path_factory.mktemp("broken-plugin")
    source = scratch / "xquant-broken-plugin"
    source.mkdir()
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "xquant_broken_plugin.py").write_text(BROKEN_MODULE)
    return pip_install(source, scratch / "site", scratch)


def plugin_env(path: Path, **extra: str) -> dict:
    """The CLI's environment: ``path`` first on PYTHONPATH, autoloading on unless ``extra`` says."""
    pythonpath = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, "XQUANT_DISABLE_PLUGIN_AUTOLOAD": "", **extra}


def edit_config(project: Path, **calibration) -> Path:
    config = json.loads((project / "cfg.json").read_text())
    config["calibration_parameters"].update(calibration)
    (project / "cfg.json").write_text(json.dumps(config, indent=2))
    return project / "cfg.json"


def check_quantized_model(project: Path, result, inputs: np.ndarray) -> None:
    """The model was written, onnxruntime runs it, and it stays close to the float model.

    ``inputs`` (N x C x H x W) look like the calibration data. Measured relative error of
    the logits: 0.013 with gaussian on npy data; the bound only catches a broken range.
    """
    import onnxruntime as ort

    assert result.returncode == 0, result.stderr
    models = sorted((project / "out").glob("*.onnx"))
    assert models, f"no model written in {project / 'out'}: {result.stdout}"
    quantized = onnxruntime_session(str(models[0]))
    reference = onnxruntime_session(str(project / "small.onnx"))
    name = quantized.get_inputs()[0].name
    got = np.concatenate([quantized.run(None, {name: x[None]})[0] for x in inputs])
    want = np.concatenate([reference.run(None, {name: x[None]})[0] for x in inputs])
    assert got.shape == (len(inputs), 10) and np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1


# -- through the entry point, in the CLI -------------------------------------------


def test_plugins_command_lists_the_example_plugin(plugin_path, run_xquant):
    result = run_xquant("plugins", env=plugin_env(plugin_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert PLUGIN_HEADER in lines, result.stdout
    start = lines.index(PLUGIN_HEADER) + 1
    expected = ["    calibration: gaussian", "    reader: csv", "    preprocessor: scale01"]
    assert lines[start:start + 3] == expected, result.stdout


@pytest.mark.slow
def test_gaussian_calibration_quantizes(plugin_path, small_project, run_xquant):
    config = edit_config(small_project, calibration_type="gaussian")
    result = run_xquant("-c", str(config), env=plugin_env(plugin_path))
    inputs = np.random.default_rng(3).normal(0, 1, (8,) + SAMPLE_SHAPE).astype(np.float32)
    check_quantized_model(small_project, result, inputs)


@pytest.mark.slow
def test_csv_reader_with_scale01_quantizes(plugin_path, small_project, run_xquant):
    rng = np.random.default_rng(7)
    data = small_project / "csv"
    data.mkdir()
    names = []
    for index in range(12):
        pixels = rng.integers(0, 256, SAMPLE_SHAPE)
        rows = pixels.reshape(-1, SAMPLE_SHAPE[-1])
        # both separators the reader accepts: commas on even files, whitespace on odd ones
        separator = "," if index % 2 == 0 else " "
        text = "\n".join(separator.join(str(v) for v in row) for row in rows)
        (data / f"sample_{index:02d}.csv").write_text(text + "\n")
        names.append(f"sample_{index:02d}.csv")
    (data / "list.txt").write_text("\n".join(names) + "\n")
    config = edit_config(small_project, input_parametres=[
        {"file_type": "csv", "preprocess_file": "scale01", "data_list_path": "csv/list.txt"}])
    result = run_xquant("-c", str(config), env=plugin_env(plugin_path))
    inputs = rng.integers(0, 256, (8,) + SAMPLE_SHAPE).astype(np.float32) / 255
    check_quantized_model(small_project, result, inputs)


def test_csv_size_mismatch_is_a_data_error(plugin_path, small_project, run_xquant):
    (small_project / "csv").mkdir()
    (small_project / "csv" / "short.csv").write_text("1, 2, 3\n4 5\n")
    (small_project / "csv" / "list.txt").write_text("short.csv\n")
    config = edit_config(small_project, input_parametres=[
        {"file_type": "csv", "data_list_path": "csv/list.txt"}])
    result = run_xquant("-c", str(config), env=plugin_env(plugin_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (f"xquant: error: Calibration input input: {small_project / 'csv' / 'short.csv'} holds 5 numbers, "
            "expected 768 (sample shape [3, 16, 16])") in result.stderr


def test_disabled_autoload_does_not_load_the_plugin(plugin_path, small_project, run_xquant, monkeypatch):
    from xquant_core.plugins import DISABLE_AUTOLOAD_ENV, PluginHost

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    host = PluginHost()
    host.load_entry_points()
    builtin_names = ", ".join(host.registry("calibration").names())
    assert "gaussian" not in builtin_names

    config = edit_config(small_project, calibration_type="gaussian")
    result = run_xquant("-c", str(config), env=plugin_env(plugin_path, **{DISABLE_AUTOLOAD_ENV: "1"}))
    assert result.returncode == 2, result.stderr
    assert "calibration_type gaussian not implemented yet." in result.stderr
    assert f"Installed: {builtin_names} (see `xquant plugins`)" in result.stderr
    assert not list((small_project / "out").glob("*.onnx"))


def test_broken_plugin_is_named_without_a_traceback(broken_plugin_path, run_xquant):
    result = run_xquant("plugins", env=plugin_env(broken_plugin_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "from distribution 'xquant-broken-plugin 0.0.1' failed to load" in result.stderr
    assert "ImportError: xquant_broken_plugin needs libfoo, which is not installed" in result.stderr
    assert "XQUANT_DISABLE_PLUGIN_AUTOLOAD=1" in result.stderr

    # the escape hatch the message names works
    result = run_xquant("plugins", env=plugin_env(broken_plugin_path, XQUANT_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert result.returncode == 0, result.stderr
    assert "xquant-broken-plugin" not in result.stdout


def test_plugin_module_is_light(plugin_path):
    code = ("import sys, xquant_example_plugin.plugin; "
            "print(sorted(m for m in ('torch', 'ppq', 'cv2', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(plugin_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the components alone ----------------------------------------------------------


@pytest.fixture
def plugin(monkeypatch):
    """The example plugin module, imported from its source folder."""
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    return importlib.import_module("xquant_example_plugin.plugin")


def make_spec(**config) -> InputSpec:
    return InputSpec("input", (1,) + SAMPLE_SHAPE, "float32",
                     InputConfig(index=0, data_list_path=Path("list.txt"), **config))


def gaussian_stats(mean: float, std: float, low: float, high: float, bins: int = 4096):
    """Statistics whose histogram is a normal density sampled at the bin centres."""
    from xquant_core.calibration import TensorStatistics

    edges = np.linspace(low, high, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    counts = 1e6 * np.exp(-0.5 * ((centres - mean) / std) ** 2)
    return TensorStatistics("t", low, high, counts)


def test_gaussian_range_is_mean_plus_minus_k_std(plugin):
    from xquant_core.calibration import CalibrationContext

    stats = gaussian_stats(mean=1.0, std=0.5, low=-9.0, high=11.0)
    low, high = plugin.Gaussian().compute_range(stats, CalibrationContext())
    assert plugin.Gaussian().k == plugin.DEFAULT_K == 4.0
    assert low == pytest.approx(1.0 - 4 * 0.5, abs=1e-3)
    assert high == pytest.approx(1.0 + 4 * 0.5, abs=1e-3)
    low, high = plugin.Gaussian(k=2).compute_range(stats, CalibrationContext())
    assert (low, high) == (pytest.approx(0.0, abs=1e-3), pytest.approx(2.0, abs=1e-3))


def test_gaussian_range_is_clamped_and_keeps_zero(plugin):
    from xquant_core.calibration import CalibrationContext, TensorStatistics

    ctx = CalibrationContext()
    # the ±4σ window is wider than what was observed: the observed range is kept
    assert plugin.Gaussian().compute_range(gaussian_stats(0.0, 1.0, -2.0, 3.0), ctx) == (-2.0, 3.0)
    # positive values only: the window is clamped to max, then widened down to 0
    low, high = plugin.Gaussian().compute_range(gaussian_stats(10.0, 1.0, 5.0, 20.0), ctx)
    assert low == 0.0 and high == pytest.approx(14.0, abs=1e-2)
    # negative values only
    low, high = plugin.Gaussian().compute_range(gaussian_stats(-10.0, 1.0, -20.0, -5.0), ctx)
    assert low == pytest.approx(-14.0, abs=1e-2) and high == 0.0
    # no usable histogram: the observed range, with 0
    assert plugin.Gaussian().compute_range(TensorStatistics("t", 2.0, 2.0, np.zeros(8)), ctx) == (0.0, 2.0)
    assert plugin.Gaussian().compute_range(TensorStatistics("t", -1.0, 3.0, None), ctx) == (-1.0, 3.0)
    assert plugin.Gaussian.needs_histogram is True
    with pytest.raises(ValueError):
        plugin.Gaussian(k=0)


def test_csv_reader_reshapes_to_the_sample_shape(plugin, tmp_path):
    values = np.arange(math.prod(SAMPLE_SHAPE), dtype=np.float32) / 7
    path = tmp_path / "a.csv"
    path.write_text("\n".join(", ".join(repr(float(v)) for v in row) for row in values.reshape(-1, 16)))
    reader = plugin.CsvReader()
    array = reader.read(path, make_spec(file_type="csv"))
    assert reader.is_image is False
    assert array.shape == SAMPLE_SHAPE and array.dtype == np.float32
    np.testing.assert_array_equal(array.ravel(), values)


def test_csv_reader_names_the_file_and_the_counts(plugin, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("1, 2, 3\n4 5\n")
    with pytest.raises(DataError) as info:
        plugin.CsvReader().read(path, make_spec(file_type="csv"))
    message = str(info.value)
    assert str(path) in message and "holds 5 numbers, expected 768" in message and "[3, 16, 16]" in message

    path.write_text("1, 2, x\n")
    with pytest.raises(DataError, match="short.csv is not a csv of numbers"):
        plugin.CsvReader().read(path, make_spec(file_type="csv"))
    with pytest.raises(DataError, match="cannot read"):
        plugin.CsvReader().read(tmp_path / "missing.csv", make_spec(file_type="csv"))


class ImageLike:
    is_image = True


class ArrayLike:
    is_image = False


def test_scale01_on_images_resizes_scales_and_lays_out_chw(plugin):
    image = np.full((20, 24, 3), 255, dtype=np.uint8)
    image[..., 1] = 0
    sample = plugin.Scale01()(image, make_spec(file_type="img", preprocess_file="scale01"), ImageLike())
    assert sample.shape == SAMPLE_SHAPE and sample.dtype == np.float32
    np.testing.assert_allclose(sample[0], 1.0)
    np.testing.assert_allclose(sample[1], 0.0)

    spec = make_spec(file_type="img", mean_value=[0.5], std_value=[0.25])
    sample = plugin.Scale01()(np.full((16, 16, 3), 255, dtype=np.uint8), spec, ImageLike())
    np.testing.assert_allclose(sample, 2.0)
    with pytest.raises(DataError, match="mean_value has 2 values but the image has 3 channels"):
        plugin.Scale01()(image, make_spec(file_type="img", mean_value=[0.5, 0.5]), ImageLike())


def test_scale01_on_arrays_divides_by_255(plugin):
    array = np.full(SAMPLE_SHAPE, 51.0, dtype=np.float32)
    sample = plugin.Scale01()(array, make_spec(file_type="csv"), ArrayLike())
    assert sample.shape == SAMPLE_SHAPE
    np.testing.assert_allclose(sample, 0.2)
    with pytest.raises(DataError, match="mean_value/std_value to images only"):
        plugin.Scale01()(array, make_spec(file_type="csv", mean_value=[1.0]), ArrayLike())


def test_a_misspelt_hook_is_refused_naming_it():
    """pluggy registers a hook implementation no spec declares and never calls it: the plugin
    seemed installed and did nothing. The host checks pending hooks at registration."""
    import types

    from xquant_core.errors import PluginError
    from xquant_core.hookspecs import hookimpl
    from xquant_core.plugins import PluginHost

    plugin = types.ModuleType("typo_plugin")

    @hookimpl
    def xquant_register_reader(register):  # the hook is xquant_register_readers
        register("csv2", object())

    plugin.xquant_register_reader = xquant_register_reader
    host = PluginHost()
    with pytest.raises(PluginError, match=r"plugin 'typo' \(typo-dist\) implements xquant_register_reader that "
                                          r"xquant does not define; its hooks are: .*xquant_register_readers"):
        host.register(plugin, "typo", "typo-dist", "1.0")
    assert not host.manager.has_plugin("typo") and "typo" not in host.infos


@pytest.mark.parametrize(("hook", "kind", "component", "lacks"), [
    ("xquant_register_readers", "reader", object(), "read"),
    ("xquant_register_calibration_algorithms", "calibration", lambda stats, ctx: (0.0, 1.0), "compute_range"),
    ("xquant_register_platforms", "platform", types.SimpleNamespace(export=lambda graph: None),
     "create_quantizer, float_ops, float_op_types, share_quantization, after_calibration, finalize"),
    ("xquant_register_reporters", "reporter", object(), "write"),
    ("xquant_register_searchers", "searcher", types.SimpleNamespace(quantize=lambda *args: None), "explain"),
    ("xquant_register_commands", "command", types.SimpleNamespace(add_arguments=lambda parser: None), "run"),
])
def test_a_component_that_lacks_its_interfaces_methods_is_refused_when_registered(hook, kind, component, lacks):
    """Issue 14: a component is checked against its interface when registered, not when a run
    first calls the missing method (an AttributeError deep in the pipeline)."""
    from xquant_core.errors import PluginError
    from xquant_core.hookspecs import hookimpl
    from xquant_core.plugins import PluginHost

    plugin = types.ModuleType("half_plugin")

    def register_it(register):
        register("half", component)

    setattr(plugin, hook, hookimpl(register_it))
    register_it.__name__ = hook
    host = PluginHost()
    host.register(plugin, "half", "half-dist", "1.0")
    with pytest.raises(PluginError, match=rf"plugin 'half' registers {kind} 'half' as \w+, which lacks "
                                          rf"{re.escape(lacks)} \(see xquant_core\."):
        host.registry(kind)


class _Hello:
    """A third party's command: ``xquant hello NAME [--shout]``."""

    summary = "hello NAME [--shout]\n            greet NAME"

    def __init__(self, name: str):
        self.name = name

    def add_arguments(self, parser):
        parser.add_argument("who")
        parser.add_argument("--shout", action="store_true")

    def run(self, args):
        if args.who == "nobody":
            raise DataError("hello: nobody to greet")
        text = f"hello {args.who}"
        print(text.upper() if args.shout else text)
        return 0 if not args.verbose else 7

    @hookimpl
    def xquant_register_commands(self, register):
        register(self.name, self)


def test_a_plugin_command_runs_from_the_command_line_with_the_clis_options_and_errors(temporary_plugin, capsys):
    """Issue 14: commands beyond quantizing are plugins (the built-in init and compare are too)."""
    from xquant_core import cli

    temporary_plugin(_Hello("hello"), "hello-plugin")
    assert cli.main(["hello", "world", "--shout"]) == 0
    assert capsys.readouterr().out.strip() == "HELLO WORLD"
    assert cli.main(["hello", "world", "-v"]) == 7  # the common options are on every command's parser
    assert cli.main(["hello", "nobody"]) == 2  # an XQuantError: its message and exit code, no traceback
    captured = capsys.readouterr()
    assert "xquant: error: hello: nobody to greet" in captured.err and "Traceback" not in captured.err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "hello NAME [--shout]" in capsys.readouterr().out


def test_a_plugin_cannot_take_a_core_commands_name(temporary_plugin, capsys):
    from xquant_core import cli

    temporary_plugin(_Hello("check"), "check-plugin")
    assert cli.main(["compare"]) == 2
    assert "registers command 'check', a name of the core's own commands" in capsys.readouterr().err
