"""Config loading: JSON file or dict -> schema check -> defaults -> frozen objects.

The JSON Schema in ``schemas/xquant_config.schema.json`` is the single source of truth
for fields and defaults. Every problem is reported at once, each located by its JSON
path (``cfg.json::$.calibration_parameters.calibration_type``). After loading, the
pipeline only sees the frozen dataclasses below, never raw dicts.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCHEMA_FILE = "xquant_config.schema.json"
VENDOR_INPUTS_KEY = "input_parametres"
INPUTS_KEYS = (VENDOR_INPUTS_KEY, "input_parameters")
PREPROCESS_NONE = "none"
TOO_DEEP = "the config nests arrays or objects too deeply to be read: it is not an xquant config"


# --------------------------------------------------------------------------- schema
@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The config schema: from the installed wheel, else from the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas" / SCHEMA_FILE, here.parent / "schemas" / SCHEMA_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"xquant's config schema {SCHEMA_FILE} is missing from the installation")


# --------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class InputConfig:
    """One model input's calibration settings (``input_parametres[i]``)."""

    index: int
    data_list_path: Path
    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    file_type: str = "img"
    color_format: str = "bgr"
    mean_value: tuple[float, ...] | None = None
    std_value: tuple[float, ...] | None = None
    preprocess_file: str = PREPROCESS_NONE


@dataclass(frozen=True)
class ModelConfig:
    onnx_model: Path | None
    output_prefix: str | None
    working_dir: Path | None
    skip_onnxsim: bool = False


@dataclass(frozen=True)
class CalibrationConfig:
    calibration_step: int
    calibration_device: str | None
    calibration_type: str
    inputs: tuple[InputConfig, ...]


@dataclass(frozen=True)
class CustomSetting:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    precision_level: int | None = None
    max_percentile: float | None = None
    calibration_type: str | None = None
    float_after_calibration: bool = False


@dataclass(frozen=True)
class QuantizationConfig:
    analysis_enable: bool
    precision_level: int
    finetune_level: int
    max_percentile: float
    platform: str
    custom_setting: tuple[CustomSetting, ...] = ()
    truncate_var_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class AutoPrecisionConfig:
    """``auto_precision``: keep the fewest ops in float that meet ``target_value``."""

    metric: str
    target_value: float
    max_float_ops: int


@dataclass(frozen=True)
class XQuantConfig:
    model: ModelConfig
    calibration: CalibrationConfig
    quantization: QuantizationConfig
    source: str
    base_dir: Path
    auto_precision: AutoPrecisionConfig | None = None


# --------------------------------------------------------------------------- loading
def load_config(config: str | os.PathLike | Mapping[str, Any], *, check_plugins: bool = True) -> XQuantConfig:
    """Load and validate a config from a JSON file path or a dict.

    Relative paths resolve against the config file's folder (the current folder for a
    dict). Raises :class:`ConfigError` listing every problem found.
    """
    if isinstance(config, Mapping):
        raw, source, base_dir = copy.deepcopy(dict(config)), "config", Path.cwd()
    elif not isinstance(config, (str, os.PathLike)):  # a list, None...: validate() says what is wrong
        raw, source, base_dir = copy.deepcopy(config), "config", Path.cwd()
    else:
        path = Path(config)
        source = str(config)
        if path.is_dir():
            raise ConfigError([f"{path} is a folder: give the path of the JSON config file"], source=source)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"], source=source)
        try:
            text = path.read_text(encoding="utf-8-sig")  # editors on Windows may write a BOM
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"cannot read the config file: {exc}"], source=source) from None
        if not text.strip():
            raise ConfigError(
                [
                    "the config file is empty: it must hold a JSON object with model_parameters, "
                    "calibration_parameters and quantization_parameters"
                ],
                source=source,
            )
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                [f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{_json_hint(text, exc.pos)}"],
                source=source,
            ) from None
        except RecursionError:
            raise ConfigError([TOO_DEEP], source=source) from None
        base_dir = path.resolve().parent

    try:
        problems = validate(raw, check_plugins=check_plugins)
    except RecursionError:
        problems = [TOO_DEEP]
    if problems:
        raise ConfigError([f"{source}::{problem}" for problem in problems], source=source)
    return _build(raw, source, base_dir)


def _json_hint(text: str, pos: int) -> str:
    """What most likely went wrong at ``pos``: the two mistakes people make in JSON configs."""
    rest = text[pos:].lstrip()
    if rest.startswith(("//", "/*", "#")):
        return " (JSON does not allow comments: remove them)"
    before = text[:pos].rstrip()
    if before.endswith(",") and rest[:1] in ("}", "]"):
        return " (JSON does not allow a comma before '}' or ']': remove it)"
    if rest.startswith("'"):
        return " (JSON strings and keys need double quotes)"
    return ""


def validate(raw: Any, *, check_plugins: bool = True) -> list[str]:
    """All problems of a raw config, each ``$.json.path: message``; empty when valid."""
    from jsonschema import Draft202012Validator

    schema = load_schema()
    validator = Draft202012Validator(schema)
    problems: list[tuple[str, str]] = []
    errors = list(validator.iter_errors(raw))
    # a value of the wrong type also fails its enum/bounds: report the type only
    wrong_type = {tuple(error.absolute_path) for error in errors if error.validator == "type"}
    for error in errors:
        if error.validator != "type" and tuple(error.absolute_path) in wrong_type:
            continue
        problems.extend(_describe(error, schema))
    if isinstance(raw, dict):
        # checks the schema cannot express, next to the schema problems: one run shows them all
        problems.extend(_semantic_problems(raw, check_plugins))
    seen, ordered = set(), []
    for path, message in sorted(problems, key=lambda item: item[0]):
        if (path, message) not in seen:
            seen.add((path, message))
            ordered.append(f"{path}: {message}")
    return ordered


def _describe(error, schema: dict) -> list[tuple[str, str]]:
    from jsonschema.exceptions import best_match

    path = error.json_path
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [key for key in error.instance if key not in error.schema.get("properties", {})]
        out = []
        for key in extra:
            if not isinstance(key, str):  # a dict from Python code: JSON keys are always strings
                out.append((f"{path}[{key!r}]", f"key {key!r} is not a string: config keys are strings, as in JSON"))
                continue
            hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            out.append(
                (
                    f"{path}.{key}",
                    f"unknown key '{key}'.{did_you_mean} Allowed keys: {', '.join(allowed)}",
                )
            )
        return out
    if error.validator == "not" and error.schema.get("not", {}).get("required") == list(INPUTS_KEYS):
        return [(path, "give either 'input_parametres' or 'input_parameters', not both")]
    if error.validator in ("anyOf", "oneOf") and error.context:
        return _describe(best_match(error.context), schema)
    if error.validator == "type" and path == "$":
        return [
            (
                path,
                "the config must be a JSON object with model_parameters, calibration_parameters and "
                f"quantization_parameters, not {_short(error.instance)}",
            )
        ]
    if error.validator == "type":
        expected = error.validator_value
        expected = ", ".join(repr(t) for t in expected) if isinstance(expected, list) else repr(expected)
        return [(path, f"{_short(error.instance)} is not of type {expected}")]
    if error.validator == "pattern" and path.endswith(".output_prefix"):
        return [
            (
                path,
                f"{error.instance!r} is not a file name: output_prefix must not contain '/' or '\\'; "
                "put the folder in working_dir",
            )
        ]
    if error.validator == "minItems" and path.endswith(INPUTS_KEYS) and not error.instance:
        return [(path, "must not be empty: give one entry per model input, each with at least data_list_path")]
    return [(path, error.message)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if len(text) <= limit:
        return text
    kinds: dict[type, str] = {dict: "an object", list: "an array"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{kind} ({text[: limit - 5]}...)"


def _inputs_key(calib: Any) -> str:
    return (
        next((key for key in INPUTS_KEYS if key in calib), VENDOR_INPUTS_KEY)
        if isinstance(calib, dict)
        else VENDOR_INPUTS_KEY
    )


def _section(raw: dict, name: str) -> dict:
    """``raw[name]`` when it is an object, else an empty one (the schema reports the wrong type)."""
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _semantic_problems(raw: dict, check_plugins: bool) -> list[tuple[str, str]]:
    problems = []
    calib = raw.get("calibration_parameters")
    if calib is None or (isinstance(calib, dict) and not any(key in calib for key in INPUTS_KEYS)):
        problems.append(
            (
                "$.calibration_parameters",
                f"'{VENDOR_INPUTS_KEY}' is required: one entry per model input, each with at least data_list_path",
            )
        )
    quant = raw.get("quantization_parameters")
    settings = quant.get("custom_setting") if isinstance(quant, dict) else None
    for index, item in enumerate(settings if isinstance(settings, list) else []):
        if isinstance(item, dict) and (not item.get("input_names") or not item.get("output_names")):
            problems.append(
                (f"$.quantization_parameters.custom_setting[{index}]", "input_names and output_names should be set.")
            )
    for index, item in enumerate(_inputs(raw)):
        mean, std = item.get("mean_value"), item.get("std_value")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) != len(std):
            problems.append(
                (
                    f"$.calibration_parameters.{_inputs_key(calib)}[{index}]",
                    f"mean_value has {len(mean)} values but std_value has {len(std)}",
                )
            )
        spec = item.get("preprocess_file")
        if isinstance(spec, str) and ":" in spec and not spec.rsplit(":", 1)[1].isidentifier():
            problems.append(
                (
                    f"$.calibration_parameters.{_inputs_key(calib)}[{index}].preprocess_file",
                    f"'{spec}' is not of the form 'path/to/file.py:function'",
                )
            )
        for position, value in enumerate(std if isinstance(std, list) else []):
            if isinstance(value, (int, float)) and 0 < value < FLOAT32_TINY:
                problems.append(
                    (
                        f"$.calibration_parameters.{_inputs_key(calib)}[{index}].std_value[{position}]",
                        f"{value} is too small to divide by in float32 (the std of 0-255 pixel values, "
                        "e.g. 58.4, is what goes here)",
                    )
                )
    for path, value in _unusable_values(raw, "$"):
        text = json.dumps(value)
        if isinstance(value, str):
            problems.append((path, f"{text[:40]} holds a NUL character: no file name or tensor name can (remove it)"))
            continue
        text = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
        problems.append(
            (
                path,
                f"{text} is not a finite number: give a number (JSON has no NaN or Infinity, "
                "and a number must fit a double)",
            )
        )
    if check_plugins:
        problems.extend(_plugin_problems(raw))
    return problems


#: the smallest normal float32: a std below it divides pixel values into Inf
FLOAT32_TINY = 1.1754944e-38
#: the largest double: a JSON integer beyond it cannot become a float
FLOAT_MAX = 1.7976931348623157e308


def _unusable_values(value: Any, path: str):
    """(JSON path, value) of every NaN/Infinity in the raw config (Python's json reads those literals),
    of every integer too large for a double, and of every string with a NUL character (no path or
    name can hold one: the operating system refuses it)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > FLOAT_MAX:
        yield path, value
    elif isinstance(value, str) and "\x00" in value:
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unusable_values(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unusable_values(item, f"{path}[{index}]")


def _inputs(raw: dict) -> list[dict]:
    calib = raw.get("calibration_parameters")
    if not isinstance(calib, dict):
        return []
    items = calib.get(_inputs_key(calib))
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _plugin_problems(raw: dict) -> list[tuple[str, str]]:
    """Names that must resolve to an installed plugin."""
    from .plugins import registry

    checks: list[tuple[str, str, Any]] = []
    calib, quant = _section(raw, "calibration_parameters"), _section(raw, "quantization_parameters")
    checks.append(("calibration", "$.calibration_parameters.calibration_type", calib.get("calibration_type")))
    checks.append(("platform", "$.quantization_parameters.platform", quant.get("platform")))
    target = _section(_section(raw, "auto_precision"), "target")
    checks.append(("metric", "$.auto_precision.target.metric", target.get("metric")))
    settings = quant.get("custom_setting")
    for index, item in enumerate(settings if isinstance(settings, list) else []):
        if isinstance(item, dict):
            checks.append(
                (
                    "calibration",
                    f"$.quantization_parameters.custom_setting[{index}].calibration_type",
                    item.get("calibration_type"),
                )
            )
    key = _inputs_key(calib)
    for index, item in enumerate(_inputs(raw)):
        prefix = f"$.calibration_parameters.{key}[{index}]"
        checks.append(("reader", f"{prefix}.file_type", item.get("file_type")))
        spec = item.get("preprocess_file")
        if isinstance(spec, str) and ":" not in spec and spec.lower() != PREPROCESS_NONE:
            checks.append(("preprocessor", f"{prefix}.preprocess_file", spec))
    problems = []
    for kind, path, name in checks:
        if isinstance(name, str) and name and name not in registry(kind):
            problems.append((path, registry(kind).unknown_message(name)))
    return problems


# --------------------------------------------------------------------------- building
def _defaults(section: str) -> dict:
    props = load_schema()["properties"][section]["properties"]
    return {key: value["default"] for key, value in props.items() if "default" in value}


def _input_defaults() -> dict:
    props = load_schema()["$defs"]["input_parameter"]["properties"]
    return {key: value["default"] for key, value in props.items() if "default" in value}


def _resolve(base_dir: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path)


def _resolve_preprocess(base_dir: Path, spec: str | None) -> str:
    if spec is None or spec.lower() == PREPROCESS_NONE:
        return PREPROCESS_NONE
    if ":" in spec:
        file_part, func = spec.rsplit(":", 1)
        return f"{_resolve(base_dir, file_part)}:{func}"
    return spec


def _int(value: Any) -> Any:
    """JSON Schema's "integer" accepts 12.0: hand the pipeline a real int (it slices and reshapes)."""
    return int(value) if isinstance(value, float) else value


def _build(raw: dict, source: str, base_dir: Path) -> XQuantConfig:
    model = {**_defaults("model_parameters"), **raw.get("model_parameters", {})}
    calib = {**_defaults("calibration_parameters"), **raw.get("calibration_parameters", {})}
    quant = {**_defaults("quantization_parameters"), **raw.get("quantization_parameters", {})}

    inputs = []
    for index, item in enumerate(calib[_inputs_key(calib)]):
        item = {**_input_defaults(), **item}
        inputs.append(
            InputConfig(
                index=index,
                data_list_path=_resolve(base_dir, item["data_list_path"]),
                input_name=item.get("input_name"),
                input_shape=tuple(_int(dim) for dim in item["input_shape"]) if item.get("input_shape") else None,
                dtype=item.get("dtype"),
                file_type=item["file_type"],
                color_format=item["color_format"],
                mean_value=tuple(float(v) for v in item["mean_value"]) if item.get("mean_value") else None,
                std_value=tuple(float(v) for v in item["std_value"]) if item.get("std_value") else None,
                preprocess_file=_resolve_preprocess(base_dir, item.get("preprocess_file")),
            )
        )

    return XQuantConfig(
        model=ModelConfig(
            onnx_model=_resolve(base_dir, model["onnx_model"]) if model.get("onnx_model") is not None else None,
            output_prefix=model.get("output_prefix"),
            working_dir=_resolve(base_dir, model["working_dir"]) if model.get("working_dir") is not None else None,
            skip_onnxsim=model["skip_onnxsim"],
        ),
        calibration=CalibrationConfig(
            calibration_step=_int(calib["calibration_step"]),
            calibration_device=calib.get("calibration_device"),
            calibration_type=calib["calibration_type"],
            inputs=tuple(inputs),
        ),
        quantization=QuantizationConfig(
            analysis_enable=quant["analysis_enable"],
            precision_level=_int(quant["precision_level"]),
            finetune_level=_int(quant["finetune_level"]),
            max_percentile=float(quant["max_percentile"]),
            platform=quant["platform"],
            custom_setting=tuple(
                CustomSetting(
                    input_names=tuple(item.get("input_names", ())),
                    output_names=tuple(item.get("output_names", ())),
                    precision_level=_int(item.get("precision_level")),
                    max_percentile=item.get("max_percentile"),
                    calibration_type=item.get("calibration_type"),
                    float_after_calibration=item.get("float_after_calibration", False),
                )
                for item in quant["custom_setting"]
            ),
            truncate_var_names=tuple(quant["truncate_var_names"]),
        ),
        source=source,
        base_dir=base_dir,
        auto_precision=_auto_precision(raw.get("auto_precision")),
    )


def _auto_precision(raw: dict | None) -> AutoPrecisionConfig | None:
    if raw is None:
        return None
    raw = {**_defaults("auto_precision"), **raw}
    return AutoPrecisionConfig(
        metric=raw["target"]["metric"],
        target_value=float(raw["target"]["value"]),
        max_float_ops=_int(raw["max_float_ops"]),
    )
