"""One quantizer run, meant to be its own process: ``benchmarks/run.py`` starts one per method.

Usage (normally only called by ``run.py``)::

    python benchmarks/quantizers.py METHOD --config samples/mobilenet_v2/config.json \
        --list samples/material/calib/list.txt --steps 100 --output out.onnx --json out.json

METHOD is one of :data:`METHODS`. Every method gets the same photos (the list file) and, for
the peers, the preprocessing that the sample config names, computed by the MobileNetV2
sample's independent reference implementation (``samples/mobilenet_v2/evaluate.py``), which
xquant's own preprocessors are tested against. The JSON written at the end holds the
quantization wall time measured in this process (reading and preprocessing the photos,
calibration, export; not the interpreter start and imports, which ``run.py`` sees in the
process time), the number of calibration samples used and the warnings logged.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EVALUATOR = REPO / "samples" / "mobilenet_v2" / "evaluate.py"


def load_evaluator() -> ModuleType:
    """The sample's reference preprocessing and metrics, imported by path."""
    name = "xquant_bench_reference_evaluate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EVALUATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_list(list_path: Path) -> List[Path]:
    """The photos of a list file (one path a line, relative to the list's folder)."""
    lines = [ln.strip() for ln in list_path.read_text().splitlines()]
    return [(list_path.parent / ln).resolve() for ln in lines if ln and not ln.startswith("#")]


def input_spec(config: Dict) -> Dict:
    """The first (only) input of a sample config."""
    return config["calibration_parameters"]["input_parametres"][0]


def pillow_pt_imagenet(path: Path, h: int, w: int, mean, std, rgb: bool) -> np.ndarray:
    """PT_IMAGENET with Pillow's C resampler: the reference's numbers, ~50x faster.

    ``evaluate.reference_pt_imagenet`` re-implements Pillow's bilinear filter in numpy (to test
    xquant against it) and is slow on big photos; timing the peers with it would be unfair, since
    xquant's own preprocessor calls Pillow. ``run.py`` checks that both give the same tensors.
    """
    from PIL import Image

    ev = load_evaluator()
    img = ev.read_image(path, rgb)
    ih, iw = img.shape[:2]
    short_target = int(h / 0.875)
    short, long = (ih, iw) if ih <= iw else (iw, ih)
    long_target = int(short_target * long / short)
    nh, nw = (short_target, long_target) if ih <= iw else (long_target, short_target)
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    return ev._normalize_chw(img[top:top + h, left:left + w], mean, std)


def reference_preprocess(config: Dict, fast: bool = True) -> Callable[[Path], np.ndarray]:
    """path -> (1, C, H, W) float32, as the config's preprocessing says.

    ``fast``: PT_IMAGENET through Pillow (:func:`pillow_pt_imagenet`, same numbers), else the
    sample's reference code itself.
    """
    ev = load_evaluator()
    spec = input_spec(config)
    _, _, h, w = spec["input_shape"]
    mean, std = spec["mean_value"], spec["std_value"]
    rgb = spec.get("color_format", "bgr") == "rgb"
    kind = spec.get("preprocess_file", "none")
    if kind == "PT_IMAGENET" and fast:
        return lambda p: pillow_pt_imagenet(p, h, w, mean, std, rgb)
    if kind == "PT_IMAGENET":
        return lambda p: ev.reference_pt_imagenet(p, h, w, mean=mean, std=std, rgb=rgb)
    if kind == "IMAGENET":
        return lambda p: ev.reference_imagenet_cv(p, h, w, mean=mean, std=std, rgb=rgb)
    raise ValueError(f"benchmark has no reference for preprocess_file {kind!r}")


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


# ------------------------------------------------------------------------------------------
# the quantizers


def run_xquant(args, config: Dict, photos: List[Path], calibration_type: str) -> Dict:
    import xquant

    cfg = json.loads(json.dumps(config))
    cfg["model_parameters"].update(onnx_model=str(args.model), working_dir=str(args.output.parent),
                                   output_prefix=args.output.stem)
    cfg["calibration_parameters"]["calibration_step"] = args.steps
    cfg["calibration_parameters"]["calibration_type"] = calibration_type
    input_spec(cfg)["data_list_path"] = str(args.list.resolve())
    xquant.quantize_onnx_model(cfg, output=args.output)
    report = args.output.parent / f"{args.output.stem}_report.md"
    return {"samples": min(args.steps, len(photos)), "analysis_report": report.is_file(),
            "settings": f"calibration_type {calibration_type}, finetune_level "
                        f"{cfg['quantization_parameters'].get('finetune_level', 1)}, analysis_enable "
                        f"{cfg['quantization_parameters'].get('analysis_enable', True)}"}


def run_onnxruntime(args, config: Dict, photos: List[Path], method: str) -> Dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    preprocess = reference_preprocess(config)
    name = input_spec(config)["input_name"]
    used = photos[:args.steps]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(used)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            path = next(self._items, None)
            return None if path is None else {name: preprocess(path)}

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(str(args.model), str(args.output), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calibrate)
    return {"samples": len(used),
            "settings": f"quantize_static QDQ, per_channel, QInt8 activations+weights, "
                        f"CalibrationMethod.{calibrate.name} (ORT defaults otherwise)"}


def run_ppq(args, config: Dict, photos: List[Path]) -> Dict:
    from xquant_core.engine.backend.compat import import_ppq

    import_ppq()
    import torch
    from ppq import QuantizationSettingFactory, TargetPlatform
    from ppq.api import export_ppq_graph, quantize_onnx_model

    preprocess = reference_preprocess(config)
    used = photos[:args.steps]
    batches = [torch.from_numpy(preprocess(p)) for p in used]
    steps = len(batches)
    if not 8 <= steps <= 512:
        raise ValueError(f"PPQ needs calib_steps in [8, 512], got {steps}")
    setting = QuantizationSettingFactory.default_setting()
    setting.quantize_activation_setting.calib_algorithm = "kl"
    graph = quantize_onnx_model(onnx_import_file=str(args.model), calib_dataloader=batches,
                                calib_steps=steps, input_shape=list(batches[0].shape),
                                platform=TargetPlatform.ONNXRUNTIME, setting=setting,
                                collate_fn=lambda x: x.to("cpu"), device="cpu")
    export_ppq_graph(graph, platform=TargetPlatform.ONNXRUNTIME, graph_save_to=str(args.output))
    return {"samples": steps,
            "settings": "quantize_onnx_model, TargetPlatform.ONNXRUNTIME, default_setting(), "
                        "activation calib_algorithm 'kl', export_ppq_graph"}


METHODS: Dict[str, Callable] = {
    "xquant-default": lambda a, c, p: run_xquant(a, c, p, "default"),
    "xquant-minmax": lambda a, c, p: run_xquant(a, c, p, "minmax"),
    "ort-minmax": lambda a, c, p: run_onnxruntime(a, c, p, "minmax"),
    "ort-percentile": lambda a, c, p: run_onnxruntime(a, c, p, "percentile"),
    "ort-entropy": lambda a, c, p: run_onnxruntime(a, c, p, "entropy"),
    "ppq-kl": run_ppq,
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=sorted(METHODS))
    ap.add_argument("--config", type=Path, required=True, help="the sample's xquant config")
    ap.add_argument("--model", type=Path, required=True, help="float ONNX model")
    ap.add_argument("--list", type=Path, required=True, help="calibration photo list")
    ap.add_argument("--steps", type=int, default=100, help="calibration samples asked for")
    ap.add_argument("--output", type=Path, required=True, help="quantized ONNX model to write")
    ap.add_argument("--json", type=Path, required=True, help="result record to write")
    args = ap.parse_args(argv)

    if not args.method.startswith("ort-"):  # onnxruntime's quantizer does not need torch
        import torch

        torch.set_num_threads(1)  # a 2-core machine: competing OpenMP threads are 10x slower
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    logging.getLogger().setLevel(logging.WARNING)
    config = json.loads(args.config.read_text())
    photos = read_list(args.list)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    record = METHODS[args.method](args, config, photos)
    record["quantize_s"] = time.perf_counter() - started
    record.update(method=args.method, output=str(args.output), warnings=warnings.messages,
                  listed=len(photos), pid=os.getpid())
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
