"""The zoo's models, by key, in the order they are built and run (YOLOv8n first: the face
models use its FP32 faces; the detector before the recogniser, which uses its FP32 boxes)."""
from __future__ import annotations

from typing import Dict

from .blazeface import BlazeFace
from .common import Bench
from .ocr_det import OcrDet
from .ocr_rec import OcrRec
from .onet import ONet
from .silero_vad import SileroVad
from .yolov8n import YoloV8n

BENCHES: Dict[str, Bench] = {b.key: b for b in (YoloV8n(), ONet(), OcrDet(), OcrRec(), SileroVad(), BlazeFace())}
