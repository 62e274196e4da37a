"""Where the zoo's code, fetched material and generated data live."""
from __future__ import annotations

from pathlib import Path

ZOO = Path(__file__).resolve().parent  # benchmarks/zoo (the code)
BENCHMARKS = ZOO.parent
REPO = BENCHMARKS.parent
MATERIAL = BENCHMARKS / "material"  # everything fetched or generated (not committed)
MODELS = MATERIAL / "models"
PHOTOS = MATERIAL / "photos"
DATA = MATERIAL / "data"  # per-model calibration/evaluation inputs and configs
WORK = MATERIAL / "work"  # quantized models, logs
SAMPLE_PHOTOS = REPO / "samples" / "material" / "calib"  # the general photos of samples/
PREPROCESS = ZOO / "preprocess.py"  # the custom preprocess functions the configs name
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
XQUANT = REPO / ".venv" / "bin" / "xquant"
