"""Built-in calibration readers: ``img``, ``npy``, ``raw``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xquant_core import hookimpl
from xquant_core.data import InputSpec
from xquant_core.errors import DataError


class ImageReader:
    """``img``: any OpenCV-readable image, as HxWxC uint8 in ``color_format`` order.

    Images load as BGR; ``color_format: rgb`` converts. A model with one input channel
    gets the image as grayscale (HxWx1).
    """

    is_image = True

    def read(self, path: Path, spec: InputSpec) -> np.ndarray:
        import cv2

        data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile copes with non-ASCII paths
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            raise DataError(f"Calibration input {spec.name}: {path} is not a readable image")
        if len(spec.shape) == 4 and spec.channels == 1:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
        if spec.config.color_format == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return image


class NpyReader:
    """``npy``: ``np.load`` of an array with or without the batch dimension."""

    is_image = False

    def read(self, path: Path, spec: InputSpec) -> np.ndarray:
        with open(path, "rb") as stream:
            magic = stream.read(6)
        if magic != b"\x93NUMPY":
            raise DataError(
                f"Calibration input {spec.name}: {path} is not a .npy file (it does not start with "
                "the NumPy header; write samples with numpy.save)"
            )
        try:
            array = np.load(str(path), allow_pickle=False)
        except Exception as exc:
            raise DataError(f"Calibration input {spec.name}: {path} is not a readable .npy file: {exc}") from None
        accepted = spec.accepted_shapes()
        if array.shape not in accepted:
            raise DataError(
                f"Calibration input {spec.name}: {path} holds shape {list(array.shape)}, expected "
                + " or ".join(str(list(shape)) for shape in accepted)
            )
        return array.reshape(spec.sample_shape)


class RawReader:
    """``raw``: flat float32 bytes, one sample of ``input_shape``."""

    is_image = False

    def read(self, path: Path, spec: InputSpec) -> np.ndarray:
        expected = int(np.prod(spec.sample_shape, dtype=np.int64)) * 4
        actual = path.stat().st_size
        if actual != expected:
            raise DataError(
                f"Calibration input {spec.name}: {path} has {actual} bytes, expected {expected} "
                f"(float32 x {list(spec.sample_shape)})"
            )
        return np.fromfile(str(path), dtype=np.float32).reshape(spec.sample_shape)


@hookimpl
def xquant_register_readers(register):
    register("img", ImageReader())
    register("npy", NpyReader())
    register("raw", RawReader())
