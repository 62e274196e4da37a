"""The plugin module named by this package's ``xquant`` entry point.

It registers three components, one per hook:

- calibration algorithm ``gaussian`` (:class:`Gaussian`): clip range mean ± k·std;
- reader ``csv`` (:class:`CsvReader`): text files of numbers;
- preprocessor ``scale01`` (:class:`Scale01`): 0-255 values to 0-1.

Only numpy and the light ``xquant_core`` modules are imported here; OpenCV is imported
inside the one method that needs it, so ``xquant --help`` and ``xquant plugins`` stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from xquant_core import hookimpl
from xquant_core.calibration import (
    CalibrationAlgorithm,
    CalibrationContext,
    TensorStatistics,
)
from xquant_core.data import InputSpec, Reader
from xquant_core.errors import DataError

#: default width of the gaussian clip window, in standard deviations
DEFAULT_K = 4.0


class Gaussian(CalibrationAlgorithm):
    """``gaussian``: clip each activation to ``mean ± k·std`` of its calibration values.

    Mean and standard deviation are estimated from the calibration histogram (bin
    centres weighted by their counts). The window is then clamped to the observed
    ``[min, max]`` and widened to contain 0, so that 0 stays exactly representable.
    ``k`` defaults to 4 (:data:`DEFAULT_K`): on normally distributed values ±4σ clips
    about 0.006 % of them; heavy-tailed tensors are clipped more. To use another ``k``,
    register a second instance under its own name, e.g. ``register("gaussian3", Gaussian(3))``.
    """

    needs_histogram = True

    def __init__(self, k: float = DEFAULT_K):
        if not k > 0:
            raise ValueError(f"k must be positive, got {k!r}")
        self.k = float(k)

    def compute_range(self, stats: TensorStatistics, ctx: CalibrationContext) -> tuple[float, float]:
        low, high = float(stats.min), float(stats.max)
        counts = None if stats.histogram is None else np.asarray(stats.histogram, dtype=np.float64)
        if counts is not None and high > low and counts.sum() > 0:
            edges = np.linspace(low, high, len(counts) + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            total = counts.sum()
            mean = float(counts @ centres / total)
            std = math.sqrt(max(float(counts @ (centres - mean) ** 2 / total), 0.0))
            low, high = max(low, mean - self.k * std), min(high, mean + self.k * std)
        return min(low, 0.0), max(high, 0.0)


class CsvReader:
    """``csv``: a text file of numbers separated by commas and/or whitespace.

    The numbers are read in row-major order and reshaped to the input's sample shape
    (the model input shape without the batch dimension), as float32.
    """

    is_image = False

    def read(self, path: Path, spec: InputSpec) -> np.ndarray:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"Calibration input {spec.name}: cannot read {path}: {exc}") from None
        try:
            values = np.array(text.replace(",", " ").split(), dtype=np.float32)
        except ValueError as exc:
            raise DataError(f"Calibration input {spec.name}: {path} is not a csv of numbers: {exc}") from None
        expected = math.prod(spec.sample_shape)
        if values.size != expected:
            raise DataError(f"Calibration input {spec.name}: {path} holds {values.size} numbers, expected "
                            f"{expected} (sample shape {list(spec.sample_shape)})")
        return values.reshape(spec.sample_shape)


class Scale01:
    """``scale01``: 0-255 values to 0-1.

    From an image reader (``is_image``, HxWxC): resize to the model's (H, W) if needed
    (area interpolation), divide by 255, apply ``mean_value``/``std_value`` when given
    (in 0-1 units, e.g. 0.485/0.229), and lay out CHW (HWC when the model takes NHWC).
    From any other reader: divide by 255 and keep the shape; ``mean_value``/``std_value``
    are refused there rather than ignored.
    """

    def __call__(self, sample: np.ndarray, spec: InputSpec, reader: Reader) -> np.ndarray:
        cfg = spec.config
        if not getattr(reader, "is_image", False):
            if cfg.mean_value is not None or cfg.std_value is not None:
                raise DataError(f"Calibration input {spec.name}: preprocess_file scale01 applies "
                                f"mean_value/std_value to images only, but file_type is {cfg.file_type}")
            return np.asarray(sample, dtype=np.float32) / np.float32(255.0)
        height, width = spec.height_width
        image = sample
        if image.shape[:2] != (height, width):
            import cv2

            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        if image.ndim == 2:
            image = image[:, :, None]
        image = image.astype(np.float32) / np.float32(255.0)
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


@hookimpl
def xquant_register_calibration_algorithms(register):
    register("gaussian", Gaussian())


@hookimpl
def xquant_register_readers(register):
    register("csv", CsvReader())


@hookimpl
def xquant_register_preprocessors(register):
    register("scale01", Scale01())
