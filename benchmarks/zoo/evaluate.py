"""Score a quantized model against FP32 on the model's evaluation inputs (onnxruntime CPU).

For every model: the Q/DQ node count (subgraphs included: a model left in float scores
perfectly and means nothing), whether the output names and order equal FP32's, per-output SNR
and cosine, and the model's task metrics (:meth:`zoo.common.Bench.task_metrics`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx

from . import metrics
from .common import Bench, model_outputs


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def score(bench: Bench, model_path: Path, fp32: List[List[np.ndarray]], feeds: List[Dict]) -> Dict:
    """The scores of one quantized model (``eval_failure`` when onnxruntime cannot run it)."""
    model = onnx.load(str(model_path), load_external_data=False)
    q, dq = metrics.qdq_count(model)
    names = model_outputs(bench.model_path)
    record: Dict = {"qdq": [q, dq], "outputs": [o.name for o in model.graph.output]}
    record["outputs_equal"] = record["outputs"] == names
    try:
        quant = bench.evaluate(model_path, feeds)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure is a result
        record["eval_failure"] = f"onnxruntime cannot run it: {first_line(exc)}"
        return record
    record["per_output"] = {name: list(v) for name, v in metrics.per_output_error(names, fp32, quant).items()}
    record["task"] = bench.task_metrics(fp32, quant, feeds)
    return record
