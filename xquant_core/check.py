"""``xquant check -c cfg.json``: everything a run checks before it quantizes, and nothing more.

The config (schema and plugin names), the model and its inputs, every listed sample (held-back ones too) read
and preprocessed once (shape, dtype, finite values), the float model run in onnxruntime on every
calibration batch (what a run that fails looks at: token ids outside the vocabulary, an op
onnxruntime cannot run), the output paths: the same messages and exit codes as a run, in
seconds, without importing PPQ or torch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx

from . import control_flow
from .config import XQuantConfig
from .engine.forms import default_opset
from .pipeline import prepare
from .verify import float_model_problem


def check(
    cfg: XQuantConfig, model: str | os.PathLike | onnx.ModelProto | None = None, output: str | os.PathLike | None = None
) -> list[str]:
    """Run every check of :func:`xquant_core.pipeline.prepare` and read every sample; return the
    summary lines (raises the run's :class:`XQuantError` on the first problem)."""
    started = time.perf_counter()
    prepared = prepare(cfg, model, output)
    graph = prepared.float_model.graph
    opset = default_opset(prepared.float_model)
    compute = control_flow.count_quantized_ops(prepared.float_model)[1]
    where = os.path.normpath(prepared.model_path) if prepared.model_path else "given in memory"
    lines = [
        f"model {where}: opset {opset}, {len(prepared.specs)} input(s), "
        f"{len(graph.output)} output(s), {compute} Conv/ConvTranspose/Gemm/MatMul op(s)"
    ]
    dataset = prepared.dataset
    if dataset is None:
        lines.append("precision_level 3: dynamic quantization, no calibration data is read")
    else:
        low = {spec.name: np.inf for spec in prepared.specs}
        high = {spec.name: -np.inf for spec in prepared.specs}

        def ranges(batch: dict) -> None:  # the ranges calibration will see
            for name, array in batch.items():
                if array.size:
                    low[name] = min(low[name], float(array.min()))
                    high[name] = max(high[name], float(array.max()))

        # every batch read once: checked, its ranges taken, the float model run on it (what a failing run looks at)
        problem = float_model_problem(prepared.float_model, dataset, ranges)
        if problem is not None:
            raise problem
        for index in range(dataset.held_back_count):  # read and checked like the others
            dataset.held_back_batch(index)
        for spec in prepared.specs:
            source = spec.config.preprocess_file
            lines.append(
                f"input {spec.name} {list(spec.shape)} {spec.dtype}: {dataset.count} sample(s) from "
                f"{os.path.normpath(spec.config.data_list_path)} ({spec.config.file_type}, preprocess {source}), "
                "values "
                f"{low[spec.name]:.6g} .. {high[spec.name]:.6g}"
            )
        if dataset.held_back_count:
            lines.append(
                f"{dataset.held_back_count} more listed sample(s) held back: never calibrated on, the "
                "report measures the model outputs and its Next step on them"
            )
    if dataset is not None:
        lines.append(f"the float model runs in onnxruntime on all {len(dataset)} calibration batch(es)")
    lines.append(f"output {prepared.out_path} can be written")
    lines.append(f"ok: ready to quantize ({time.perf_counter() - started:.1f} s)")
    return lines
