"""``xquant compare FLOAT.onnx INT8.onnx (-c cfg.json | --data LIST ...)``: INT8 against FP32 on your data.

Both models run in onnxruntime on every listed sample (the config's readers and
preprocessing, or npy files); per output: SNR (``sum((q-f)^2)/sum(f^2)``, lower is better),
mean cosine per sample, max absolute difference, and top-1 agreement for outputs that look
like class scores ([N, C] with C >= 2).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xquant_core import model as model_io
from xquant_core.config import load_config
from xquant_core.data import CalibrationDataset, read_list, resolve_preprocessor
from xquant_core.errors import ConfigError, ModelError
from xquant_core.plugins import registry
from xquant_core.runtime import onnxruntime_session
from xquant_core.snr import snr


@dataclass(frozen=True)
class OutputComparison:
    name: str
    snr: float
    cosine: float
    max_abs: float
    top1_agreement: float | None


def comparison_config(float_model: str, config: str | None, data: Sequence[str]) -> dict:
    """The raw config that feeds the comparison: ``config`` with its lists replaced by ``data``
    (one list per model input, in order), or npy lists alone; every listed sample is used."""
    if config is None and not data:
        raise ConfigError(
            ["give -c cfg.json (its inputs and preprocessing) or --data LIST (npy files)"], source="compare"
        )
    if config is not None:
        path = Path(config)
        try:
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"cannot read the config: {exc}"], source=str(path)) from None
        entries = raw.get("calibration_parameters", {}).get("input_parametres") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            load_config(path)  # says what is wrong with it
            raise ConfigError(["calibration_parameters.input_parametres is missing"], source=str(path))
        raw = copy.deepcopy(raw)
        base = path.resolve().parent
        for entry in raw["calibration_parameters"]["input_parametres"]:  # paths relative to the config
            if isinstance(entry.get("data_list_path"), str):
                entry["data_list_path"] = str(base / entry["data_list_path"])
            spec = entry.get("preprocess_file")
            if isinstance(spec, str) and ":" in spec:
                file_part, func = spec.rsplit(":", 1)
                entry["preprocess_file"] = f"{base / file_part}:{func}"
    else:
        raw = {"calibration_parameters": {"input_parametres": [{"file_type": "npy"} for _ in data]}}
    entries = raw["calibration_parameters"]["input_parametres"]
    if data:
        if len(data) != len(entries):
            raise ConfigError(
                [
                    f"--data is given {len(data)} time(s) but the config has {len(entries)} input(s): "
                    "one list per input, in the config's order"
                ],
                source="compare",
            )
        for entry, listed in zip(entries, data):
            entry["data_list_path"] = str(Path(listed).resolve())
    raw.setdefault("model_parameters", {})["onnx_model"] = str(Path(float_model).resolve())
    raw["model_parameters"].pop("working_dir", None)
    return raw


def compare(float_path: str, int8_path: str, raw_config: dict) -> tuple[list[OutputComparison], int]:
    """Per-output figures of the INT8 model against the float one, and the number of samples."""
    cfg = load_config(raw_config)
    float_model = model_io.load_model(float_path)
    int8_model = _load(int8_path)
    specs = model_io.resolve_inputs(float_model, cfg.calibration.inputs, "input_parametres")
    count = max(len(read_list(spec.config, spec.name)) for spec in specs)
    readers = {spec.name: registry("reader").get(spec.config.file_type) for spec in specs}
    preprocessors = {spec.name: resolve_preprocessor(spec.config, registry("preprocessor")) for spec in specs}
    dataset = CalibrationDataset(specs, readers, preprocessors, count)
    sessions = [onnxruntime_session(float_model), onnxruntime_session(int8_model)]
    names = [value.name for value in float_model.graph.output]
    if [value.name for value in int8_model.graph.output] != names:
        raise ModelError(
            f"{int8_path} has outputs {[v.name for v in int8_model.graph.output]}, "
            f"{float_path} has {names}: are they the same model?"
        )
    pairs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in names]
    for feed in dataset:
        fp32, int8 = (session.run(names, {spec.name: feed[spec.name] for spec in specs}) for session in sessions)
        for index, (f, q) in enumerate(zip(fp32, int8)):
            pairs[index].append((np.asarray(f, np.float64), np.asarray(q, np.float64)))
    return [_figures(name, values) for name, values in zip(names, pairs)], dataset.count


def _load(path: str):
    import onnx

    if not Path(path).is_file():
        raise ModelError(f"{path} " + ("is a folder: give the .onnx file" if Path(path).is_dir() else "does not exist"))
    try:
        return onnx.load(path)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


def _figures(name: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> OutputComparison:
    cosines = [float((f.ravel() @ q.ravel()) / (np.linalg.norm(f) * np.linalg.norm(q) + 1e-30)) for f, q in pairs]
    max_abs = max(float(np.abs(q - f).max()) if f.size else 0.0 for f, q in pairs)
    scores = all(f.ndim == 2 and f.shape[1] >= 2 for f, _ in pairs)
    agreement = float(np.mean([np.array_equal(f.argmax(1), q.argmax(1)) for f, q in pairs])) if scores else None
    return OutputComparison(name, snr((q, f) for f, q in pairs), float(np.mean(cosines)), max_abs, agreement)


def render(figures: list[OutputComparison], samples: int) -> list[str]:
    lines = []
    for item in figures:
        top1 = f", top-1 agreement {100 * item.top1_agreement:.1f} %" if item.top1_agreement is not None else ""
        lines.append(
            f"output {item.name}: SNR {item.snr:.5g} (lower is better), cosine {item.cosine:.5f}, "
            f"max |diff| {item.max_abs:.5g}{top1}"
        )
    lines.append(f"{samples} sample(s)")
    return lines
