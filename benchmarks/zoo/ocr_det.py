"""PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4's ``ch_PP-OCRv4_det_infer.onnx``, DB head).

Input ``x`` [N, 3, H, W] with H, W multiples of 32: BGR, ``(x / 255 - mean) / std`` with
ImageNet's mean/std (PaddleOCR's NormalizeImage; note that rapidocr 1.4.4 itself configures
mean = std = 0.5 for it). The zoo fixes the size at 480 x 640 and letterboxes every photo into it
(:func:`.preprocess.ocr_det`; rapidocr instead resizes the short side to 736 and rounds to 32).
Output ``sigmoid_0.tmp_0`` [N, 1, H, W]: the text probability map, thresholded at 0.3 (rapidocr's
``thresh``). Weights are stored as Constant nodes, not initializers.

:func:`text_boxes` is a compact DB post-processing (threshold, 2x2 dilation, contours, min-area
rectangles, box score >= 0.5, unclip 1.6), used to cut the recogniser's crops out of FP32 maps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

from . import material, metrics, preprocess
from .common import Bench, preprocess_ref, write_list

HEIGHT, WIDTH = 480, 640
THRESH = 0.3
BOX_THRESH = 0.5
UNCLIP = 1.6
MEAN = [123.675, 116.28, 103.53]  # 255 * (0.485, 0.456, 0.406), applied to B, G, R as Paddle does
STD = [58.395, 57.12, 57.375]
EVAL_VIEWS = (material.FULL, (0.0, 0.0, 0.65, 1.0), (0.35, 0.0, 1.0, 1.0))
PHRASES_PER_PHOTO = 3


def entry(folder: Path, split: str) -> Dict:
    """The detector's input description (also used to run it on photos for the recogniser)."""
    return {"input_name": "x", "input_shape": [1, 3, HEIGHT, WIDTH], "file_type": "img",
            "color_format": "bgr", "mean_value": MEAN, "std_value": STD,
            "preprocess_file": preprocess_ref("ocr_det", folder), "data_list_path": f"{split}/list.txt"}


def render_phrases(photos: Sequence[Path], words: Sequence[str], folder: Path, seed: int) -> List[Path]:
    """Each photo with :data:`PHRASES_PER_PHOTO` phrases rendered on it (words taken in turn)."""
    rng = np.random.default_rng(seed)
    out, k = [], 0
    for photo in photos:
        image = material.read_bgr(photo)
        scale = max(image.shape[:2]) / WIDTH  # text 14-40 px high once letterboxed
        for _ in range(PHRASES_PER_PHOTO):
            image, _ = material.render_text(image, words[k % len(words)], rng,
                                            (int(14 * scale) + 2, int(40 * scale) + 3))
            k += 1
        out.append(material.save_png(folder / f"{photo.stem}_text.png", image))
    return out


def text_boxes(prob: np.ndarray, image_hw) -> List[np.ndarray]:
    """DB post-processing of one [H, W] map -> 4-point boxes (float32 [4, 2]) in the pixels of
    the original photo (the letterbox undone)."""
    mask = cv2.dilate((prob > THRESH).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale, _, _, top, left = preprocess.letterbox_geometry(HEIGHT, WIDTH, image_hw)
    boxes = []
    for contour in contours:
        (cx, cy), (w, h), angle = cv2.minAreaRect(contour)
        if min(w, h) < 3:
            continue
        region = np.zeros_like(mask)
        cv2.fillPoly(region, [contour.reshape(-1, 2)], 1)
        if prob[region.astype(bool)].mean() < BOX_THRESH:
            continue
        grow = w * h * UNCLIP / (2 * (w + h))  # the unclip offset distance of a rectangle
        points = cv2.boxPoints(((cx, cy), (w + 2 * grow, h + 2 * grow), angle))
        boxes.append(((points - [left, top]) / scale).astype(np.float32))
    return boxes


class OcrDet(Bench):
    key = "ocr_det"
    title = "PP-OCRv4 detector (DB, 480x640)"
    model_file = "ocr_det.onnx"
    origin = "PyPI rapidocr-onnxruntime 1.4.4, `rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx`"
    headline = "text-map IoU (all photos)"
    sources = ("calibration: OpenCV's document/word photos (imageTextN, text_defocus, sudoku, "
               "scenetext_word01-04) and the general photos with 3 DejaVu phrases rendered on each; "
               "evaluation: OpenCV's scene-text photos scenetext01-06, scenetext_segmented_word01-05, "
               "imageTextR, text_motion (whole + 2 crops each)")

    def input_entries(self, split: str) -> List[Dict]:
        return [entry(self.folder, split)]

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.png")
            general = material.general_photos()
            rendered = render_phrases(general, material.CALIB_WORDS, self.folder / "calib", seed=3)
            calib = list(material.TEXT_CALIB) + rendered
            evaluation = material.write_views(material.TEXT_EVAL, EVAL_VIEWS, self.folder / "eval")
            material.check_disjoint(list(material.TEXT_CALIB) + general, material.TEXT_EVAL, self.key)
            write_list(self.folder / "calib" / "list.txt", calib)
            write_list(self.folder / "eval" / "list.txt", evaluation)
            return calib + evaluation + [self.folder / s / "list.txt" for s in ("calib", "eval")]
        material.build_once(self.key, {"v": 1, "size": [HEIGHT, WIDTH], "views": EVAL_VIEWS,
                                       "phrases": PHRASES_PER_PHOTO}, make)

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        inter_total = union_total = 0
        per_photo = []
        for f, q in zip(fp32, quant):
            inter, union = metrics.mask_iou(f[0] > THRESH, q[0] > THRESH)
            inter_total, union_total = inter_total + inter, union_total + union
            if union:
                per_photo.append(inter / union)
        return {"text-map IoU (all photos)": f"{inter_total / max(union_total, 1):.4f}",
                "mean IoU per photo": f"{np.mean(per_photo):.4f}" if per_photo else "-",
                "FP32 text pixels": str(int(sum((f[0] > THRESH).sum() for f in fp32)))}
