"""YOLOv8n (nudenet 3.4.2's ``320n.onnx``, Ultralytics export, 18 classes, opset 17).

Input ``images`` [N, 3, 320, 320]: RGB / 255, letterboxed with grey 114 (:func:`.preprocess.yolov8`).
Output ``output0`` [N, 22, 2100]: rows 0-3 are cx, cy, w, h in input pixels, rows 4-21 the 18
class scores (already sigmoid), one column per anchor point (40x40 + 20x20 + 10x10 = 2100).
Classes 1 and 12 are FACE_FEMALE and FACE_MALE: the zoo also uses the FP32 model's faces as the
known face regions for O-net and BlazeFace (:func:`face_boxes`).

Pitfall: ``output0`` is one Concat of the boxes (0-320 pixels) and the class probabilities (0-1);
a quantizer that puts one int8 scale on that output (onnxruntime does: ~1.26 per step) rounds
every score to 0 or 1.26. xquant keeps model outputs float, so each Concat input keeps its own
scale.

Calibration: the general photos (samples/material/calib + Debian darknet) and face-api's
sample1-3 with three crops each. Evaluation: face-api sample4-6 and ultralytics bus/zidane, each
whole and through five crops (30 inputs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from . import material, metrics, preprocess
from .common import Bench, preprocess_ref, session, write_list
from .paths import DATA

CONF = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
FACE_CLASSES = (1, 12)
SIZE = 320
CALIB_VIEWS = (material.FULL, (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0), (0.2, 0.2, 0.8, 0.8))
EVAL_VIEWS = (material.FULL, (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0), (0.2, 0.2, 0.8, 0.8),
              (0.0, 0.0, 1.0, 0.6), (0.15, 0.0, 0.85, 0.7))


def decode(output: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's [22, 2100] -> (boxes x1y1x2y2 [K, 4], scores [K], classes [K]) after the
    confidence threshold and per-class NMS."""
    rows = output.T
    classes = rows[:, 4:].argmax(axis=1)
    scores = rows[np.arange(len(rows)), 4 + classes]
    keep = scores >= CONF
    cx, cy, w, h = rows[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    scores, classes = scores[keep], classes[keep]
    kept = metrics.nms_per_class(boxes, scores, classes, NMS_IOU)
    return boxes[kept], scores[kept], classes[kept]


class YoloV8n(Bench):
    key = "yolov8n"
    title = "YOLOv8n (nudenet 320n, opset 17)"
    model_file = "yolov8n.onnx"
    origin = "PyPI nudenet 3.4.2, `nudenet/320n.onnx`, AGPL-3.0"
    headline = "FP32 boxes recalled"
    sources = ("calibration: the general photos (samples/material/calib + Debian darknet) and "
               "face-api sample1-3 (whole + 3 crops); evaluation: face-api sample4-6, ultralytics "
               "bus.jpg and zidane.jpg (whole + 5 crops each)")

    def entry(self, split: str) -> Dict:
        return {"input_name": "images", "input_shape": [1, 3, SIZE, SIZE], "file_type": "img",
                "color_format": "rgb", "mean_value": [0.0, 0.0, 0.0],
                "std_value": [255.0, 255.0, 255.0],
                "preprocess_file": preprocess_ref("yolov8", self.folder),
                "data_list_path": f"{split}/list.txt"}

    def input_entries(self, split: str) -> List[Dict]:
        return [self.entry(split)]

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.png")
            general = material.general_photos()
            calib = general + material.write_views(material.PEOPLE_CALIB, CALIB_VIEWS, self.folder / "calib")
            evaluation = material.write_views(material.PEOPLE_EVAL, EVAL_VIEWS, self.folder / "eval")
            material.check_disjoint(general + list(material.PEOPLE_CALIB), material.PEOPLE_EVAL, self.key)
            write_list(self.folder / "calib" / "list.txt", calib)
            write_list(self.folder / "eval" / "list.txt", evaluation)
            return calib + evaluation + [self.folder / s / "list.txt" for s in ("calib", "eval")]
        material.build_once(self.key, {"v": 1, "calib_views": CALIB_VIEWS, "eval_views": EVAL_VIEWS}, make)

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        recalled = total = 0
        ious: List[float] = []
        for f, q in zip(fp32, quant):
            fb, _, fc = decode(f[0][0])
            qb, _, qc = decode(q[0][0])
            matched = metrics.match_boxes((fb, fc), (qb, qc), MATCH_IOU)
            total += len(fb)
            recalled += len(matched)
            ious += matched
        score_snr = metrics.snr([f[0][0, 4:] for f in fp32], [q[0][0, 4:] for q in quant])
        box_snr = metrics.snr([f[0][0, :4] for f in fp32], [q[0][0, :4] for q in quant])
        return {"FP32 boxes recalled": f"{recalled}/{total} ({100.0 * recalled / max(total, 1):.1f} %)",
                "mean IoU of matched": f"{np.mean(ious):.3f}" if ious else "-",
                "class-score SNR": f"{score_snr:.4f}", "box SNR": f"{box_snr:.5f}"}


# ----------------------------------------------------------------------------------------------
# the FP32 model's faces, for the face models' material

FACES_JSON = DATA / "faces.json"


def _photo_faces(sess, photo: Path, min_score: float) -> List[List[float]]:
    """FP32 face boxes (x1, y1, x2, y2 in photo pixels, score) of one whole photo."""
    entry = YoloV8n().entry("calib")
    feed = preprocess.preprocess_one("yolov8", str(photo), dict(entry, input_shape=[1, 3, SIZE, SIZE]))
    boxes, scores, classes = decode(sess.run(None, {"images": feed})[0][0])
    height, width = material.read_bgr(photo).shape[:2]
    scale, _, _, top, left = preprocess.letterbox_geometry(SIZE, SIZE, (height, width))
    faces = []
    for box, score, cls in zip(boxes, scores, classes):
        if cls in FACE_CLASSES and score >= min_score:
            x1, y1, x2, y2 = (box - [left, top, left, top]) / scale
            faces.append([float(x1), float(y1), float(x2), float(y2), float(score)])
    return faces


def face_boxes(photos: List[Path], min_score: float = 0.4) -> Dict[str, List[List[float]]]:
    """``{photo name: [[x1, y1, x2, y2, score], ...]}`` found by FP32 YOLOv8n, cached in
    ``data/faces.json``."""
    cache: Dict[str, List[List[float]]] = {}
    if FACES_JSON.is_file():
        cache = json.loads(FACES_JSON.read_text())
    missing = [p for p in photos if f"{p.name}@{min_score}" not in cache]
    if missing:
        sess = session(YoloV8n().model_path)
        for photo in missing:
            cache[f"{photo.name}@{min_score}"] = _photo_faces(sess, photo, min_score)
        FACES_JSON.parent.mkdir(parents=True, exist_ok=True)
        FACES_JSON.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return {p.name: cache[f"{p.name}@{min_score}"] for p in photos}
