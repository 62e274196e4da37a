"""Built-in preprocessors: ``none``, ``PT_IMAGENET`` and ``IMAGENET``.

All image preprocessors work on 0-255 pixel values and finish the same way: per-channel
``(x - mean) / std`` with the config's ``mean_value``/``std_value`` (when given), then
HWC -> CHW unless the model takes NHWC. ``"file.py:function"`` preprocessors are handled
by the core (:class:`xquant_core.data.PathFunctionPreprocessor`).
"""

from __future__ import annotations

import math

import numpy as np

from xquant_core import hookimpl
from xquant_core.data import InputSpec, Reader
from xquant_core.errors import DataError

#: the crop is this fraction of the resized image (ImageNet evaluation convention)
CROP_FRACTION = 0.875


def normalize_and_layout(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """HxWxC 0-255 image -> normalized float32 sample in the model's layout."""
    image = image.astype(np.float32)
    cfg = spec.config
    channels = image.shape[2]
    for values, what in ((cfg.mean_value, "mean_value"), (cfg.std_value, "std_value")):
        if values is not None and len(values) not in (1, channels):
            raise DataError(
                f"Calibration input {spec.name}: {what} has {len(values)} values but the image has {channels} channels"
            )
    if cfg.mean_value is not None:
        image -= np.asarray(cfg.mean_value, dtype=np.float32)
    if cfg.std_value is not None:
        image /= np.asarray(cfg.std_value, dtype=np.float32)
    return image if spec.is_nhwc else np.transpose(image, (2, 0, 1))


def center_crop(image: np.ndarray, height: int, width: int, rounding) -> np.ndarray:
    top = int(rounding((image.shape[0] - height) / 2.0))
    left = int(rounding((image.shape[1] - width) / 2.0))
    return image[top : top + height, left : left + width]


def torchvision_resize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``Resize(int(h / 0.875))`` + ``CenterCrop((h, w))`` on a PIL image.

    The short side becomes ``int(h / 0.875)``, the long side keeps the aspect ratio
    (torchvision's ``int(size * long / short)``); Pillow's antialiased bilinear filter
    does the resampling, as torchvision does on PIL images; crop offsets are rounded.
    """
    from PIL import Image

    h, w = image.shape[:2]
    short_target = int(height / CROP_FRACTION)
    if h <= w:
        new_h, new_w = short_target, int(short_target * w / h)
    else:
        new_h, new_w = int(short_target * h / w), short_target
    channels = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return center_crop(resized, height, width, round)


def opencv_resize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV-style ImageNet crop: the crop is 87.5 % of the resized image.

    With ``th = int(h / 0.875)`` and ``tw = int(w / 0.875)``, a portrait image becomes
    ``tw`` wide and ``int(th * H / W)`` high, any other ``th`` high and
    ``int(tw * W / H)`` wide (area interpolation); crop offsets are floored.
    """
    import cv2

    h, w = image.shape[:2]
    target_h, target_w = int(height / CROP_FRACTION), int(width / CROP_FRACTION)
    if h > w:
        new_w, new_h = target_w, int(target_h * h / w)
    else:
        new_w, new_h = int(target_w * w / h), target_h
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return center_crop(resized, height, width, math.floor)


class NoPreprocess:
    """``none``: images are resized to (W, H) with area interpolation and normalized;
    arrays from other readers pass through unchanged."""

    def __call__(self, sample: np.ndarray, spec: InputSpec, reader: Reader) -> np.ndarray:
        if not getattr(reader, "is_image", False):
            return sample
        import cv2

        height, width = spec.height_width
        resized = cv2.resize(sample, (width, height), interpolation=cv2.INTER_AREA)
        if resized.ndim == 2:
            resized = resized[:, :, None]
        return normalize_and_layout(resized, spec)


class CropPreprocess:
    """ImageNet-style resize + centre crop + normalize.

    ``PT_IMAGENET`` is torchvision's evaluation transform (:func:`torchvision_resize_crop`);
    ``IMAGENET`` is the OpenCV flavour (:func:`opencv_resize_crop`), as in the vendor tool.
    """

    def __init__(self, resize_crop):
        self.resize_crop = resize_crop

    def __call__(self, sample: np.ndarray, spec: InputSpec, reader: Reader) -> np.ndarray:
        if not getattr(reader, "is_image", False):
            raise DataError(
                f"Calibration input {spec.name}: preprocess_file {spec.config.preprocess_file} "
                f"needs images, but file_type is {spec.config.file_type}"
            )
        height, width = spec.height_width
        return normalize_and_layout(self.resize_crop(sample, height, width), spec)


@hookimpl
def xquant_register_preprocessors(register):
    register("none", NoPreprocess())
    register("PT_IMAGENET", CropPreprocess(torchvision_resize_crop))
    register("IMAGENET", CropPreprocess(opencv_resize_crop))
