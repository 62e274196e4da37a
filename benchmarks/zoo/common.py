"""The per-model benchmark interface and what all models share: configs, feeds, sessions.

A model's benchmark (:class:`Bench`) says where its ONNX file is, builds its calibration and
evaluation inputs (``build``), describes them as xquant ``input_parametres`` entries
(``input_entries``), and scores FP32 against INT8 on the evaluation inputs (``task_metrics``).
Everything else is generic and driven by those entries, so xquant, onnxruntime's calibration
reader and the evaluation read the same files with the same preprocessing:

* :func:`write_config` writes the vendor-format config (default quantization settings);
* :func:`iter_feeds` turns entries into ``{input name: array}`` feeds, one per sample, with the
  functions of :mod:`.preprocess` (``img``) or ``np.load`` (``npy``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from . import preprocess
from .paths import DATA, MODELS, PREPROCESS

# ----------------------------------------------------------------------------------------------
# model inputs


def model_inputs(model_path: Path) -> Dict[str, Tuple[List, str]]:
    """``{name: (shape with None for symbolic dims, numpy dtype name)}`` of the graph inputs."""
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        out[value.name] = (shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name)
    return out


def model_outputs(model_path: Path) -> List[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    return [o.name for o in model.graph.output]


def resolved_shape(entry: Dict, model_shape: Sequence[Optional[int]]) -> List[int]:
    """The entry's ``input_shape``, else the model's with a symbolic batch as 1 (as xquant does)."""
    if entry.get("input_shape"):
        return list(entry["input_shape"])
    return [1 if (d is None and axis == 0) else d for axis, d in enumerate(model_shape)]


# ----------------------------------------------------------------------------------------------
# list files


def write_list(list_path: Path, files: Sequence[Path]) -> None:
    """One path per line, relative to the list's folder (what xquant's lists hold)."""
    list_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(Path(_relpath(f, list_path.parent))) for f in files]
    list_path.write_text("".join(line + "\n" for line in lines))


def read_list(list_path: Path) -> List[Path]:
    lines = [ln.strip() for ln in list_path.read_text().splitlines()]
    return [(list_path.parent / ln).resolve() for ln in lines if ln]


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


# ----------------------------------------------------------------------------------------------
# feeds from input entries


def _load_sample(entry: Dict, path: Path, shape: List[int], dtype: str) -> np.ndarray:
    """One sample of one input, with the batch dimension, as the entry describes it."""
    if entry.get("file_type", "img") == "npy":
        array = np.load(str(path), allow_pickle=False)
        if array.ndim == len(shape) - 1:
            array = array[None]
        return array.astype(dtype, copy=False)
    function = (entry.get("preprocess_file") or "none").rsplit(":", 1)[-1]
    params = dict(entry, input_shape=shape)
    return preprocess.preprocess_one(function, str(path), params).astype(dtype, copy=False)


def iter_feeds(entries: Sequence[Dict], model_path: Path, base: Path,
               limit: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Feeds sample by sample; line k of every entry's list is sample k.

    ``base`` is the folder relative paths in ``entries`` start from (the config's folder).
    """
    inputs = model_inputs(model_path)
    lists = {e["input_name"]: read_list(base / e["data_list_path"]) for e in entries}
    count = min(len(v) for v in lists.values())
    if limit is not None:
        count = min(count, limit)
    for k in range(count):
        feed = {}
        for entry in entries:
            name = entry["input_name"]
            shape, dtype = inputs[name]
            feed[name] = _load_sample(entry, lists[name][k], resolved_shape(entry, shape), dtype)
        yield feed


# ----------------------------------------------------------------------------------------------
# sessions


def session(model_path: Path):
    """onnxruntime CPU session, one thread (the evaluation is not what is timed), in exact int8
    arithmetic (:func:`xquant_core.runtime.onnxruntime_session` says why), so a score does not
    depend on the CPU that measured it."""
    from xquant_core.runtime import onnxruntime_session

    return onnxruntime_session(model_path, threads=1)


def run_feeds(sess, feeds: Iterator[Dict[str, np.ndarray]]) -> List[List[np.ndarray]]:
    """All outputs (in the session's order) for every feed."""
    return [list(sess.run(None, feed)) for feed in feeds]


# ----------------------------------------------------------------------------------------------
# the benchmark interface


class Bench:
    """One model of the zoo. Subclasses set the class attributes and implement the hooks."""

    key: str = ""
    title: str = ""
    model_file: str = ""  # under benchmarks/material/models
    origin: str = ""  # the registry package and member it comes from
    headline: str = ""  # the task metric the summary table shows
    #: a short description of the calibration/evaluation sources, for ZOO.md
    sources: str = ""

    @property
    def model_path(self) -> Path:
        return MODELS / self.model_file

    @property
    def folder(self) -> Path:
        return DATA / self.key

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    # -- hooks ----------------------------------------------------------------------------
    def build(self) -> None:
        """Write the calibration and evaluation inputs and their lists (idempotent)."""
        raise NotImplementedError

    def input_entries(self, split: str) -> List[Dict]:
        """xquant ``input_parametres`` for ``split`` ("calib" or "eval"), paths relative to
        :attr:`folder`."""
        raise NotImplementedError

    def task_metrics(self, fp32: List[List[np.ndarray]], quant: List[List[np.ndarray]],
                     eval_inputs: List[Dict[str, np.ndarray]]) -> Dict[str, str]:
        """Task-level scores of ``quant`` against ``fp32`` (ordered, formatted)."""
        raise NotImplementedError

    def counts(self) -> Dict[str, int]:
        """Number of calibration and evaluation samples (for the report)."""
        return {split: len(read_list(self.folder / self.input_entries(split)[0]["data_list_path"]))
                for split in ("calib", "eval")}

    # -- generic --------------------------------------------------------------------------
    def eval_feeds(self) -> List[Dict[str, np.ndarray]]:
        return list(iter_feeds(self.input_entries("eval"), self.model_path, self.folder))

    def evaluate(self, model_path: Path, feeds: List[Dict[str, np.ndarray]]) -> List[List[np.ndarray]]:
        """Outputs of ``model_path`` on the evaluation feeds (stateful models override)."""
        return run_feeds(session(model_path), iter(feeds))


def preprocess_ref(function: str, config_folder: Path) -> str:
    """``"<relative path to preprocess.py>:function"`` as a config (in ``config_folder``) says it."""
    return f"{_relpath(PREPROCESS, config_folder)}:{function}"


def write_config(bench: Bench) -> Path:
    """The vendor-format config: default quantization settings, only the inputs described."""
    entries = bench.input_entries("calib")
    steps = bench.counts()["calib"]
    config = {
        "model_parameters": {
            "onnx_model": _relpath(bench.model_path, bench.folder),
            "working_dir": "output",
            "output_prefix": f"{bench.key}.xquant",
        },
        "calibration_parameters": {
            "calibration_step": steps,
            "input_parametres": entries,
        },
        "quantization_parameters": {},
    }
    bench.config_path.parent.mkdir(parents=True, exist_ok=True)
    bench.config_path.write_text(json.dumps(config, indent=2) + "\n")
    return bench.config_path
