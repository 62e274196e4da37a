"""Built-in preprocessors: ``none``, ``PT_IMAGENET`` and ``IMAGENET``.

All image preprocessors work on 0-255 pixel values and finish the same way: per-channel
``(x - mean) / std`` with the config's ``mean_value``/``std_value`` (when given), then
HWC -> CHW unless the model takes NHWC. ``"file.py:function"`` preprocessors are handled
by the core (:class:`xquant_core.data.PathFunctionPreprocessor`).
"""

from __future__ import annotations

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
            raise DataError(f"Calibration input {spec.name}: {what} has {len(values)} values "
                            f"but the image has {channels} channels")
    if cfg.mean_value is not None:
        image -= np.asarray(cfg.mean_value, dtype=np.float32)
    if cfg.std_value is not None:
        image /= np.asarray(cfg.std_value, dtype=np.float32)
    return image if spec.is_nhwc else np.transpose(image, (2, 0, 1))


def resize_and_center_crop(image: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    """Resize the short side to ``height / 0.875`` (aspect kept), then centre-crop HxW."""
    import cv2

    h, w = image.shape[:2]
    short_target = int(height / CROP_FRACTION)
    if h <= w:
        new_h, new_w = short_target, int(short_target * w / h)
    else:
        new_h, new_w = int(short_target * h / w), short_target
    new_h, new_w = max(new_h, height), max(new_w, width)
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return resized[top:top + height, left:left + width]


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

    ``PT_IMAGENET`` is torchvision's evaluation transform (bilinear resize of the short
    side to H/0.875, centre crop); ``IMAGENET`` is the OpenCV flavour (area
    interpolation), as in the vendor tool.
    """

    def __init__(self, interpolation: str):
        self.interpolation = interpolation

    def __call__(self, sample: np.ndarray, spec: InputSpec, reader: Reader) -> np.ndarray:
        import cv2

        if not getattr(reader, "is_image", False):
            raise DataError(f"Calibration input {spec.name}: preprocess_file {spec.config.preprocess_file} "
                            f"needs images, but file_type is {spec.config.file_type}")
        height, width = spec.height_width
        flag = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}[self.interpolation]
        return normalize_and_layout(resize_and_center_crop(sample, height, width, flag), spec)


@hookimpl
def xquant_register_preprocessors(register):
    register("none", NoPreprocess())
    register("PT_IMAGENET", CropPreprocess("bilinear"))
    register("IMAGENET", CropPreprocess("area"))
