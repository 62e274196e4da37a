"""``xquant init MODEL.onnx [DATA_DIR] [-o cfg.json]``: a vendor-format config to start from.

Every input's name, shape and dtype come from the model (NCHW/NHWC guessed from where the
channels are, and said); with DATA_DIR, the file type comes from the files' extensions and two
lists are written beside the config: the calibration list, with every fifth file held back at
its end (``calibration_step`` stops before them, so calibration never sees them and the report
measures on them), and those held-back files alone for ``xquant compare``. What only the
user can know (mean/std, colour order) is printed with the common presets. Nothing existing is overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from xquant_core import model as model_io
from xquant_core.errors import ConfigError, DataError
from xquant_core.outputs import all_or_nothing, check_folder, output_file, write_bytes_atomically

EXTENSIONS = {
    ".jpg": "img",
    ".jpeg": "img",
    ".png": "img",
    ".bmp": "img",
    ".webp": "img",
    ".tif": "img",
    ".tiff": "img",
    ".npy": "npy",
    ".raw": "raw",
    ".bin": "raw",
}
HOLD_OUT_EVERY = 5
PRESETS = (
    'torchvision/timm ImageNet models: "color_format": "rgb", "mean_value": [123.675, 116.28, 103.53], '
    '"std_value": [58.395, 57.12, 57.375]',
    'models trained on [-1, 1] inputs (PaddleOCR, MobileNet TF): "mean_value": [127.5, 127.5, 127.5], '
    '"std_value": [127.5, 127.5, 127.5]',
    'models trained on [0, 1] inputs (YOLO): "mean_value": [0, 0, 0], "std_value": [255, 255, 255]',
)


def write_config(model_path: str, data_dir: str | None, config_path: str) -> list[str]:
    """Write the config (and lists), all of them or none; return the lines to print."""
    out = output_file(config_path, "-o")
    if out.exists():
        raise ConfigError([f"{out} exists: xquant init does not overwrite files; give another -o"], source="init")
    check_folder(out, "-o", beside=False)
    with all_or_nothing():
        return _write_config(model_path, data_dir, out)


def _write_config(model_path: str, data_dir: str | None, out: Path) -> list[str]:
    model = model_io.load_model(model_path)
    inputs = model_io.graph_inputs(model)
    entries, lines, todo = [], [], []
    lists = _lists(Path(data_dir), out, [value.name for value in inputs]) if data_dir else {}
    for value in inputs:
        shape = [dim if isinstance(dim, int) else None for dim in model_io._model_shape(value)]
        if shape and shape[0] is None:
            shape[0] = 1
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        layout = _layout(shape)
        entry = {"input_name": value.name, "input_shape": shape, "dtype": dtype}
        described = f"input {value.name} {shape} {dtype}" + (f", {layout}" if layout else "")
        if value.name in lists:
            kind, calib, held, used, held_count = lists[value.name]
            entry.update({"file_type": kind, "data_list_path": _ref(calib, out.parent)})
            described += (
                f": {kind} files, {used} for calibration then {held_count} held back in {calib} "
                f"(the report measures on those), the held-back ones alone in {held}"
            )
            if kind == "img":
                entry["color_format"] = "bgr"
                todo.append(
                    f"{value.name}: mean_value/std_value and color_format (now bgr, raw 0-255 values); "
                    "common presets:\n    " + "\n    ".join(PRESETS)
                )
        else:
            entry.update({"file_type": "npy", "data_list_path": f"{value.name}_list.txt"})
            todo.append(
                f"{value.name}: data_list_path (a list file, one sample per line; npy samples of shape "
                f"{shape} or without its leading 1)"
            )
        if any(dim is None for dim in shape):
            todo.append(f"{value.name}: input_shape has unknown dims {shape}: give them")
        entries.append(entry)
        lines.append(described)
    steps = max((lists[name][3] for name in lists), default=100)
    config = {
        "model_parameters": {"onnx_model": _ref(Path(model_path), out.parent), "working_dir": "output"},
        "calibration_parameters": {
            "calibration_step": steps,
            "calibration_device": "cpu",
            "calibration_type": "default",
            "input_parametres": entries,
        },
        "quantization_parameters": {"analysis_enable": True, "precision_level": 0, "finetune_level": 1},
    }
    write_bytes_atomically(out, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    lines.insert(0, f"wrote {out} for {model_path}")
    lines += [f"still to decide: {item}" for item in todo]
    lines.append(f"next: xquant check -c {out}, then xquant -c {out}")
    return lines


def _ref(target: Path, folder: Path) -> str:
    """``target`` relative to ``folder`` when it lies inside it, else absolute."""
    target, folder = target.resolve(), folder.resolve()
    return os.path.relpath(target, folder) if folder in target.parents else str(target)


def _layout(shape: list) -> str:
    if len(shape) != 4:
        return ""
    if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return f"NCHW (guessed: {shape[1]} channels in dim 1)"
    if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return f"NHWC (guessed: {shape[3]} channels in dim 3)"
    return "layout not clear from the shape"


def _lists(folder: Path, config: Path, names: list[str]) -> dict[str, tuple[str, Path, Path, int, int]]:
    """Per input: file type, calibration list (held-back files last), held-out list (written beside
    the config), how many files calibrate and how many are held back. One input reads DATA_DIR
    itself; several read DATA_DIR/<input name>/ where it exists. A file that cannot be read as
    its kind is an error naming it (the lists must pass ``xquant check``)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give the folder of calibration samples")
    sources = (
        {names[0]: folder} if len(names) == 1 else {name: folder / name for name in names if (folder / name).is_dir()}
    )
    planned = []
    for name, source in sources.items():
        files = sorted(path for path in source.iterdir() if path.suffix.lower() in EXTENSIONS)
        kinds = sorted({EXTENSIONS[path.suffix.lower()] for path in files})
        if not files:
            raise DataError(f"{source} holds no sample files ({', '.join(sorted(EXTENSIONS))})")
        if len(kinds) > 1:
            raise DataError(f"{source} mixes file types ({', '.join(kinds)}): keep one kind per input")
        bad = [f"{path.name} ({why})" for path in files if (why := _unreadable(path, kinds[0]))]
        if bad:
            raise DataError(
                f"{source}: {len(bad)} file(s) cannot be read as {kinds[0]} samples: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; remove or fix them, then run xquant init again"
            )
        stem = config.with_suffix("").name + ("" if len(names) == 1 else f"_{name}")
        calib, held = config.parent / f"{stem}_calib.txt", config.parent / f"{stem}_holdout.txt"
        for path in (calib, held):
            if path.exists():
                raise ConfigError(
                    [f"{path} exists: xquant init does not overwrite files; give another -o"], source="init"
                )
        planned.append((name, kinds[0], calib, held, files))
    found = {}
    for name, kind, calib, held, files in planned:  # written only once every check passed
        kept = [
            path
            for index, path in enumerate(files)
            if index % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1 or len(files) < HOLD_OUT_EVERY
        ]
        held_out = [path for path in files if path not in kept]
        for path, members in ((calib, kept + held_out), (held, held_out)):
            text = "".join(f"{_ref(member, path.parent)}\n" for member in members)
            write_bytes_atomically(path, text.encode("utf-8"))
        found[name] = (kind, calib, held, len(kept), len(held_out))
    return found


def _unreadable(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be a sample of ``kind`` (from its header: every sample is read in full
    by ``xquant check``), or None."""
    import numpy as np

    try:
        if path.stat().st_size == 0:
            return "empty"
        if kind == "img":
            import cv2

            return None if cv2.haveImageReader(str(path)) else "not an image OpenCV reads"
        if kind == "npy":
            np.load(str(path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
