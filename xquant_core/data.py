"""Calibration data: list file -> reader plugin -> preprocessor plugin -> batches.

Each stage is testable alone:

- :func:`read_list` turns a list file into sample paths;
- a :class:`Reader` (``file_type``) turns one path into one array;
- a :class:`Preprocessor` (``preprocess_file``) turns that array into one model input
  sample (without the batch dimension);
- :class:`CalibrationDataset` zips the inputs of a model sample by sample and yields
  batches ``{input_name: np.ndarray}``, reading lazily with a bounded cache so memory
  does not grow with the number of calibration passes.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .config import PREPROCESS_NONE, InputConfig
from .errors import DataError

log = logging.getLogger("xquant.data")

#: cache budget for preprocessed calibration samples (bytes). Small on purpose: it only saves
#: re-reading on the second and later passes, and it is the one part of the data's memory
#: that grows with the sample count (about 106 samples of 3x224x224 float32)
CACHE_BUDGET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputSpec:
    """One model input, resolved against the model: what readers and preprocessors see."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    config: InputConfig

    @property
    def batched(self) -> bool:
        """Whether the input has a leading batch dimension of 1 (most inputs; not an RNN state
        ``[directions, batch, hidden]``, a rank-1 or a scalar input)."""
        return len(self.shape) >= 1 and self.shape[0] == 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``shape`` without the batch dimension, or the whole shape when unbatched."""
        return tuple(self.shape[1:]) if self.batched else tuple(self.shape)

    def batch_shape(self, count: int) -> tuple[int, ...]:
        """The shape of a batch of ``count`` samples (an unbatched input takes one sample at a time)."""
        return (count,) + self.sample_shape if self.batched else self.sample_shape

    def accepted_shapes(self) -> list[tuple[int, ...]]:
        """Shapes a file may hold for one sample: the model's shape, and without its batch dim of 1."""
        return [self.sample_shape, self.shape] if self.batched else [self.shape]

    @property
    def height_width(self) -> tuple[int, int]:
        """(H, W) of an NCHW or NHWC image input."""
        if len(self.shape) != 4:
            raise DataError(f"input '{self.name}' has shape {list(self.shape)}: image preprocessing needs 4 dims")
        if self.is_nhwc:
            return self.shape[1], self.shape[2]
        return self.shape[2], self.shape[3]

    @property
    def channels(self) -> int:
        return self.shape[3] if self.is_nhwc else self.shape[1]

    @property
    def is_nhwc(self) -> bool:
        return len(self.shape) == 4 and self.shape[3] in (1, 3, 4) and self.shape[1] not in (1, 3, 4)

    def vendor_dict(self) -> dict[str, Any]:
        """The input's parameters as the vendor tool passes them to custom preprocess functions."""
        cfg = self.config
        return {
            "input_name": self.name,
            "input_shape": list(self.shape),
            "dtype": self.dtype,
            "file_type": cfg.file_type,
            "color_format": cfg.color_format,
            "mean_value": list(cfg.mean_value) if cfg.mean_value else None,
            "std_value": list(cfg.std_value) if cfg.std_value else None,
            "preprocess_file": cfg.preprocess_file,
            "data_list_path": str(cfg.data_list_path),
        }


class Reader(Protocol):
    """Reads one calibration file (``file_type``).

    ``is_image`` tells the default ("none") preprocessor whether to apply the image
    pipeline (resize, normalize, HWC->CHW) or just reshape.
    """

    is_image: bool

    def read(self, path: Path, spec: InputSpec) -> np.ndarray:
        """Return the file's content as an array; raise :class:`DataError` naming the file."""


class Preprocessor(Protocol):
    """Turns what a reader returned into one model input sample (``sample_shape``)."""

    def __call__(self, sample: np.ndarray, spec: InputSpec, reader: Reader) -> np.ndarray: ...


def read_list(spec_config: InputConfig, name: str) -> list[Path]:
    """Sample paths of a list file: one per line, relative to the list's folder."""
    list_path = spec_config.data_list_path
    if list_path.is_dir():
        raise DataError(
            f"Calibration input {name}: data_list_path {list_path} is a folder: give the path of the "
            "list file (one sample path per line)"
        )
    if not list_path.is_file():
        raise DataError(f"Calibration input {name}: data_list_path {list_path} does not exist.")
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Calibration input {name}: cannot read data_list_path {list_path}: {exc}") from None
    paths = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        path = Path(line)
        paths.append(path if path.is_absolute() else list_path.parent / path)
    if not paths:
        raise DataError(f"Calibration input {name} finds 0 items. (data_list_path: {list_path})")
    return paths


class PathFunctionPreprocessor:
    """The vendor's ``"file.py:function"`` preprocessor: ``function(path_list, input_dict)``.

    The function receives the paths of one batch and the input's parameters as a dict and
    returns the batch (numpy array or torch tensor, with the batch dimension).
    """

    def __init__(self, spec: str):
        file_part, func_name = spec.rsplit(":", 1)
        self.file = Path(file_part)
        self.func_name = func_name
        self.func = self._load()

    def _load(self) -> Callable:
        if not self.file.is_file():
            state = "is a folder, not a Python file" if self.file.is_dir() else "does not exist"
            raise DataError(f"preprocess_file {self.file}:{self.func_name}: file {self.file} {state}")
        module_name = f"xquant_preprocess_{abs(hash(str(self.file)))}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, self.file)
            if spec is None or spec.loader is None:
                raise ImportError(f"{self.file} cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:
            raise DataError(
                f"preprocess_file {self.file}:{self.func_name}: importing {self.file} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        func = getattr(module, self.func_name, None)
        if not callable(func):
            raise DataError(
                f"preprocess_file {self.file}:{self.func_name}: {self.file} has no function '{self.func_name}'"
            )
        return func

    def batch(self, paths: Sequence[Path], spec: InputSpec) -> np.ndarray:
        where = f"preprocess_file {self.file}:{self.func_name}"
        try:
            result = self.func([str(p) for p in paths], spec.vendor_dict())
            if hasattr(result, "detach"):  # torch tensor
                result = result.detach().cpu().numpy()
        except (Exception, SystemExit) as exc:  # sys.exit() in a user's function is an error too
            raise DataError(f"{where} raised {type(exc).__name__}: {exc} (first file: {paths[0]})") from None
        try:
            array = np.asarray(result)
        except (Exception, SystemExit) as exc:  # a ragged list, an object whose __array__ raises
            raise DataError(
                f"{where} returned a {type(result).__name__} that is not an array: {exc} (first file: {paths[0]})"
            ) from None
        if array.dtype.kind not in "biuf":
            raise DataError(
                f"{where} returned {type(result).__name__}"
                + (f" of {array.dtype}" if isinstance(result, np.ndarray) else "")
                + f", not an array of numbers (first file: {paths[0]})"
            )
        return array


def conform(array: np.ndarray, spec: InputSpec, count: int, origin: str) -> np.ndarray:
    """Check and cast a batch of ``count`` samples to the input's shape and dtype."""
    expected = spec.batch_shape(count)
    try:
        array = np.asarray(array)
    except (ValueError, TypeError) as exc:  # a ragged list, an object whose __array__ raises
        raise DataError(f"Calibration input {spec.name}: {origin} is not an array: {exc}") from None
    if array.dtype == object:
        raise DataError(f"Calibration input {spec.name}: {origin} is not an array of numbers")
    if array.shape != expected and array.size == math.prod(expected):
        # only a flat array, or a missing/extra batch dimension: never reorder axes silently
        squeezed = tuple(dim for dim in array.shape if dim != 1)
        if array.ndim == 1 or squeezed == tuple(dim for dim in expected if dim != 1):
            array = array.reshape(expected)
    if array.shape != expected:
        raise DataError(
            f"Calibration input {spec.name}: {origin} gives shape {list(array.shape)}, expected {list(expected)}"
        )
    return np.ascontiguousarray(cast_to_input_dtype(array, spec, origin))


def cast_to_input_dtype(array: np.ndarray, spec: InputSpec, origin: str) -> np.ndarray:
    """Cast to the model input's dtype; refuse a cast that would change values.

    Casting to a float input always works (float64 -> float32 only rounds). Casting to an
    integer or bool input (token ids, masks) needs whole values inside the target range:
    ``1.5`` or ``-1`` for a uint8 input is a :class:`DataError` naming ``origin``.
    """
    target = np.dtype(spec.dtype)
    if array.dtype == target:
        return array
    if array.dtype.kind not in "iubf":
        raise DataError(
            f"Calibration input {spec.name}: {origin} holds {array.dtype} data, the model input is {target}"
        )
    if target.kind in "iub" and array.size:
        if target.kind == "b":
            low, high = 0, 1
        else:
            info = np.iinfo(target)
            low, high = info.min, info.max
        bad = None
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = "non-finite values"
        elif array.dtype.kind == "f" and not np.all(np.floor(array) == array):
            bad = "fractional values"
        elif array.min() < low or array.max() > high:
            bad = f"values in [{array.min()}, {array.max()}] outside [{low}, {high}]"
        if bad:
            raise DataError(
                f"Calibration input {spec.name}: {origin} holds {array.dtype} data with {bad}; "
                f"the model input is {target} and casting would change them"
            )
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, which _finite names
        return array.astype(target, copy=False)


class CalibrationDataset:
    """Batches of calibration samples for all model inputs, read lazily.

    ``readers``/``preprocessors`` map input names to the resolved plugin components.
    Preprocessed samples are cached up to :data:`CACHE_BUDGET_BYTES`; the rest are
    re-read on each pass, so peak memory is bounded whatever the sample count.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        readers: dict[str, Reader],
        preprocessors: dict[str, Any],
        samples: int,
        batch_size: int = 1,
    ):
        self.specs = list(specs)
        unbatched = [spec.name for spec in self.specs if not spec.batched]
        if batch_size > 1 and unbatched:
            raise DataError(
                f"input(s) {', '.join(unbatched)} have no leading batch dimension of 1: "
                "calibrate them one sample at a time"
            )
        self.readers = readers
        self.preprocessors = preprocessors
        self.batch_size = batch_size
        lists = {spec.name: read_list(spec.config, spec.name) for spec in self.specs}
        lengths = {name: len(paths) for name, paths in lists.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{name}: {n}" for name, n in lengths.items())
            raise DataError(
                f"Calibration inputs have data lists of different lengths ({detail}); "
                "line k of each list must belong to the same sample"
            )
        available = next(iter(lengths.values()))
        if available < samples:
            log.warning(
                "calibration_step is %d but only %d sample(s) are listed: using all %d", samples, available, available
            )
        self.count = min(samples, available)
        self.lists = {name: paths[: self.count] for name, paths in lists.items()}
        #: the samples listed after the first ``calibration_step``: never calibrated on, the report measures on them
        self.held_back_lists = {name: paths[self.count :] for name, paths in lists.items()}
        for spec in self.specs:  # a listed file that is not there fails now, as in xquant check, not in the report
            if isinstance(preprocessors[spec.name], PathFunctionPreprocessor):
                continue  # a preprocess function gets the listed names, whatever they are
            for path in lists[spec.name]:
                if not path.is_file():
                    raise _not_a_file(spec, path)
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._cache_bytes = 0

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(len(self)):
            yield self.batch(index)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, self.count)
        batch = {spec.name: self._load(spec, self.lists[spec.name][start:stop]) for spec in self.specs}
        size = sum(array.nbytes for array in batch.values())
        if self._cache_bytes + size <= CACHE_BUDGET_BYTES:
            self._cache[index] = batch
            self._cache_bytes += size
        return batch

    @property
    def held_back_count(self) -> int:
        return len(next(iter(self.held_back_lists.values()), []))

    def held_back_batch(self, index: int) -> dict[str, np.ndarray]:
        """Held-back sample ``index`` as a batch of one (read each time: they are not cached)."""
        return {spec.name: self._load(spec, self.held_back_lists[spec.name][index : index + 1]) for spec in self.specs}

    def _load(self, spec: InputSpec, paths: list[Path]) -> np.ndarray:
        pre = self.preprocessors[spec.name]
        if isinstance(pre, PathFunctionPreprocessor):
            where = f"{pre.file}:{pre.func_name}"
            return _finite(
                conform(pre.batch(paths, spec), spec, len(paths), where),
                spec,
                f"the batch {where} made of {', '.join(str(path) for path in paths)}",
            )
        reader = self.readers[spec.name]
        samples = []
        for path in paths:
            if not path.is_file():
                raise _not_a_file(spec, path)
            try:
                raw = reader.read(path, spec)
            except DataError:
                raise
            except (Exception, SystemExit) as exc:  # a plugin's reader should raise DataError; name the file anyway
                raise DataError(
                    f"Calibration input {spec.name}: reading {path} with file_type "
                    f"{spec.config.file_type} failed: {type(exc).__name__}: {exc}"
                ) from None
            try:
                sample = pre(raw, spec, reader)
            except DataError:
                raise
            except (Exception, SystemExit) as exc:
                raise DataError(
                    f"Calibration input {spec.name}: preprocessing {path} failed: {type(exc).__name__}: {exc}"
                ) from None
            samples.append(_finite(conform(sample, spec, 1, str(path)), spec, str(path)))
        return np.concatenate(samples) if spec.batched else samples[0]


def _not_a_file(spec: InputSpec, path: Path) -> DataError:
    state = "is a folder, not a sample file" if path.is_dir() else "does not exist"
    return DataError(f"Calibration input {spec.name}: file {path} listed in {spec.config.data_list_path} {state}")


def _finite(sample: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """Calibration needs finite numbers: one inf made every output of a minmax-calibrated model NaN."""
    if sample.dtype.kind in "fc" and not np.isfinite(sample).all():
        nan, inf = int(np.isnan(sample).sum()), int(np.isinf(sample).sum())
        raise DataError(
            f"Calibration input {spec.name}: {where} holds {nan} NaN and {inf} infinite value(s) "
            "after preprocessing: calibration needs finite numbers"
        )
    return sample


def resolve_preprocessor(spec_config: InputConfig, registry) -> Any:
    """The preprocessor component for an input: a plugin or a ``file.py:function``."""
    name = spec_config.preprocess_file or PREPROCESS_NONE
    if ":" in name:
        return PathFunctionPreprocessor(name)
    return registry.get(name)


class Subset(Sequence):
    """Some batches of a dataset, re-iterable and sized: ``load(index)`` reads one; ``total``:
    how many there were to pick from."""

    def __init__(self, load: Callable[[int], dict], indices: list[int], total: int | None = None):
        self.load, self.indices = load, indices
        self.total = len(indices) if total is None else total

    def __getitem__(self, position):  # one batch, never a slice
        return self.load(self.indices[position])

    def __iter__(self):
        return (self.load(index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
