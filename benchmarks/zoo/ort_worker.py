"""onnxruntime's ``quantize_static`` for one zoo model, meant to run as its own process.

Usage (``benchmarks/zoo/quantizers.py`` starts it)::

    python benchmarks/zoo/ort_worker.py MODEL_KEY {minmax,percentile} OUT.onnx [--no-pre-process]

The calibration reader yields the same feeds xquant calibrates on: the model's config entries
read by :func:`zoo.common.iter_feeds` (the preprocess functions of ``zoo/preprocess.py`` or the
npy files). Settings: QDQ, per-channel, QInt8 activations and weights, ``CalibrationMethod``
MinMax or Percentile, onnxruntime's defaults otherwise. A model older than opset 13 is first
converted to opset 13 (:func:`upgrade_opset`: per-channel QDQ needs it and quantize_static does
not do it). Unless ``--no-pre-process``, the model then goes through onnxruntime's
``quant_pre_process`` (symbolic shape inference, onnxruntime's graph optimisation, ONNX shape
inference), which among other things folds the Constant-node weights of the PP-OCR models into
initializers, so that they are quantized per channel as weights instead of per tensor as
activations.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo.common import iter_feeds  # noqa: E402
from zoo.models import BENCHES  # noqa: E402


MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs opset 13


def upgrade_opset(model: Path, folder: Path) -> Path:
    """The model converted to opset 13 when it is older (onnx.version_converter).

    quantize_static does not upgrade by itself: per_channel=True on an opset-12 model (O-net,
    PP-OCR, BlazeFace) writes DequantizeLinear nodes with an ``axis`` that onnxruntime then refuses
    to load ("Unrecognized attribute: axis for operator DequantizeLinear").
    """
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(model))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= MIN_OPSET:
        return model
    out = folder / f"{model.stem}.opset{MIN_OPSET}.onnx"
    onnx.save(version_converter.convert_version(proto, MIN_OPSET), str(out))
    print(f"zoo: opset {opset} -> {MIN_OPSET} (onnx.version_converter)", flush=True)
    return out


def pre_process(model: Path, folder: Path) -> Path:
    """``quant_pre_process`` into ``folder``; returns the pre-processed model.

    Symbolic shape inference fails on some models (PP-OCR's dynamic sizes: "Incomplete symbolic
    shape inference"); then it is run again without that step. The step used is printed.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / f"{model.stem}.pre.onnx"
    try:
        quant_pre_process(str(model), str(out))
        print("zoo: quant_pre_process: full", flush=True)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain Exception here
        quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
        print(f"zoo: quant_pre_process: skip_symbolic_shape=True (full: {type(exc).__name__}: {exc})", flush=True)
    return out


def quantize(key: str, method: str, output: Path, use_pre_process: bool) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    bench = BENCHES[key]
    entries = bench.input_entries("calib")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[Dict[str, np.ndarray]] = iter_feeds(entries, bench.model_path, bench.folder)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self.feeds, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    output = output.resolve()
    with tempfile.TemporaryDirectory(prefix="xquant-zoo-ort-") as tmp:
        # quant_pre_process and quantize_static leave temporary files (sym_shape_infer_temp.onnx,
        # <uuid>.data) in the working directory: keep them out of the repository
        os.chdir(tmp)
        source = upgrade_opset(bench.model_path, Path(tmp))
        if use_pre_process:
            source = pre_process(source, Path(tmp))
        else:
            print("zoo: quant_pre_process: not run (--no-pre-process)", flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(str(source), str(output), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(BENCHES))
    ap.add_argument("method", choices=("minmax", "percentile"))
    ap.add_argument("output", type=Path)
    ap.add_argument("--no-pre-process", action="store_true")
    args = ap.parse_args(argv)
    quantize(args.model, args.method, args.output, not args.no_pre_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
