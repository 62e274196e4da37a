"""Property-based tests: whatever config a user writes, xquant answers with a result or its own error.

Configs are generated from the shipped JSON Schema (every real section and key, values that
are valid, nearly valid or junk: wrong types, nested lists and objects, huge and non-finite
numbers, unicode, None) plus unknown keys and non-object documents. Each one goes through

- the config loader (``validate`` and ``load_config``, with the plugin-name check), in process;
- the command line's validation path (``cli.main -c cfg.json``) with no model file anywhere
  near, so nothing is ever quantized: a valid config stops at the missing model;
- the file reader, with JSON text cut short or garbled and random bytes.

The outcome must be success or an :class:`XQuantError`, never another exception, and the
CLI must exit 1 or 2 without a traceback, never 3 (internal error).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xquant_core import cli
from xquant_core.config import XQuantConfig, load_config, load_schema, validate
from xquant_core.errors import ConfigError, XQuantError

SETTINGS = settings(max_examples=1000, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

#: strings a user may plausibly write in any string field: plugin names, paths, near misses
PLAUSIBLE = ["default", "kl", "minmax", "mse", "percentile", "entropy", "img", "npy", "raw", "csv", "none", "None",
             "PT_IMAGENET", "IMAGENET", "TF_IMAGENET", "spacemit", "k3", "snr", "cosine", "cpu", "cuda", "gpu",
             "bgr", "rgb", "float32", "uint8", "model.onnx", "list.txt", "calib/list.txt", "out", ".", "..", "/",
             "prep.py:load", "prep.py:", ":load", "a:b:c", "x.q", "out/x.q", "input", "r1", "ünïcødé", "名前",
             "\x00", " ", "~", "~/model.onnx", "C:\\model.onnx"]

HUGE = [10 ** 20, -10 ** 20, 2 ** 63, 10 ** 400, float("inf"), float("-inf"), float("nan"), 1e308, -0.0]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(PLAUSIBLE))
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(PLAUSIBLE)),
                                                 inner, max_size=4)), max_leaves=12)


def _resolve(node: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        target = load_schema()
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        return target
    return node


def _near_valid(node: dict) -> st.SearchStrategy:
    """Values of the schema node's own type, in and around its bounds."""
    node = _resolve(node)
    if "enum" in node:
        return st.one_of(st.sampled_from(node["enum"]), st.sampled_from(PLAUSIBLE))
    types = node.get("type", "object")
    types = types if isinstance(types, list) else [types]
    options = []
    for kind in types:
        if kind == "object":
            props = node.get("properties", {})
            optional = {key: _value(child) for key, child in props.items()}
            known = st.fixed_dictionaries({}, optional=optional)
            extra = st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(sorted(props) or ["x"])
                                              .map(lambda key: key + "s")), junk, max_size=2)
            options.append(st.one_of(known, st.builds(lambda a, b: {**b, **a}, known, extra)))
        elif kind == "array":
            options.append(st.lists(_value(node.get("items", {})), max_size=5))
        elif kind == "integer":
            low, high = node.get("minimum"), node.get("maximum")
            options.append(st.one_of(
                st.integers(min_value=None if low is None else low - 2, max_value=None if high is None else high + 2),
                st.integers(min_value=0, max_value=12).map(float)))  # JSON Schema takes 12.0 as an integer
        elif kind == "number":
            options.append(st.one_of(st.floats(min_value=-2, max_value=2), st.integers(-3, 3),
                                     st.floats(allow_nan=True, allow_infinity=True)))
        elif kind == "string":
            options.append(st.one_of(st.sampled_from(PLAUSIBLE), st.text(max_size=16)))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
    return st.one_of(options) if options else junk


def _value(node: dict) -> st.SearchStrategy:
    """Mostly a near-valid value, sometimes junk."""
    near = _near_valid(node)
    return st.one_of(near, near, near, junk)


#: whole configs: schema-shaped objects (with unknown keys), or any JSON value at all
def _spots() -> list[tuple[str, str, dict]]:
    """(section, key, schema node) of every field; section "input" is ``input_parametres[0]``."""
    schema = load_schema()
    spots = [(section, key, node) for section, body in schema["properties"].items()
             for key, node in body.get("properties", {}).items()]
    spots += [("input", key, node) for key, node in schema["$defs"]["input_parameter"]["properties"].items()]
    return spots


SPOTS = _spots()
SPOT_VALUES = {(section, key): _value(node) for section, key, node in SPOTS}


@st.composite
def mutated_minimal(draw) -> dict:
    """The smallest valid config with up to three fields set to near-valid or junk values."""
    config = {"model_parameters": {"onnx_model": draw(st.sampled_from(["model.onnx", "models/m.onnx"]))},
              "calibration_parameters": {"input_parametres": [{"data_list_path": "list.txt"}]}}
    for _ in range(draw(st.integers(0, 3))):
        section, key, _ = draw(st.sampled_from(SPOTS))
        value = draw(SPOT_VALUES[(section, key)])
        if section == "input":
            items = config["calibration_parameters"].get("input_parametres")
            if isinstance(items, list) and items and isinstance(items[0], dict):
                items[0][key] = value
        else:
            target = config.setdefault(section, {})
            if isinstance(target, dict):
                target[key] = value
            else:
                config[section] = value
    return config


_schema_shaped = _near_valid(load_schema())
#: valid and nearly valid configs, schema-shaped ones with anything in them, and any JSON value
configs = st.one_of(mutated_minimal(), mutated_minimal(), _schema_shaped, junk)


def _integer_fields_are_ints(cfg: XQuantConfig) -> None:
    assert type(cfg.calibration.calibration_step) is int
    assert type(cfg.quantization.precision_level) is int and type(cfg.quantization.finetune_level) is int
    for item in cfg.calibration.inputs:
        assert item.input_shape is None or all(type(dim) is int for dim in item.input_shape)
    for setting in cfg.quantization.custom_setting:
        assert setting.precision_level is None or type(setting.precision_level) is int


def _same(a, b) -> bool:
    """Deep equality where NaN equals NaN (the loader must not mutate its argument)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


@pytest.mark.slow
@SETTINGS
@given(raw=configs)
def test_loader_returns_a_config_or_a_config_error(raw):
    snapshot = json.loads(json.dumps(raw))
    problems = validate(raw)
    assert isinstance(problems, list) and all(isinstance(p, str) and p.startswith("$") for p in problems)
    try:
        cfg = load_config(raw, check_plugins=True)
    except ConfigError as exc:
        assert problems, f"load_config refused a config validate() accepted: {exc}"
        if not isinstance(raw, str):  # a string is a config file's path
            assert str(exc).splitlines()[0].startswith("config: ")
    else:
        assert not problems
        _integer_fields_are_ints(cfg)
    validate(raw, check_plugins=False)
    assert _same(raw, snapshot), "the loader changed the caller's dict"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An empty folder for the config files: no model is ever found, so nothing is quantized."""
    return tmp_path_factory.mktemp("configs")


def _run_cli(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["-c", str(path)])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
@SETTINGS
@given(raw=configs)
def test_cli_validation_path_exits_1_or_2_without_traceback(raw, folder):
    path = folder / "cfg.json"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")
    code, out, err = _run_cli(path)
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("xquant: ") and out == ""
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json"], "a failed run wrote something"


def _garble(text: str, data: st.DataObject) -> str:
    how = data.draw(st.sampled_from(["cut", "insert", "replace"]))
    at = data.draw(st.integers(0, len(text)))
    if how == "cut":
        return text[:at]
    noise = data.draw(st.text(alphabet=st.sampled_from(list('{}[],:"\'\\/#\n 0123456789e-.truefalsnl\ufeff')),
                              min_size=1, max_size=6))
    return text[:at] + noise + text[at + (len(noise) if how == "replace" else 0):]


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@pytest.mark.slow
@given(raw=configs, data=st.data(), as_bytes=st.binary(max_size=64))
def test_garbled_files_are_config_errors(raw, data, as_bytes, folder):
    path = folder / "garbled.json"
    if data.draw(st.booleans()):
        text = _garble(json.dumps(raw, indent=data.draw(st.sampled_from([None, 2]))), data)
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(as_bytes)
    try:
        load_config(path)
    except XQuantError as exc:
        assert str(exc).startswith(f"{path}: ")
    finally:
        path.unlink()


def test_deeply_nested_json_is_a_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"model_parameters": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "nests arrays or objects too deeply" in str(info.value)


def test_integral_floats_become_ints():
    """JSON Schema accepts 12.0 where an integer is asked; the pipeline gets 12 (12.0 crashed slicing)."""
    cfg = load_config({
        "model_parameters": {"onnx_model": "m.onnx"},
        "calibration_parameters": {"calibration_step": 12.0,
                                   "input_parametres": [{"data_list_path": "l.txt",
                                                         "input_shape": [1.0, 3, 16.0, 16]}]},
        "quantization_parameters": {"precision_level": 2.0, "finetune_level": 0.0,
                                    "custom_setting": [{"input_names": ["a"], "output_names": ["b"],
                                                        "precision_level": 3.0}]},
    })
    _integer_fields_are_ints(cfg)
    assert cfg.calibration.calibration_step == 12 and cfg.calibration.inputs[0].input_shape == (1, 3, 16, 16)
    assert math.isclose(cfg.quantization.max_percentile, 0.9999)
