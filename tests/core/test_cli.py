"""The command line (``xquant``, ``python -m xquant``) and the ``xquant.quantize_onnx_model`` API.

Uses the ``small_project`` fixture: a small CNN, 12 npy samples and a cfg.json that
writes ``out/small.q.onnx`` (about 3 s per quantization).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import xquant_core
from xquant_core.runtime import onnxruntime_session  # exact int8 arithmetic on every CPU
from xquant_test_models import two_input_model

BUILTIN_PLUGINS = {
    "auto_precision": ("searcher", ["auto_precision"]),
    "calibration": ("calibration", ["default", "kl", "minmax", "mse", "percentile"]),
    "commands": ("command", ["init", "compare"]),
    "metrics": ("metric", ["snr", "cosine"]),
    "preprocessors": ("preprocessor", ["none", "PT_IMAGENET", "IMAGENET"]),
    "readers": ("reader", ["img", "npy", "raw"]),
    "reporter": ("reporter", ["analysis"]),
    "spacemit": ("platform", ["spacemit"]),
}

#: Float vs int8 logits of the small CNN on its 12 calibration samples plus 8 new samples
#: from the same distribution (measured: max |diff| 0.07 on logits up to about 1.6 in
#: magnitude; noise-to-signal power 0.002). The thresholds are about 2x and 5x the
#: measured values: an int8 step of the logits is about 0.015, and a broken scale or
#: zero point gives errors of the order of the logits themselves (SNR near 1).
MAX_ABS_DIFF = 0.15
MAX_SNR = 0.01


def assert_clean_failure(result, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.strip(), "a failure must say why"


def load_config_dict(project: Path) -> dict:
    return json.loads((project / "cfg.json").read_text())


def save_config_dict(project: Path, config: dict, name: str = "cfg.json") -> Path:
    path = project / name
    path.write_text(json.dumps(config, indent=2))
    return path


# --------------------------------------------------------------------------- a successful run
@pytest.mark.slow
def test_quantize_writes_a_valid_model_close_to_float(small_project, run_xquant):
    result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert result.returncode == 0, result.stderr
    output = small_project / "out" / "small.q.onnx"
    assert output.is_file()

    # three summary lines: how many compute ops run in INT8; the output path and the time it took;
    # every stage's time
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    assert lines[0] == "xquant: INT8: 3 of 3 Conv/ConvTranspose/Gemm/MatMul ops"
    assert str(output) in lines[1]
    assert re.search(r"in \d+\.\d s$", lines[1]), lines[1]
    assert "12 calibration samples" in lines[1]
    assert re.fullmatch(r"xquant: stages: onnxsim \d+\.\d s, calibration \d+\.\d s(, .+)?", lines[2]), lines[2]
    assert "Traceback" not in result.stderr
    assert "leaked" not in result.stderr  # nanobind's exit check: onnxsim's objects stay collectable
    # not a terminal: no bar; a stage of a second or more is one log line with its time
    assert "\r" not in result.stderr and "it/s" not in result.stderr
    for line in result.stderr.splitlines():
        if re.search(r": \d+\.\d s$", line):
            assert re.fullmatch(r"xquant: INFO: [a-z (),-]+: \d+\.\d s", line), line

    quiet = run_xquant("-q", "-c", "cfg.json", cwd=small_project)
    assert quiet.returncode == 0 and not re.search(r"INFO: [a-z (),-]+: \d", quiet.stderr), quiet.stderr

    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert dict((p.key, p.value) for p in model.metadata_props)["xquant_version"] == xquant_core.__version__

    float_session = onnxruntime_session(str(small_project / "small.onnx"))
    quant_session = onnxruntime_session(str(output))
    samples = [np.load(p)[None] for p in sorted((small_project / "data").glob("*.npy"))]
    rng = np.random.default_rng(1234)
    samples += [rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    floats = np.concatenate([float_session.run(None, {"input": x})[0] for x in samples])
    quants = np.concatenate([quant_session.run(None, {"input": x})[0] for x in samples])
    assert floats.shape == quants.shape == (20, 10)
    snr = float(np.sum((quants - floats) ** 2) / np.sum(floats ** 2))
    assert snr < MAX_SNR, snr
    np.testing.assert_allclose(quants, floats, rtol=0, atol=MAX_ABS_DIFF)
    assert not np.allclose(quants, floats, rtol=0, atol=1e-6), "the output should actually be quantized"


@pytest.mark.slow
def test_console_script_and_module_give_identical_bytes(small_project, run_xquant):
    first = run_xquant("-c", "cfg.json", "-o", "a.onnx", cwd=small_project)
    second = run_xquant("-c", "cfg.json", "-o", "b.onnx", cwd=small_project, module=True)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    a, b = (small_project / "a.onnx").read_bytes(), (small_project / "b.onnx").read_bytes()
    assert len(a) > 1000
    assert a == b
    # -o replaces the default output: nothing written to out/
    assert not (small_project / "out").exists()


@pytest.mark.slow
def test_output_bytes_do_not_depend_on_the_hash_seed(small_project, run_xquant):
    outputs = []
    for seed in ("1", "2"):
        result = run_xquant("-c", "cfg.json", "-o", f"seed{seed}.onnx", cwd=small_project,
                            env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        outputs.append((small_project / f"seed{seed}.onnx").read_bytes())
    # what does not depend on the seed today: the nodes and the tensor values
    a, b = (onnx.load_from_string(data) for data in outputs)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    values = [{i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer} for m in (a, b)]
    assert values[0] == values[1]
    assert outputs[0] == outputs[1]


def test_api_returns_the_model_it_wrote(small_project, monkeypatch):
    import xquant

    monkeypatch.chdir(small_project.parent)  # the config's relative paths must not depend on cwd
    model = xquant.quantize_onnx_model(str(small_project / "cfg.json"))
    assert isinstance(model, onnx.ModelProto)
    written = small_project / "out" / "small.q.onnx"
    assert model.SerializeToString() == written.read_bytes()


@pytest.mark.slow
def test_input_and_output_overrides(small_project, run_xquant):
    # another model: the small CNN with conv1's weights negated
    other = onnx.load(str(small_project / "small.onnx"))
    w1 = next(init for init in other.graph.initializer if init.name == "w1")
    negated = -numpy_helper.to_array(w1)
    w1.CopyFrom(numpy_helper.from_array(negated, "w1"))
    (small_project / "models").mkdir()
    onnx.save(other, str(small_project / "models" / "other.onnx"))

    result = run_xquant("-c", "cfg.json", "-i", "models/other.onnx", "-o", "custom/out.onnx", cwd=small_project)
    assert result.returncode == 0, result.stderr
    written = small_project / "custom" / "out.onnx"
    assert written.is_file()
    assert "custom/out.onnx" in result.stdout
    assert not (small_project / "out").exists()
    # it is the other model that was quantized: conv1's int8 weight has the negated signs
    int8_weights = [numpy_helper.to_array(init) for init in onnx.load(str(written)).graph.initializer
                    if init.data_type == TensorProto.INT8 and tuple(init.dims) == negated.shape]
    assert len(int8_weights) == 1, "conv1's weight should be stored as int8"
    nonzero = int8_weights[0] != 0
    assert np.array_equal(np.sign(int8_weights[0])[nonzero], np.sign(negated)[nonzero])


def test_api_accepts_a_model_proto(small_project):
    import xquant

    proto = onnx.load(str(small_project / "small.onnx"))
    # what an Ultralytics export carries and its loader reads back; a key xquant writes itself
    onnx.helper.set_model_props(proto, {"names": "{0: 'face'}", "stride": "32", "xquant_version": "0.0"})
    proto.doc_string, proto.graph.doc_string = "a face detector", "its graph"
    model = xquant.quantize_onnx_model(str(small_project / "cfg.json"), model=proto)
    assert (model.doc_string, model.graph.doc_string) == ("a face detector", "its graph")
    # no model file: the output is named after "model" in working_dir
    written = small_project / "out" / "model.q.onnx"
    assert written.is_file()
    assert model.SerializeToString() == written.read_bytes()
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    props = [(prop.key, prop.value) for prop in model.metadata_props]
    assert props == [("names", "{0: 'face'}"), ("stride", "32"), ("xquant_version", xquant.__version__),
                     ("xquant_platform", "spacemit")]


# --------------------------------------------------------------------------- failures and exit codes
def test_no_config_prints_usage(run_xquant, tmp_path):
    result = run_xquant(cwd=tmp_path)
    assert_clean_failure(result)
    assert result.stderr.startswith("usage: xquant")
    assert "-c/--config is required" in result.stderr


def test_unknown_option_is_a_usage_error(run_xquant, tmp_path):
    result = run_xquant("--frobnicate", cwd=tmp_path)
    assert_clean_failure(result)
    assert "usage: xquant" in result.stderr


def test_missing_config_file(run_xquant, tmp_path):
    result = run_xquant("-c", "nope.json", cwd=tmp_path)
    assert_clean_failure(result)
    assert "config file not found: nope.json" in result.stderr


@pytest.mark.slow
def test_missing_model_file_names_the_path(small_project, run_xquant):
    (small_project / "small.onnx").unlink()
    result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert_clean_failure(result)
    assert f"onnx_model {small_project / 'small.onnx'} does not exist" in result.stderr
    result = run_xquant("-c", "cfg.json", "-i", "elsewhere/m.onnx", cwd=small_project)
    assert_clean_failure(result)
    assert "elsewhere/m.onnx does not exist" in result.stderr


def test_model_that_is_not_onnx(small_project, run_xquant):
    (small_project / "small.onnx").write_text("not a model")
    result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert_clean_failure(result)
    assert f"onnx_model {small_project / 'small.onnx'} is not a readable ONNX model" in result.stderr


def test_input_count_mismatch(small_project, run_xquant):
    onnx.save(two_input_model(), str(small_project / "two.onnx"))
    result = run_xquant("-c", "cfg.json", "-i", "two.onnx", cwd=small_project)
    assert_clean_failure(result)
    assert "Calibration input_parametres size should equal to model inputs size." in result.stderr
    assert "left, right" in result.stderr
    assert "1 entry" in result.stderr


def test_empty_list_file(small_project, run_xquant):
    (small_project / "data" / "list.txt").write_text("\n\n")
    result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert_clean_failure(result)
    assert "Calibration input input finds 0 items." in result.stderr
    assert str(small_project / "data" / "list.txt") in result.stderr
    assert not (small_project / "out").exists()


@pytest.mark.parametrize("how", ["-o", "output_prefix"])
def test_output_that_would_overwrite_the_input_model(small_project, run_xquant, how):
    before = (small_project / "small.onnx").read_bytes()
    if how == "-o":
        result = run_xquant("-c", "cfg.json", "-o", "small.onnx", cwd=small_project)
    else:
        config = load_config_dict(small_project)
        config["model_parameters"].update(output_prefix="small", working_dir=".")
        save_config_dict(small_project, config)
        result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert_clean_failure(result)
    assert "is the input model" in result.stderr
    assert (small_project / "small.onnx").read_bytes() == before


def test_config_error_exit_code(small_project, run_xquant):
    config = load_config_dict(small_project)
    config["calibration_parameters"]["calibration_type"] = "foo"
    save_config_dict(small_project, config)
    result = run_xquant("-c", "cfg.json", cwd=small_project)
    assert_clean_failure(result)
    assert "calibration_type foo not implemented yet." in result.stderr


def test_verbose_shows_the_traceback(small_project, run_xquant):
    (small_project / "small.onnx").unlink()
    result = run_xquant("-c", "cfg.json", "-v", cwd=small_project)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ModelError" in result.stderr


# --------------------------------------------------------------------------- other commands
def test_version(run_xquant, tmp_path):
    for module in (False, True):
        result = run_xquant("--version", cwd=tmp_path, module=module)
        assert result.returncode == 0
        assert result.stdout.strip() == f"xquant {xquant_core.__version__}"


def test_help(run_xquant, tmp_path):
    result = run_xquant("--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("-c CONFIG", "plugins", "exit codes", "XQUANT_NUM_THREADS", "XQUANT_CACHE_DIR",
                 "XQUANT_DISABLE_PLUGIN_AUTOLOAD"):
        assert text in result.stdout


def parse_plugins(stdout: str) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """``xquant plugins`` output -> {plugin: (origin line, {kind: [names]})}."""
    plugins, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith(" "):
            name, origin = line.split("  ", 1)
            current = plugins[name] = (origin, {})
        else:
            kind, names = line.strip().split(": ", 1)
            current[1][kind] = names.split(", ")
    return plugins


def test_plugins_lists_the_builtins(run_xquant, tmp_path):
    result = run_xquant("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = parse_plugins(result.stdout)
    assert list(plugins) == sorted(BUILTIN_PLUGINS)  # built-ins load in name order
    for name, (kind, names) in BUILTIN_PLUGINS.items():
        origin, provided = plugins[name]
        assert origin == f"(xquant-onnx {xquant_core.__version__}, built-in)"
        assert provided == {kind: names}


@pytest.fixture
def third_party_site(tmp_path) -> Path:
    """A folder with an installed (dist-info) third-party plugin and a broken one, for PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "xq_extra_plugin.py").write_text(textwrap.dedent("""
        from xquant_core import hookimpl

        class HalfRange:
            def compute_range(self, stats, ctx):
                return stats.min / 2, stats.max / 2

        @hookimpl
        def xquant_register_calibration_algorithms(register):
            register("half", HalfRange())
    """))
    dist = site / "xq_extra-2.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xq-extra\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text("[xquant]\nhalf = xq_extra_plugin\n")
    return site


def add_broken_plugin(site: Path) -> None:
    (site / "xq_broken_plugin.py").write_text("import a_module_that_does_not_exist\n")
    dist = site / "xq_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xq-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[xquant]\nbroken = xq_broken_plugin\n")


@pytest.mark.slow
def test_third_party_plugin_is_listed_and_usable_in_config(third_party_site, run_xquant, tmp_path):
    env = {"PYTHONPATH": str(third_party_site)}
    result = run_xquant("plugins", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    plugins = parse_plugins(result.stdout)
    assert list(plugins) == sorted(BUILTIN_PLUGINS) + ["xq-extra:half"]  # built-ins first
    assert plugins["xq-extra:half"] == ("(xq-extra 2.5, third-party)", {"calibration": ["half"]})

    config = {"model_parameters": {"onnx_model": "m.onnx"},
              "calibration_parameters": {"calibration_type": "half",
                                         "input_parametres": [{"data_list_path": "l.txt"}]}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    result = run_xquant("-c", "cfg.json", cwd=tmp_path, env=env)
    # the config is valid with the plugin installed: it gets as far as the (missing) model
    assert_clean_failure(result)
    assert "onnx_model" in result.stderr and "does not exist" in result.stderr
    result = run_xquant("-c", "cfg.json", cwd=tmp_path, env={**env, "XQUANT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert_clean_failure(result)
    assert "calibration_type half not implemented yet." in result.stderr


def test_disable_autoload_still_loads_builtins(third_party_site, run_xquant, tmp_path):
    add_broken_plugin(third_party_site)
    env = {"PYTHONPATH": str(third_party_site), "XQUANT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = run_xquant("plugins", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    plugins = parse_plugins(result.stdout)
    assert list(plugins) == sorted(BUILTIN_PLUGINS)
    for name, (kind, names) in BUILTIN_PLUGINS.items():
        assert plugins[name][1] == {kind: names}


def test_broken_third_party_plugin_is_named(third_party_site, run_xquant, tmp_path):
    add_broken_plugin(third_party_site)
    result = run_xquant("plugins", cwd=tmp_path, env={"PYTHONPATH": str(third_party_site)})
    assert_clean_failure(result)
    assert "xq-broken 0.1" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    assert "XQUANT_DISABLE_PLUGIN_AUTOLOAD=1" in result.stderr


def test_the_run_keeps_its_libraries_out_of_garbage_collection(tmp_path):
    """``libraries_loaded`` (every run, after its inputs are checked): onnxruntime, onnxsim, torch
    and PPQ imported with the collector paused and frozen (issue 16: collections walking them
    took 0.4 s of O-net's 3.4 s). In a caller's process all is unfrozen when the run ends and a
    caller's own frozen objects are left as they are. The command line's stay frozen, unless
    onnxsim was loaded before (nanobind would report its frozen objects leaked at exit)."""
    code = (
        "import gc, sys\n"
        "from xquant_core.runtime import libraries_loaded\n"
        "with libraries_loaded():\n"
        "    inside = gc.get_freeze_count()\n"
        "print(inside, gc.get_freeze_count(), gc.isenabled(), 'torch' in sys.modules, 'onnxsim' in sys.modules)\n"
        "gc.freeze()\n"
        "mine = gc.get_freeze_count()\n"
        "with libraries_loaded():\n"
        "    pass\n"
        "kept = gc.get_freeze_count() == mine\n"
        "gc.unfreeze()\n"
        "with libraries_loaded(own_process=True):\n"
        "    pass\n"
        "print(kept, gc.get_freeze_count() == 0, gc.isenabled())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    first, second = done.stdout.splitlines()
    inside, after, enabled, torch_loaded, onnxsim_loaded = first.split()
    assert int(inside) > 100_000 and after == "0", done.stderr
    fresh = subprocess.run(
        [sys.executable, "-c", "import gc\nfrom xquant_core.runtime import libraries_loaded\n"
         "with libraries_loaded(own_process=True):\n    pass\nprint(gc.get_freeze_count())\n"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert int(fresh.stdout) > 100_000 and "leaked" not in fresh.stderr, fresh.stderr
    assert (enabled, torch_loaded, onnxsim_loaded) == ("True", "True", "True") and second == "True True True", done.stderr


@pytest.mark.slow
def test_a_rerun_on_the_same_model_reads_onnxsim_s_result_from_the_cache(small_project, tmp_path_factory):
    """onnxsim's result is kept between runs (``XQUANT_CACHE_DIR``): the second run on the same
    model neither imports nor runs onnxsim and writes the same bytes; a damaged entry is rewritten;
    ``XQUANT_CACHE_DIR=`` (empty) keeps nothing, in the cache or the home folder."""
    from xquant_core.model import OnnxsimCache

    cache, home = tmp_path_factory.mktemp("rerun_cache"), tmp_path_factory.mktemp("rerun_home")
    code = (
        "import sys, xquant\n"
        "model = xquant.quantize_onnx_model('cfg.json')\n"
        "print('onnxsim' in sys.modules)\n"
    )

    def run(folder: str) -> tuple[str, bytes]:
        env = {**os.environ, "XQUANT_CACHE_DIR": folder, "HOME": str(home), "XDG_CACHE_HOME": ""}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=small_project, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip(), (small_project / "out" / "small.q.onnx").read_bytes()

    loaded, first = run(str(cache))
    entries = list((cache / "onnxsim").iterdir())
    assert loaded == "True" and len(entries) == 1 and entries[0].suffix == ".onnxsim"
    assert run(str(cache)) == ("False", first)
    entries[0].write_bytes(entries[0].read_bytes()[:-100])  # cut short, as by a crash
    assert run(str(cache)) == ("True", first)
    assert OnnxsimCache(entries[0]).load() is not None  # rewritten whole
    assert run("") == ("True", first)
    assert list((cache / "onnxsim").iterdir()) == entries and list(home.iterdir()) == []


def test_an_onnxsim_cache_that_cannot_be_written_or_read_only_costs_the_time(tmp_path, monkeypatch):
    from xquant_core.model import OnnxsimCache
    from xquant_test_models import small_cnn

    model = small_cnn()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XQUANT_CACHE_DIR", str(blocker))  # its onnxsim/ cannot be made
    cache = OnnxsimCache.for_model(model)
    cache.store(model)  # no exception
    assert not cache.hit and cache.load() is None and blocker.read_text() == "not a folder"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XQUANT_CACHE_DIR", "cache")  # relative: taken from the folder of the run
    cache = OnnxsimCache.for_model(model)
    assert cache.path.parent == tmp_path / "cache" / "onnxsim"
    cache.store(model)
    assert cache.load().SerializeToString() == model.SerializeToString()
    assert cache.path.stat().st_mode & 0o777 == 0o644
    other = OnnxsimCache.for_model(small_cnn(seed=1))
    assert other.path != cache.path and other.path.parent == cache.path.parent and not other.hit
    monkeypatch.setenv("ONNXSIM_FIXED_POINT_ITERS", "100")  # onnxsim's own setting: another entry
    assert OnnxsimCache.for_model(model).path != cache.path

    data = cache.path.read_bytes()
    cache.path.write_bytes(data[:-33] + bytes([data[-33] ^ 1]) + data[-32:])  # one bit of the model
    assert cache.load() is None and not cache.hit  # a damaged entry is a miss, and removed

    monkeypatch.setenv("XQUANT_CACHE_DIR", "")
    assert OnnxsimCache.for_model(model) is None
    monkeypatch.delenv("XQUANT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert OnnxsimCache.folder() == tmp_path / "home" / ".cache" / "xquant" / "onnxsim"


def test_onnxsim_is_imported_without_sympy(tmp_path):
    """onnxsim 0.8 imports sympy only for its command line's model summary (0.26 s and 32 MiB
    of every first run, issue 16): xquant imports it with sympy kept out, and sympy imports
    normally afterwards; where sympy was loaded before, onnxsim gets it; an onnxsim that cannot do
    without sympy is imported again, normally."""
    pytest.importorskip("onnxsim.model_info")
    code = (
        "import sys\n"
        "from xquant_core.runtime import import_onnxsim\n"
        "onnxsim = import_onnxsim()\n"
        "import onnxsim.model_info as info\n"
        "print('sympy' in sys.modules, info.sympy is None, callable(onnxsim.simplify))\n"
        "import sympy\n"
        "print(sympy.Symbol('n') + 1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines() == ["False True True", "n + 1"], done.stderr
    before = subprocess.run(
        [sys.executable, "-c", "import sympy\nfrom xquant_core.runtime import import_onnxsim\n"
         "import onnxsim.model_info as info\nimport_onnxsim()\nprint(info.sympy is sympy)\n"],
        capture_output=True, text=True, timeout=300,
    )
    assert before.stdout.strip() == "True", before.stderr
    needy = tmp_path / "needs_sympy"
    (needy / "onnxsim").mkdir(parents=True)
    (needy / "onnxsim" / "__init__.py").write_text("import sympy\nsimplify = sympy.Symbol\n")
    again = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom xquant_core.runtime import import_onnxsim\n"
         "m = import_onnxsim()\nprint(m.__file__.endswith('needs_sympy/onnxsim/__init__.py'), 'sympy' in sys.modules,"
         " sys.modules.get('sympy') is not None)\n"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(needy), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )
    assert again.stdout.strip() == "True True True", again.stderr
