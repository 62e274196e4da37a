"""Independent evaluator for the MobileNetV2 sample: FP32 vs INT8 ONNX models on labelled photos.

Usage::

    python samples/mobilenet_v2/evaluate.py --fp32 a.onnx --int8 b.onnx \
        [--images samples/material/eval] [--json out.json]

The photos are ``imagenet_NN_LABEL.jpg`` (NN: running index, LABEL: ImageNet-1k class index).
Preprocessing is this file's own reference implementation (numpy + OpenCV only), so that the
quantizer's preprocessors can be tested against it:

* :func:`reference_pt_imagenet` -- "PT_IMAGENET", torchvision style: short side resized to
  ``int(h / 0.875)`` with PIL's (antialiased) bilinear filter, re-implemented bit-exactly in
  numpy, centre crop with torchvision's rounding, 0-255 values, mean/std normalisation.
* :func:`reference_imagenet_cv` -- "IMAGENET", OpenCV style: aspect-preserving resize so that
  the crop is 87.5 % of the image (``cv2.INTER_AREA``), floor-rounded centre crop, normalisation.

Metrics: top-1 of each model against the labels, FP32/INT8 top-1 agreement, mean cosine of the
logits and mean logits SNR, ``sum((q - f)^2) / sum(f^2)`` per image (a noise-to-signal ratio:
lower is better, not dB).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

PathLike = Union[str, Path]
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "material" / "eval"
_LABELLED = re.compile(r"^imagenet_(\d+)_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)

# ------------------------------------------------------------------------------------------
# reference preprocessing

_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling


def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Fixed-point (out_size, in_size) weight matrix of Pillow's antialiased bilinear filter."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear (triangle) filter has support 1
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        xs = np.arange(xmin, xmax)
        k = np.clip(1.0 - np.abs((xs - center + 0.5) / filterscale), 0.0, None)
        total = k.sum()
        if total != 0.0:
            k = k / total
        # C: (int)(k < 0 ? trunc(-0.5 + k * 2^p) : trunc(0.5 + k * 2^p)); k >= 0 here
        weights[xx, xmin:xmax] = np.trunc(0.5 + k * (1 << _PIL_PRECISION_BITS)).astype(np.int64)
    return weights


def _pil_resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample a uint8 HWC image along ``axis`` (1: width, 0: height) like Pillow does."""
    weights = _pil_bilinear_weights(img.shape[axis], out_size).astype(np.float64)
    moved = np.moveaxis(img, axis, 0).astype(np.float64)  # (in, other, C)
    # integer sums stay far below 2**53, so the float64 (BLAS) product is exact
    acc = np.rint(np.tensordot(weights, moved, axes=([1], [0]))).astype(np.int64)
    acc = (acc + (1 << (_PIL_PRECISION_BITS - 1))) >> _PIL_PRECISION_BITS
    return np.moveaxis(np.clip(acc, 0, 255).astype(np.uint8), 0, axis)


def pil_bilinear_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow ``Image.resize((width, height), BILINEAR)`` for a uint8 HWC image, in numpy.

    Pillow filters horizontally first (rounding to uint8), then vertically; a pass is skipped
    when that size does not change.
    """
    out = img if img.ndim == 3 else img[:, :, None]
    if out.shape[1] != width:
        out = _pil_resample_axis(out, width, axis=1)
    if out.shape[0] != height:
        out = _pil_resample_axis(out, height, axis=0)
    return out if img.ndim == 3 else out[:, :, 0]


def read_image(path: PathLike, rgb: bool = True) -> np.ndarray:
    """Read a photo with OpenCV as uint8 HWC, 3 channels, RGB when ``rgb`` else BGR."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img


def _normalize_chw(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def reference_pt_imagenet(path: PathLike, h: int = 224, w: int = 224,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          rgb: bool = True, antialias: bool = True) -> np.ndarray:
    """PT_IMAGENET: torchvision ``Resize(int(h / 0.875))`` + ``CenterCrop((h, w))`` + normalise.

    The short side becomes ``int(h / 0.875)`` (256 for 224) and the long side
    ``int(short_target * long / short)`` (torchvision's rounding); bilinear resampling as Pillow
    does it (antialiased; ``antialias=False`` uses ``cv2.INTER_LINEAR`` instead); crop offsets
    ``int(round((size - crop) / 2.0))``; float32 0-255 values, ``(x - mean) / std``;
    returns (1, 3, h, w) float32.
    """
    img = read_image(path, rgb)
    ih, iw = img.shape[:2]
    short_target = int(h / 0.875)
    short, long = (ih, iw) if ih <= iw else (iw, ih)
    long_target = int(short_target * long / short)
    nh, nw = (short_target, long_target) if ih <= iw else (long_target, short_target)
    if antialias:
        img = pil_bilinear_resize(img, nw, nh)
    else:
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if h > nh or w > nw:
        raise ValueError(f"crop {h}x{w} larger than the resized image {nh}x{nw}")
    top = int(round((nh - h) / 2.0))
    left = int(round((nw - w) / 2.0))
    return _normalize_chw(img[top:top + h, left:left + w], mean, std)


def reference_imagenet_cv(path: PathLike, h: int = 224, w: int = 224,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          rgb: bool = True) -> np.ndarray:
    """IMAGENET: OpenCV-style aspect-preserving resize, centre crop, normalise.

    The crop is 87.5 % of the resized image: with ``th = int(h / 0.875)`` and
    ``tw = int(w / 0.875)``, a portrait photo (height > width) becomes
    ``tw x int(th * height / width)`` and any other ``int(tw * width / height) x th`` (w x h),
    resized with ``cv2.INTER_AREA``; the crop offsets are floored
    (``int((size - crop) / 2)``); float32 ``(x - mean) / std``; returns (1, 3, h, w).
    """
    img = read_image(path, rgb)
    ih, iw = img.shape[:2]
    th, tw = int(100.0 * h / 87.5), int(100.0 * w / 87.5)
    if ih > iw:
        nw, nh = tw, int(th * ih / iw)
    else:
        nw, nh = int(tw * iw / ih), th
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    if h > nh or w > nw:
        raise ValueError(f"crop {h}x{w} larger than the resized image {nh}x{nw}")
    top, left = int((nh - h) / 2), int((nw - w) / 2)
    return _normalize_chw(img[top:top + h, left:left + w], mean, std)


# ------------------------------------------------------------------------------------------
# evaluation


def labelled_images(folder: PathLike) -> List[Tuple[Path, int]]:
    """(path, ImageNet class index) for every ``imagenet_NN_LABEL.jpg`` in ``folder``, sorted."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        m = _LABELLED.match(p.name)
        if m:
            out.append((p, int(m.group(2))))
    return out


def _session(model: PathLike):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # exact int8 arithmetic, as the chip computes: no fused int8 kernels, which saturate on x86
    # CPUs without VNNI (xquant_core/runtime.py onnxruntime_session says more)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def run_logits(model: PathLike, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Run a one-input classifier on each (1, 3, H, W) input; return (N, classes) float64."""
    sess = _session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0].reshape(1, -1) for x in inputs]).astype(
        np.float64)


def compare_logits(fp32: np.ndarray, int8: np.ndarray, labels: Optional[Sequence[int]] = None
                   ) -> Dict[str, float]:
    """Top-1 accuracies, top-1 agreement, mean cosine and mean SNR of two (N, C) logit arrays."""
    f_top, q_top = fp32.argmax(1), int8.argmax(1)
    cos = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1) + 1e-12)
    snr = ((int8 - fp32) ** 2).sum(1) / ((fp32 ** 2).sum(1) + 1e-12)
    res = {
        "images": int(fp32.shape[0]),
        "top1_agreement": float(np.mean(f_top == q_top)),
        "logits_cosine": float(cos.mean()),
        "logits_snr": float(snr.mean()),
    }
    if labels is not None:
        lab = np.asarray(labels)
        res["fp32_top1"] = float(np.mean(f_top == lab))
        res["int8_top1"] = float(np.mean(q_top == lab))
    return res


def preprocess_folder(images: PathLike, h: int = 224, w: int = 224
                      ) -> Tuple[List[Path], List[int], List[np.ndarray]]:
    """Labelled photos of a folder preprocessed with :func:`reference_pt_imagenet`."""
    items = labelled_images(images)
    if not items:
        raise FileNotFoundError(f"no imagenet_NN_LABEL.jpg photos in {images}")
    paths = [p for p, _ in items]
    return paths, [lab for _, lab in items], [reference_pt_imagenet(p, h, w) for p in paths]


def fp32_top1(model: PathLike, images: PathLike = DEFAULT_IMAGES) -> float:
    """FP32 top-1 accuracy of one model on the labelled photos."""
    _, labels, inputs = preprocess_folder(images)
    return float(np.mean(run_logits(model, inputs).argmax(1) == np.asarray(labels)))


def evaluate(fp32_model: PathLike, int8_model: PathLike, images: PathLike = DEFAULT_IMAGES
             ) -> Dict[str, object]:
    """Compare an FP32 and an INT8 ONNX classifier on the labelled photos of ``images``."""
    paths, labels, inputs = preprocess_folder(images)
    f = run_logits(fp32_model, inputs)
    q = run_logits(int8_model, inputs)
    res: Dict[str, object] = dict(compare_logits(f, q, labels))
    res["per_image"] = [
        {"image": p.name, "label": lab, "fp32": int(fi), "int8": int(qi)}
        for p, lab, fi, qi in zip(paths, labels, f.argmax(1), q.argmax(1))
    ]
    res["fp32_model"], res["int8_model"] = str(fp32_model), str(int8_model)
    return res


def format_table(res: Dict[str, object]) -> str:
    """A small text table of the summary metrics."""
    rows = [("images", f"{res['images']}"),
            ("FP32 top-1", f"{100 * float(res['fp32_top1']):.1f} %"),
            ("INT8 top-1", f"{100 * float(res['int8_top1']):.1f} %"),
            ("FP32/INT8 top-1 agreement", f"{100 * float(res['top1_agreement']):.1f} %"),
            ("logits cosine (mean)", f"{float(res['logits_cosine']):.4f}"),
            ("logits SNR (mean, lower is better)", f"{float(res['logits_snr']):.4f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Compare FP32 and INT8 ONNX classifiers on labelled "
                                             "ImageNet photos (imagenet_NN_LABEL.jpg).")
    ap.add_argument("--fp32", required=True, type=Path, help="float ONNX model")
    ap.add_argument("--int8", required=True, type=Path, help="quantized ONNX model")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of labelled photos")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    res = evaluate(args.fp32, args.int8, args.images)
    print(format_table(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
