"""Compare an INT8 detector with its FP32 original on real photos: boxes, scores and raw output.

Usage::

    python samples/detector/evaluate.py --fp32 samples/material/detector/common_det.onnx \
        --int8 truncated=samples/detector/output/common_det.q.onnx [--int8 NAME=PATH ...] \
        [--images DIR ...] [--score 0.3] [--json out.json]

The model is ddddocr's YOLOX-style character detector (416x416 BGR 0-255 input, output
``[1, 3549, 6]``). Its graph ends with the *un-decoded* head: per anchor ``(dx, dy, log w, log h,
objectness, class)``, objectness and class already through a Sigmoid. The grid/stride decode
lives outside the graph, in ddddocr's ``demo_postprocess``; :func:`decode` re-implements it:

* anchors: strides 8, 16, 32 -> 52x52 + 26x26 + 13x13 = 3549 cells, row-major (y, then x);
* centre = (d + grid) * stride, size = exp(log size) * stride, score = objectness * class
  (one class), exactly as ddddocr's ``get_bbox``.

Then boxes above ``--score`` go through greedy NMS (IoU 0.45, ddddocr's value) and the INT8
boxes are matched to the FP32 boxes one-to-one, greedily by IoU (best pair first). Per photo
and overall it reports: FP32 boxes, INT8 boxes, FP32 boxes matched at IoU >= 0.5, the mean IoU
and mean |score difference| of the matches; threshold-free, the AP50 of the INT8 detections
(down to score 0.05) with the FP32 boxes as ground truth, the share of FP32 boxes the INT8 model
finds at any score and the median INT8/FP32 score ratio; and the raw output's SNR
``sum((q - f)^2) / sum(f^2)`` (lower is better, not dB) and cosine, for the box columns
(0-3) and the score columns (4-5) apart.

Preprocessing (``--preprocess``): ``letterbox`` (default) is ddddocr's own (aspect kept,
``INTER_LINEAR``, grey 114 padding bottom/right); ``resize`` is xquant's ``preprocess_file:
None`` (plain ``INTER_AREA`` resize to 416x416), what the sample's calibration uses.

Only numpy, OpenCV and onnxruntime are needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

PathLike = Union[str, Path]
HERE = Path(__file__).resolve().parent
MATERIAL = HERE.parent / "material"
DEFAULT_IMAGES = (MATERIAL / "detector" / "eval", MATERIAL / "eval")
SIZE = 416
STRIDES = (8, 16, 32)
NMS_IOU = 0.45  # ddddocr's nms_thr
MATCH_IOU = 0.5
AP_MIN_SCORE = 0.05  # INT8 detections ranked for the AP against the FP32 boxes
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# ------------------------------------------------------------------------------------------
# preprocessing


def letterbox(img: np.ndarray, size: int = SIZE) -> Tuple[np.ndarray, float]:
    """ddddocr's ``preproc``: keep the aspect ratio, INTER_LINEAR, pad with 114 bottom/right."""
    ratio = min(size / img.shape[0], size / img.shape[1])
    h, w = int(img.shape[0] * ratio), int(img.shape[1] * ratio)
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[:h, :w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return padded, ratio


def plain_resize(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """xquant's ``none`` preprocessing for an img input: INTER_AREA resize to size x size."""
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def load_input(path: PathLike, mode: str = "letterbox") -> np.ndarray:
    """A photo as the model's input: float32 [1, 3, 416, 416], BGR, 0-255."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    if mode == "letterbox":
        img = letterbox(img)[0]
    elif mode == "resize":
        img = plain_resize(img)
    else:
        raise ValueError(f"unknown preprocessing {mode!r} (letterbox or resize)")
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)


def photos(folders: Sequence[PathLike]) -> List[Path]:
    out: List[Path] = []
    for folder in folders:
        out += sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    return out


# ------------------------------------------------------------------------------------------
# decode, NMS, matching


def _grid(size: int = SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """(cells [N, 2] as x, y) and (strides [N, 1]) in the model's anchor order."""
    grids, strides = [], []
    for stride in STRIDES:
        n = size // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def decode(output: np.ndarray, score_threshold: float, decoded: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Raw ``[1, 3549, 6]`` (or ``[3549, 6]``) output -> (boxes xyxy [K, 4] in input pixels,
    scores [K]) of the anchors scoring above ``score_threshold``, before NMS.

    ``decoded``: the model already decoded the boxes (``add_decode.py``: cx, cy, w, h in pixels).
    """
    pred = output.reshape(-1, 6).astype(np.float64)
    grid, stride = _grid()
    if len(pred) != len(grid):
        raise ValueError(f"expected {len(grid)} anchors, got {len(pred)}")
    if decoded:
        centre, wh = pred[:, :2], pred[:, 2:4]
    else:
        centre = (pred[:, :2] + grid) * stride
        wh = np.exp(np.minimum(pred[:, 2:4], 20.0)) * stride  # clamp only guards against overflow
    scores = pred[:, 4] * pred[:, 5]
    keep = scores > score_threshold
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1)
    return boxes[keep], scores[keep]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, [len(a), len(b)]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy NMS; the kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        overlap = iou_matrix(boxes[best:best + 1], boxes[order[1:]])[0]
        order = order[1:][overlap <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def detect(output: np.ndarray, score_threshold: float, decoded: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Decoded boxes and scores after the score threshold and NMS, best first."""
    boxes, scores = decode(output, score_threshold, decoded)
    keep = nms(boxes, scores)
    return (boxes[keep], scores[keep]) if len(keep) else (np.zeros((0, 4)), np.zeros(0))


def match(fp_boxes: np.ndarray, q_boxes: np.ndarray, min_iou: float = MATCH_IOU) -> List[Tuple[int, int, float]]:
    """One-to-one matching, best IoU pair first; (fp index, int8 index, IoU) with IoU >= min_iou."""
    ious = iou_matrix(fp_boxes, q_boxes)
    pairs = []
    while ious.size and ious.max() >= min_iou:
        i, j = np.unravel_index(int(np.argmax(ious)), ious.shape)
        pairs.append((int(i), int(j), float(ious[i, j])))
        ious[i, :] = -1.0
        ious[:, j] = -1.0
    return pairs


def snr_cosine(fp: np.ndarray, q: np.ndarray) -> Tuple[float, float]:
    f, d = fp.astype(np.float64).ravel(), q.astype(np.float64).ravel()
    snr = float(np.sum((d - f) ** 2) / max(np.sum(f ** 2), 1e-30))
    cosine = float(f @ d / max(np.linalg.norm(f) * np.linalg.norm(d), 1e-30))
    return snr, cosine


def compare_outputs(fp: np.ndarray, q: np.ndarray, score_threshold: float,
                    decoded: bool = False) -> Dict[str, float]:
    """Box agreement and raw-output error of one photo's two ``[1, 3549, 6]`` outputs."""
    fp_boxes, fp_scores = detect(fp, score_threshold, decoded)
    q_boxes, q_scores = detect(q, score_threshold, decoded)
    pairs = match(fp_boxes, q_boxes)
    fp2, q2 = fp.reshape(-1, 6), q.reshape(-1, 6)
    snr_box, cos_box = snr_cosine(fp2[:, :4], q2[:, :4])
    snr_score, cos_score = snr_cosine(fp2[:, 4:], q2[:, 4:])
    # threshold-free agreement: every INT8 detection down to AP_MIN_SCORE, ranked by score
    all_boxes, all_scores = detect(q, AP_MIN_SCORE, decoded)
    found = match(fp_boxes, all_boxes)
    ranked = {j: i for i, j, _ in found}
    ratios = [float(all_scores[j] / fp_scores[i]) for i, j, _ in found]
    return {
        "ap_detections": [(float(all_scores[j]), j in ranked) for j in range(len(all_boxes))],
        "score_ratios": ratios + [0.0] * (len(fp_boxes) - len(found)),
        "fp32_boxes": len(fp_boxes), "int8_boxes": len(q_boxes), "matched": len(pairs),
        "iou_sum": sum(p[2] for p in pairs),
        "score_diff_sum": float(sum(abs(fp_scores[i] - q_scores[j]) for i, j, _ in pairs)),
        "snr_box": snr_box, "cos_box": cos_box, "snr_score": snr_score, "cos_score": cos_score,
    }


def summarize(rows: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Totals over photos: counts summed, IoU/score differences averaged over all matches,
    SNR/cosine averaged over photos."""
    total = {key: float(sum(row[key] for row in rows))
             for key in ("fp32_boxes", "int8_boxes", "matched", "iou_sum", "score_diff_sum")}
    matched = max(total["matched"], 1.0)
    out = {"photos": len(rows), "fp32_boxes": int(total["fp32_boxes"]), "int8_boxes": int(total["int8_boxes"]),
           "matched": int(total["matched"]),
           "recall": total["matched"] / total["fp32_boxes"] if total["fp32_boxes"] else 1.0,
           "precision": total["matched"] / total["int8_boxes"] if total["int8_boxes"] else 1.0,
           "mean_iou": total["iou_sum"] / matched if total["matched"] else float("nan"),
           "mean_score_diff": total["score_diff_sum"] / matched if total["matched"] else float("nan")}
    for key in ("snr_box", "cos_box", "snr_score", "cos_score"):
        out[key] = float(np.mean([row[key] for row in rows])) if rows else float("nan")
    ratios = np.array([ratio for row in rows for ratio in row["score_ratios"]])
    out["found_any_score"] = float(np.mean(ratios > 0)) if len(ratios) else 1.0
    out["score_ratio_median"] = float(np.median(ratios)) if len(ratios) else float("nan")
    out["ap50"] = average_precision([d for row in rows for d in row["ap_detections"]], int(total["fp32_boxes"]))
    return out


def average_precision(detections: Sequence[Tuple[float, bool]], positives: int) -> float:
    """AP (all-point interpolation, as in PASCAL VOC 2010+) of detections ``(score, is a match)``
    against ``positives`` ground-truth boxes: here the FP32 boxes are the ground truth."""
    if not positives:
        return float("nan")
    order = sorted(detections, key=lambda d: -d[0])
    hits = np.cumsum([hit for _, hit in order], dtype=np.float64)
    precision = hits / np.arange(1, len(order) + 1)
    recall = hits / positives
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(order) else precision
    previous = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous) * envelope))


# ------------------------------------------------------------------------------------------
# running the models


def session(model: Union[PathLike, bytes]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    # exact int8 arithmetic, as the chip computes: no fused int8 kernels, which saturate on x86
    # CPUs without VNNI (xquant_core/runtime.py onnxruntime_session says more)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_outputs(model, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x})[0] for x in inputs]


def evaluate(fp32_model, int8_models: Dict[str, object], images: Sequence[PathLike] = DEFAULT_IMAGES,
             score_threshold: float = 0.3, preprocess: str = "letterbox",
             decoded: bool = False) -> Dict[str, object]:
    """Compare each INT8 model with the FP32 model on every photo of ``images`` (folders).

    ``decoded``: all the models output decoded boxes (``add_decode.py``), not the raw head."""
    paths = photos(images)
    inputs = [load_input(p, preprocess) for p in paths]
    reference = run_outputs(fp32_model, inputs)
    result: Dict[str, object] = {"score_threshold": score_threshold, "preprocess": preprocess,
                                 "decoded": decoded, "photos": [str(p) for p in paths], "models": {}}
    for name, model in int8_models.items():
        outputs = run_outputs(model, inputs)
        rows = [compare_outputs(f, q, score_threshold, decoded) for f, q in zip(reference, outputs)]
        result["models"][name] = {"per_photo": rows, "overall": summarize(rows)}
    return result


def format_table(result: Dict[str, object]) -> str:
    names = list(result["models"])
    header = (f"score > {result['score_threshold']}, NMS IoU {NMS_IOU}, match IoU >= {MATCH_IOU}, "
              f"preprocess {result['preprocess']}, "
              f"{'boxes decoded in the graph' if result['decoded'] else 'raw head, decoded in numpy'}")
    lines = [header,
             "| photo | FP32 boxes | " + " | ".join(f"{n}: matched / INT8 boxes, mean IoU, mean abs score diff, "
                                                   "SNR box / score" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]

    def cells(row) -> str:
        iou = row["iou_sum"] / row["matched"] if row["matched"] else float("nan")
        ds = row["score_diff_sum"] / row["matched"] if row["matched"] else float("nan")
        return (f"{row['matched']} / {row['int8_boxes']}, {iou:.3f}, {ds:.3f}, "
                f"{row['snr_box']:.4f} / {row['snr_score']:.4f}")

    for index, photo in enumerate(result["photos"]):
        rows = [result["models"][n]["per_photo"][index] for n in names]
        lines.append(f"| {Path(photo).name} | {rows[0]['fp32_boxes']} | " + " | ".join(cells(r) for r in rows) + " |")
    lines.append("")
    lines.append("| model | photos | FP32 boxes | INT8 boxes | matched (recall) | precision | mean IoU | "
                 "mean abs score diff | AP50 vs FP32 | found at any score | median score ratio | "
                 "SNR box | cos box | SNR score | cos score |")
    lines.append("|---" * 15 + "|")
    for n in names:
        o = result["models"][n]["overall"]
        lines.append(f"| {n} | {o['photos']} | {o['fp32_boxes']} | {o['int8_boxes']} | {o['matched']} "
                     f"({o['recall']:.1%}) | {o['precision']:.1%} | {o['mean_iou']:.3f} | "
                     f"{o['mean_score_diff']:.4f} | {o['ap50']:.3f} | {o['found_any_score']:.1%} | "
                     f"{o['score_ratio_median']:.3f} | {o['snr_box']:.4f} | {o['cos_box']:.4f} | "
                     f"{o['snr_score']:.4f} | {o['cos_score']:.4f} |")
    return "\n".join(lines)


def _named(text: str) -> Tuple[str, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep else (Path(text).stem, Path(text))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Compare FP32 and INT8 [1,3549,6] YOLOX-style detectors "
                                             "(boxes after decode + NMS, raw output SNR/cosine)")
    ap.add_argument("--fp32", required=True, type=Path, help="float ONNX model")
    ap.add_argument("--int8", required=True, action="append", type=_named, metavar="[NAME=]PATH",
                    help="quantized ONNX model (repeatable)")
    ap.add_argument("--images", type=Path, action="append", default=None,
                    help="folder of photos (repeatable; default: material/detector/eval and material/eval)")
    ap.add_argument("--score", type=float, default=0.3, help="score (objectness x class) threshold")
    ap.add_argument("--preprocess", choices=("letterbox", "resize"), default="letterbox")
    ap.add_argument("--decoded", action="store_true",
                    help="the models decode the boxes in the graph (add_decode.py's common_det_decode.onnx)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    result = evaluate(args.fp32, dict(args.int8), args.images or DEFAULT_IMAGES, args.score, args.preprocess,
                      args.decoded)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
