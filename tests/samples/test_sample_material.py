"""Tests of the sample material (samples/fetch_material.py) and of the MobileNetV2 sample's
independent evaluator and reference preprocessing (samples/mobilenet_v2/).

The material tests skip when ``samples/material`` has not been fetched
(``python3 samples/fetch_material.py``); the exported-model test skips when
``samples/mobilenet_v2/mobilenet_v2.onnx`` is absent (``python samples/mobilenet_v2/export.py``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "mobilenet_v2"
MATERIAL = ROOT / "samples" / "material"
WEIGHTS = MATERIAL / "weights" / "mobilenet_v2-b0353104.pth"
ONNX_MODEL = SAMPLE / "mobilenet_v2.onnx"
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def evaluate(sample_module) -> ModuleType:
    pytest.importorskip("cv2")
    pytest.importorskip("numpy")
    return sample_module("mobilenet_v2/evaluate.py")


def _need_material() -> None:
    if not (MATERIAL / "eval").is_dir() or not (MATERIAL / "calib").is_dir():
        pytest.skip("samples/material not fetched (run: python3 samples/fetch_material.py)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# reference preprocessing (no material needed)


def _write_image(path: Path, bgr) -> Path:
    import cv2

    assert cv2.imwrite(str(path), bgr)
    return path


def test_pt_imagenet_constant_image_normalises_exactly(evaluate, tmp_path):
    import numpy as np

    bgr = np.zeros((300, 500, 3), np.uint8)
    bgr[:] = (10, 120, 240)  # B, G, R
    x = evaluate.reference_pt_imagenet(_write_image(tmp_path / "c.png", bgr))
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    rgb = np.array([240, 120, 10], np.float32)
    expected = (rgb - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(x[0].reshape(3, -1).mean(1), expected, rtol=0, atol=1e-6)
    assert float(x.std(axis=(2, 3)).max()) < 1e-6
    bgr_x = evaluate.reference_pt_imagenet(tmp_path / "c.png", rgb=False)
    np.testing.assert_allclose(bgr_x[0, 0, 0, 0], (10 - MEAN[0]) / STD[0], atol=1e-6)


def test_pt_imagenet_geometry_matches_torchvision_rounding(evaluate, tmp_path):
    """A horizontal ramp reveals the resize width and the crop offset."""
    import numpy as np

    h, w = 300, 501  # Resize(256): 256 x int(256 * 501 / 300) = 256 x 427; crop left = round(101.5) = 102
    ramp = np.tile(np.arange(w, dtype=np.float64) * 255.0 / (w - 1), (h, 1))
    gray = np.repeat(np.round(ramp).astype(np.uint8)[:, :, None], 3, axis=2)
    x = evaluate.reference_pt_imagenet(_write_image(tmp_path / "r.png", gray), mean=(0, 0, 0),
                                       std=(1, 1, 1), antialias=False)
    import cv2

    resized = cv2.resize(gray, (427, 256), interpolation=cv2.INTER_LINEAR)
    top, left = int(round((256 - 224) / 2.0)), int(round((427 - 224) / 2.0))
    expected = resized[top:top + 224, left:left + 224, 0].astype(np.float32)
    np.testing.assert_array_equal(x[0, 0], expected)


def test_pil_bilinear_resize_matches_pillow(evaluate):
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (123, 217, 3), dtype=np.uint8)
    for size in [(64, 40), (217, 60), (100, 123), (400, 250), (256, 256)]:
        ref = np.asarray(pil.fromarray(img).resize(size, pil.BILINEAR))
        np.testing.assert_array_equal(evaluate.pil_bilinear_resize(img, *size), ref)


def test_imagenet_cv_geometry(evaluate, tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)  # portrait
    path = _write_image(tmp_path / "p.png", bgr)
    x = evaluate.reference_imagenet_cv(path, 224, 224, MEAN, STD, rgb=True)
    assert x.shape == (1, 3, 224, 224)
    # portrait: width -> int(224 / 0.875) = 256, height -> int(256 * 400 / 300) = 341
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    resized = cv2.resize(rgb, (256, 341), interpolation=cv2.INTER_AREA)
    top, left = int((341 - 224) / 2), int((256 - 224) / 2)
    crop = resized[top:top + 224, left:left + 224].astype(np.float32)
    expected = ((crop - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(x[0], expected, rtol=0, atol=1e-6)


def test_compare_logits_metrics(evaluate):
    import numpy as np

    f = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])
    q = np.array([[1.0, 2.0, 3.0], [0.0, 3.0, 0.0]])
    res = evaluate.compare_logits(f, q, labels=[2, 1])
    assert res["images"] == 2
    assert res["fp32_top1"] == 0.5 and res["int8_top1"] == 1.0
    assert res["top1_agreement"] == 0.5
    assert res["logits_cosine"] == pytest.approx(0.5)
    assert res["logits_snr"] == pytest.approx((0.0 + 18.0 / 9.0) / 2)


# ------------------------------------------------------------------------------------------
# fetched material


def test_eval_and_calib_sets_are_disjoint_and_listed():
    _need_material()
    sets = {}
    for sub in ("calib", "eval"):
        folder = MATERIAL / sub
        names = sorted(p.name for p in folder.iterdir() if p.name != "list.txt")
        listed = (folder / "list.txt").read_text().split()
        assert listed == names, f"{sub}/list.txt does not list the folder's photos"
        sets[sub] = {_sha256(folder / n): n for n in names}
    assert len(sets["eval"]) == 20
    assert len(sets["calib"]) >= 30
    overlap = set(sets["calib"]) & set(sets["eval"])
    assert not overlap, f"calibration photos also used for evaluation: {overlap}"

    # the detector calibrates on its own text photos plus the general ones, and is evaluated on scene text
    text_calib = MATERIAL / "detector" / "calib"
    text_names = sorted(p.name for p in text_calib.iterdir() if p.name != "list.txt")
    listed = (text_calib / "list.txt").read_text().split()
    assert listed == text_names + [f"../../calib/{name}" for name in sorted(sets["calib"].values())]
    text_eval = MATERIAL / "detector" / "eval"
    evaluated = {_sha256(path) for path in text_eval.iterdir()} | set(sets["eval"])
    calibrated = {_sha256(text_calib / name) for name in text_names} | set(sets["calib"])
    assert len(text_names) >= 10 and not calibrated & evaluated


def test_eval_labels_parse(evaluate):
    _need_material()
    items = evaluate.labelled_images(MATERIAL / "eval")
    assert len(items) == 20
    assert all(0 <= label < 1000 for _, label in items)
    assert dict((p.name, lab) for p, lab in items)["imagenet_00_243.jpg"] == 243


def test_weights_load_strictly(sample_module):
    _need_material()
    if not WEIGHTS.is_file():
        pytest.skip("weights not fetched")
    pytest.importorskip("torch")
    assert _sha256(WEIGHTS).startswith("b0353104")
    model_mod = sample_module("mobilenet_v2/model.py")
    model = model_mod.load_mobilenet_v2(WEIGHTS)  # load_state_dict(strict=True) inside
    assert sum(p.numel() for p in model.parameters()) == 3_504_872


@pytest.mark.slow
def test_exported_model_fp32_top1(evaluate):
    _need_material()
    if not ONNX_MODEL.is_file():
        pytest.skip("exported model absent (run: python samples/mobilenet_v2/export.py)")
    pytest.importorskip("onnxruntime")
    top1 = evaluate.fp32_top1(ONNX_MODEL, MATERIAL / "eval")
    assert top1 >= 0.70, f"FP32 top-1 {top1:.2f} < 0.70: model or preprocessing is broken"
