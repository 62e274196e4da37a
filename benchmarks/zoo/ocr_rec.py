"""PP-OCRv4 text recogniser (rapidocr-onnxruntime 1.4.4's ``ch_PP-OCRv4_rec_infer.onnx``, SVTR).

Input ``x`` [N, 3, 48, W]: one text-line crop, BGR as cv2 reads it (rapidocr never converts),
resized to height 48 and width ``ceil(48 * w / h)`` (at most W), ``(x / 255 - 0.5) / 0.5``, zero
padding on the right (:func:`.preprocess.ocr_rec`). rapidocr makes W = 48 * max(320/48, widest
ratio in the batch); the zoo fixes W = 320 (rapidocr's width for any crop up to 6.7:1) and cuts
longer lines at the emptiest column first. Output ``softmax_11.tmp_0`` [N, 40, 6625]: per time
step the probabilities over rapidocr's table (index 0 = CTC blank, then the 6623 characters of the
model's ``character`` metadata, then " "); greedy CTC decoding (:func:`.metrics.ctc_greedy`).

Crops: FP32 detector boxes (:func:`.ocr_det.text_boxes`, rotated crops as rapidocr's
``get_rotate_crop_image``) of the OCR calibration / evaluation photos, plus DejaVu phrases rendered
on patches of photos (calibration: the general photos and CALIB_WORDS; evaluation: the people
evaluation photos and EVAL_WORDS).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np
import onnx

from . import material, metrics, ocr_det, preprocess
from .common import Bench, preprocess_ref, session, write_list

HEIGHT, WIDTH = 48, 320
MAX_RATIO = WIDTH / HEIGHT
MIN_CROP_HEIGHT = 8


def rotate_crop(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """rapidocr's ``get_rotate_crop_image``: perspective-warp a 4-point box upright; a box
    at least 1.5 times taller than wide is turned by 90 degrees."""
    rect = cv2.minAreaRect(points.astype(np.float32))
    pts = cv2.boxPoints(rect)
    pts = pts[np.argsort(pts[:, 0])]
    left = pts[:2][np.argsort(pts[:2, 1])]
    right = pts[2:][np.argsort(pts[2:, 1])]
    quad = np.array([left[0], right[0], right[1], left[1]], np.float32)  # tl, tr, br, bl
    w = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    h = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    out = cv2.warpPerspective(image, cv2.getPerspectiveTransform(quad, target), (max(w, 1), max(h, 1)),
                              borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(out) if out.shape[0] >= 1.5 * out.shape[1] else out


def split_line(image: np.ndarray, max_ratio: float = MAX_RATIO) -> List[np.ndarray]:
    """Cut a long line into pieces of at most ``max_ratio`` : 1, each cut at the column with
    the least ink between 60 % and 100 % of the allowed width (usually a word gap)."""
    pieces = []
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    ink = np.abs(grey - np.median(grey)).mean(axis=0)
    start, limit = 0, int(max_ratio * image.shape[0])
    while image.shape[1] - start > limit:
        window = ink[start + int(0.6 * limit):start + limit]
        cut = start + int(0.6 * limit) + int(np.argmin(window))
        pieces.append(image[:, start:cut])
        start = cut
    pieces.append(image[:, start:])
    return [p for p in pieces if p.shape[1] >= 4]


def detector_crops(photos: Sequence[Path], folder: Path, per_photo: int) -> List[Path]:
    """Crops of the FP32 detector's boxes on ``photos`` (long lines split), at most
    ``per_photo`` of each photo (evenly spaced in reading order), saved as PNG."""
    det = ocr_det.OcrDet()
    sess = session(det.model_path)
    params = ocr_det.entry(det.folder, "calib")
    out = []
    for photo in photos:
        image = material.read_bgr(photo)
        prob = sess.run(None, {"x": preprocess.preprocess_one("ocr_det", str(photo), params)})[0][0, 0]
        boxes = sorted(ocr_det.text_boxes(prob, image.shape[:2]), key=lambda b: (b[:, 1].min(), b[:, 0].min()))
        pieces = []
        for b, box in enumerate(boxes):
            line = rotate_crop(image, box)
            if line.shape[0] >= MIN_CROP_HEIGHT:
                pieces += [(f"{photo.stem}_box{b:02d}_{p}.png", piece) for p, piece in enumerate(split_line(line))]
        step = -(-len(pieces) // per_photo) if pieces else 1
        out += [material.save_png(folder / name, piece) for name, piece in pieces[::step]]
    return out


def rendered_crops(photos: Sequence[Path], words: Sequence[str], folder: Path, seed: int) -> List[Path]:
    """Each word rendered on a random patch of a photo (photos taken in turn), cropped to the
    text with a small random margin, as a detector box would be."""
    rng = np.random.default_rng(seed)
    out = []
    for k, word in enumerate(words):
        photo = photos[k % len(photos)]
        image = material.read_bgr(photo)
        ph = int(rng.integers(60, 120))
        pw = min(image.shape[1], int(ph * rng.uniform(3.5, 6.5)))
        x, y = int(rng.integers(0, image.shape[1] - pw + 1)), int(rng.integers(0, image.shape[0] - ph + 1))
        patch, (x1, y1, x2, y2) = material.render_text(image[y:y + ph, x:x + pw].copy(), word, rng,
                                                       (int(ph * 0.45), int(ph * 0.8)))
        m = rng.uniform(0.1, 0.3) * (y2 - y1)
        piece = material.crop(patch, (x1 - m, y1 - m, x2 + m, y2 + m))
        out.append(material.save_png(folder / f"word{k:02d}_{photo.stem}.png", piece))
    return out


class OcrRec(Bench):
    key = "ocr_rec"
    title = "PP-OCRv4 recogniser (SVTR, 48x320, CTC)"
    model_file = "ocr_rec.onnx"
    origin = "PyPI rapidocr-onnxruntime 1.4.4, `rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx`"
    headline = "INT8 string == FP32"
    sources = ("calibration: FP32-detector crops of OpenCV's document/word photos and 42 DejaVu "
               "phrases rendered on patches of the general photos; evaluation: FP32-detector crops "
               "of the scene-text evaluation photos and 38 other phrases rendered on patches of the "
               "people evaluation photos")

    def input_entries(self, split: str) -> List[Dict]:
        return [{"input_name": "x", "input_shape": [1, 3, HEIGHT, WIDTH], "file_type": "img",
                 "color_format": "bgr", "mean_value": [127.5, 127.5, 127.5],
                 "std_value": [127.5, 127.5, 127.5],
                 "preprocess_file": preprocess_ref("ocr_rec", self.folder),
                 "data_list_path": f"{split}/list.txt"}]

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.png")
            general = material.general_photos()
            calib = (detector_crops(material.TEXT_CALIB, self.folder / "calib", per_photo=16)
                     + rendered_crops(general, material.CALIB_WORDS, self.folder / "calib", seed=4))
            evaluation = (detector_crops(material.TEXT_EVAL, self.folder / "eval", per_photo=10)
                          + rendered_crops(material.PEOPLE_EVAL, material.EVAL_WORDS, self.folder / "eval", seed=5))
            material.check_disjoint(list(material.TEXT_CALIB) + general,
                                    list(material.TEXT_EVAL) + list(material.PEOPLE_EVAL), self.key)
            write_list(self.folder / "calib" / "list.txt", calib)
            write_list(self.folder / "eval" / "list.txt", evaluation)
            return calib + evaluation + [self.folder / s / "list.txt" for s in ("calib", "eval")]
        recipe = {"v": 2, "per_photo": [16, 10], "size": [HEIGHT, WIDTH], "det": [ocr_det.HEIGHT, ocr_det.WIDTH]}
        material.build_once(self.key, recipe, make)

    def characters(self) -> List[str]:
        return metrics.ctc_characters(onnx.load(str(self.model_path), load_external_data=False))

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        chars = self.characters()
        texts = [(metrics.ctc_greedy(f[0][0], chars), metrics.ctc_greedy(q[0][0], chars))
                 for f, q in zip(fp32, quant)]
        read = [(f, q) for f, q in texts if f.strip()]
        same = sum(f == q for f, q in read)
        return {"crops FP32 reads": f"{len(read)}/{len(texts)}",
                "INT8 string == FP32": f"{same}/{len(read)} ({100.0 * same / max(len(read), 1):.1f} %)",
                "example FP32 -> INT8 mismatch": next((f"'{f}' -> '{q}'" for f, q in read if f != q), "-")}
