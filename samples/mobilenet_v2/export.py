"""Export the MobileNetV2 sample to ONNX and check it against PyTorch.

Usage::

    python samples/mobilenet_v2/export.py [--weights samples/material/weights/mobilenet_v2-b0353104.pth]
        [--output samples/mobilenet_v2/mobilenet_v2.onnx] [--images samples/material/eval] [--force]

Exports with ``torch.onnx.export`` (TorchScript exporter, opset 13, input ``input`` of shape
(1, 3, 224, 224), output ``logits``), checks that onnxruntime and PyTorch agree (max abs diff of
the logits < 1e-3) and prints the FP32 top-1 on the labelled evaluation photos. Skips the export
when the output exists and is newer than the weights (unless ``--force``).
Run ``python3 samples/fetch_material.py`` first.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MATERIAL = HERE.parent / "material"
DEFAULT_WEIGHTS = MATERIAL / "weights" / "mobilenet_v2-b0353104.pth"
DEFAULT_OUTPUT = HERE / "mobilenet_v2.onnx"
MAX_ABS_DIFF = 1e-3


def _load_sibling(name: str) -> ModuleType:
    """Import model.py / evaluate.py from this folder by path (samples is not a package)."""
    spec = importlib.util.spec_from_file_location(f"xquant_sample_mbv2_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def export_onnx(weights: Path, output: Path) -> torch.nn.Module:
    """Load the weights strictly and export the model to ``output``; return the torch model."""
    model = _load_sibling("model").load_mobilenet_v2(weights)
    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose (dynamo=False): silence its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(output), opset_version=13, dynamo=False,
                          input_names=["input"], output_names=["logits"])
    return model


def max_abs_diff(model: torch.nn.Module, onnx_path: Path, inputs: List[np.ndarray]) -> float:
    """Largest |torch - onnxruntime| over the logits of ``inputs``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():  # one batch: much faster than one torch call per image on CPU
        ref = model(torch.from_numpy(np.concatenate(inputs))).numpy()
    got = np.concatenate([sess.run(None, {"input": x})[0] for x in inputs])
    return float(np.abs(ref - got).max())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Export the MobileNetV2 sample to ONNX (opset 13).")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--images", type=Path, default=MATERIAL / "eval",
                    help="labelled photos for the FP32 top-1 check")
    ap.add_argument("--force", action="store_true", help="export even when the output is up to date")
    args = ap.parse_args(argv)

    if not args.weights.is_file():
        print(f"weights not found: {args.weights} (run python3 samples/fetch_material.py)",
              file=sys.stderr)
        return 1
    evaluate = _load_sibling("evaluate")
    up_to_date = (args.output.is_file()
                  and args.output.stat().st_mtime >= args.weights.stat().st_mtime)
    if up_to_date and not args.force:
        print(f"{args.output} is up to date (use --force to export again)")
        model = _load_sibling("model").load_mobilenet_v2(args.weights)
    else:
        model = export_onnx(args.weights, args.output)
        print(f"exported {args.output}")

    inputs = [np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)]
    have_images = args.images.is_dir() and evaluate.labelled_images(args.images)
    if have_images:
        paths, labels, photo_inputs = evaluate.preprocess_folder(args.images)
        inputs += photo_inputs
    diff = max_abs_diff(model, args.output, inputs)
    print(f"torch vs onnxruntime: max abs diff {diff:.2e} over {len(inputs)} inputs")
    if diff >= MAX_ABS_DIFF:
        print(f"ERROR: ONNX output differs from torch by {diff:.2e} >= {MAX_ABS_DIFF}",
              file=sys.stderr)
        return 1
    if have_images:
        top1 = evaluate.fp32_top1(args.output, args.images)
        print(f"FP32 top-1 on {len(paths)} labelled photos: {100 * top1:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
