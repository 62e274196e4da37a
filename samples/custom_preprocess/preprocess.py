"""A custom calibration preprocessor, the vendor's ``"preprocess_file": "file.py:function"`` form.

xquant imports this file (the path is relative to the config file) and calls
``preprocess(path_list, input_parametres)`` once per calibration batch:

* ``path_list``: the batch's sample paths (strings), from the input's ``data_list_path``;
* ``input_parametres``: that input's parameters as a dict (``input_name``, ``input_shape``,
  ``dtype``, ``file_type``, ``color_format``, ``mean_value``, ``std_value``,
  ``preprocess_file``, ``data_list_path``), with ``input_shape`` read from the model when
  the config leaves it out.

It returns the batch as a numpy array or torch tensor of shape
``[len(path_list), C, H, W]``; xquant checks the shape and casts to the model input's dtype.

This one letterboxes: the whole photo is scaled to fit H x W (aspect ratio kept, bilinear),
the border is filled with grey (114, as YOLO-style detectors do), then per-channel
``(x - mean) / std`` on 0-255 values. Raise an exception to reject a file: xquant reports it
with this file and function name and exits with code 2.
"""

import cv2
import numpy as np


def letterbox(image, height, width, fill=114):
    scale = min(height / image.shape[0], width / image.shape[1])
    new_h, new_w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((height, width, image.shape[2]), fill, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def preprocess(path_list, input_parametres):
    _, channels, height, width = input_parametres["input_shape"]
    mean = np.asarray(input_parametres["mean_value"] or [0.0] * channels, np.float32)
    std = np.asarray(input_parametres["std_value"] or [1.0] * channels, np.float32)
    batch = []
    for path in path_list:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {path}")
        if input_parametres["color_format"] == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = (letterbox(image, height, width).astype(np.float32) - mean) / std
        batch.append(image.transpose(2, 0, 1))
    return np.stack(batch)
