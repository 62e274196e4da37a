"""Calibration data, stage by stage: list files, readers, preprocessors, dtype casts, the
lazily read dataset and its bounded cache; the image preprocessors against the independent
reference of ``samples/mobilenet_v2/evaluate.py`` on the real photos.

No PPQ here: everything runs on the data layer alone (fast).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from xquant_core import data as data_mod
from xquant_core.config import InputConfig
from xquant_core.data import CalibrationDataset, InputSpec, PathFunctionPreprocessor, read_list, resolve_preprocessor
from xquant_core.errors import DataError, PluginError
from xquant_core.plugins import registry

REPO = Path(__file__).resolve().parents[2]
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def make_spec(list_path: Path, shape=(1, 3, 8, 8), dtype="float32", name="input", **config) -> InputSpec:
    return InputSpec(name=name, shape=tuple(shape), dtype=dtype,
                     config=InputConfig(index=0, data_list_path=list_path, **config))


def reader(name: str):
    return registry("reader").get(name)


def preprocessor(name: str):
    return registry("preprocessor").get(name)


def write_list(path: Path, lines) -> Path:
    path.write_text("\n".join(str(line) for line in lines) + "\n")
    return path


def dataset(specs, samples: int) -> CalibrationDataset:
    return CalibrationDataset(specs, {s.name: reader(s.config.file_type) for s in specs},
                              {s.name: resolve_preprocessor(s.config, registry("preprocessor")) for s in specs},
                              samples)


# --------------------------------------------------------------------------- list files

def test_list_paths_relative_to_list_folder_absolute_blank_and_spaces(tmp_path, monkeypatch):
    folder = tmp_path / "lists"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "b.npy"
    write_list(folder / "list.txt", ["", "  a.npy  ", "\t", f" {absolute}", "sub/c.npy", "   "])
    monkeypatch.chdir(tmp_path)  # relative to the list's folder, not to the working directory
    paths = read_list(make_spec(folder / "list.txt").config, "input")
    assert paths == [folder / "a.npy", absolute, folder / "sub" / "c.npy"]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_list_is_the_vendor_message_plus_the_list_path(tmp_path, content):
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises(DataError) as info:
        read_list(make_spec(tmp_path / "list.txt").config, "images")
    message = str(info.value)
    assert message.startswith("Calibration input images finds 0 items.")
    assert str(tmp_path / "list.txt") in message


def test_missing_list_and_missing_listed_file_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        read_list(make_spec(tmp_path / "nope.txt").config, "input")
    assert str(tmp_path / "nope.txt") in str(info.value)
    spec = make_spec(write_list(tmp_path / "list.txt", ["gone.npy"]), file_type="npy")
    with pytest.raises(DataError) as info:
        dataset([spec], 1).batch(0)
    assert str(tmp_path / "gone.npy") in str(info.value) and str(tmp_path / "list.txt") in str(info.value)


# --------------------------------------------------------------------------- readers

@pytest.mark.parametrize("with_batch", [False, True])
def test_npy_with_or_without_batch_dim(tmp_path, with_batch):
    array = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", array[None] if with_batch else array)
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.npy"]), file_type="npy")
    batch = dataset([spec], 1).batch(0)["input"]
    assert batch.shape == (1, 3, 8, 8) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], array)


def test_npy_wrong_shape_names_file_and_both_shapes(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.float32))
    spec = make_spec(tmp_path / "list.txt", file_type="npy")
    with pytest.raises(DataError) as info:
        reader("npy").read(tmp_path / "a.npy", spec)
    message = str(info.value)
    assert str(tmp_path / "a.npy") in message and "[3, 4, 4]" in message and "[3, 8, 8]" in message


def test_raw_float32_bytes_reshaped_to_input_shape(tmp_path):
    array = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8) / 7
    array.tofile(tmp_path / "a.raw")
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.raw"]), file_type="raw")
    batch = dataset([spec], 1).batch(0)["input"]
    np.testing.assert_array_equal(batch, array[None])


def test_raw_size_mismatch_names_file_expected_and_actual_bytes(tmp_path):
    np.zeros(100, np.float32).tofile(tmp_path / "short.raw")
    spec = make_spec(tmp_path / "list.txt", file_type="raw")
    with pytest.raises(DataError) as info:
        reader("raw").read(tmp_path / "short.raw", spec)
    message = str(info.value)
    assert str(tmp_path / "short.raw") in message
    assert "400" in message and str(3 * 8 * 8 * 4) in message


def write_bgr(path: Path, bgr=(10, 20, 30), shape=(12, 16)) -> Path:
    image = np.zeros(shape + (3,), np.uint8)
    image[:] = bgr
    image[0, 0] = (200, 100, 50)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize("color_format, expected", [("bgr", (10, 20, 30)), ("rgb", (30, 20, 10))])
def test_img_reader_color_order(tmp_path, color_format, expected):
    path = write_bgr(tmp_path / "a.png")
    image = reader("img").read(path, make_spec(tmp_path / "list.txt", color_format=color_format))
    assert image.shape == (12, 16, 3) and tuple(image[5, 5]) == expected


def test_img_none_preprocess_resizes_normalizes_and_goes_chw(tmp_path):
    path = write_bgr(tmp_path / "a.png")
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.png"]), shape=(1, 3, 6, 8), color_format="rgb",
                     mean_value=(1.0, 2.0, 3.0), std_value=(2.0, 4.0, 8.0))
    batch = dataset([spec], 1).batch(0)["input"]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(rgb, (8, 6), interpolation=cv2.INTER_AREA).astype(np.float32)
    expected = ((resized - np.float32([1, 2, 3])) / np.float32([2, 4, 8])).transpose(2, 0, 1)
    assert batch.shape == (1, 3, 6, 8)
    np.testing.assert_allclose(batch[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pre", ["none", "PT_IMAGENET", "IMAGENET"])
def test_grayscale_model_gets_one_channel(tmp_path, pre):
    path = write_bgr(tmp_path / "a.png", shape=(40, 50))
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.png"]), shape=(1, 1, 28, 28), preprocess_file=pre,
                     mean_value=(128.0,), std_value=(64.0,))
    batch = dataset([spec], 1).batch(0)["input"]
    gray = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
    assert batch.shape == (1, 1, 28, 28)
    assert batch[0, 0, 14, 14] == pytest.approx((float(gray[20, 25]) - 128) / 64)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    spec = make_spec(write_list(tmp_path / "list.txt", ["bad.jpg"]))
    with pytest.raises(DataError, match="bad.jpg"):
        dataset([spec], 1).batch(0)


def test_unknown_file_type_is_the_vendor_message_with_the_valid_names():
    with pytest.raises(PluginError) as info:
        registry("reader").get("jpeg")
    message = str(info.value)
    assert message.startswith("file_type jpeg not implemented yet.")
    for name in ("img", "npy", "raw"):
        assert name in message


def test_crop_preprocessors_refuse_non_images(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 8, 8), np.float32))
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.npy"]), file_type="npy", preprocess_file="IMAGENET")
    with pytest.raises(DataError, match="needs images"):
        dataset([spec], 1).batch(0)


# --------------------------------------------------------------------------- dtype

def test_int_model_input_takes_the_model_dtype_when_lossless(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[1, 2, 3, 4]], np.int32))
    np.save(tmp_path / "b.npy", np.array([5.0, 6.0, 7.0, 8.0], np.float32))
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.npy", "b.npy"]), shape=(1, 4), dtype="int64",
                     file_type="npy")
    data = dataset([spec], 2)
    batches = [data.batch(0)["input"], data.batch(1)["input"]]
    assert all(batch.dtype == np.int64 for batch in batches)
    np.testing.assert_array_equal(np.concatenate(batches), [[1, 2, 3, 4], [5, 6, 7, 8]])


@pytest.mark.parametrize("values, stored, dtype, what", [
    ([0.5, 1.0, 2.0, 3.0], np.float32, "int64", "fractional values"),
    ([np.nan, 1.0, 2.0, 3.0], np.float32, "int64", "non-finite"),
    ([-1, 0, 1, 2], np.int64, "uint8", "outside [0, 255]"),
    ([0, 1, 2, 300], np.int64, "int8", "outside [-128, 127]"),
])
def test_lossy_cast_to_the_model_dtype_is_an_error_naming_the_file(tmp_path, values, stored, dtype, what):
    np.save(tmp_path / "a.npy", np.array(values, stored))
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.npy"]), shape=(1, 4), dtype=dtype, file_type="npy")
    with pytest.raises(DataError) as info:
        dataset([spec], 1).batch(0)
    message = str(info.value)
    assert str(tmp_path / "a.npy") in message and what in message and dtype in message


def test_float_input_accepts_float64_and_ints(tmp_path):
    np.save(tmp_path / "a.npy", np.full((3, 8, 8), 0.1, np.float64))
    np.save(tmp_path / "b.npy", np.full((3, 8, 8), 7, np.int64))
    spec = make_spec(write_list(tmp_path / "list.txt", ["a.npy", "b.npy"]), file_type="npy")
    data = dataset([spec], 2)
    assert data.batch(0)["input"].dtype == np.float32 and data.batch(0)["input"][0, 0, 0, 0] == np.float32(0.1)
    assert data.batch(1)["input"][0, 0, 0, 0] == 7.0


# --------------------------------------------------------------------------- several inputs, sample counts

def two_inputs(tmp_path, count_a: int, count_b: int):
    for index in range(max(count_a, count_b)):
        np.save(tmp_path / f"a{index}.npy", np.full((4,), index, np.int64))
        np.save(tmp_path / f"b{index}.npy", np.full((2, 2), index * 10, np.float32))
    spec_a = make_spec(write_list(tmp_path / "a.txt", [f"a{i}.npy" for i in range(count_a)]), shape=(1, 4),
                       dtype="int64", name="ids", file_type="npy")
    spec_b = InputSpec(name="mask", shape=(1, 2, 2), dtype="float32",
                       config=InputConfig(index=1, data_list_path=write_list(
                           tmp_path / "b.txt", [f"b{i}.npy" for i in range(count_b)]), file_type="npy"))
    return [spec_a, spec_b]


def test_line_k_of_each_list_is_the_same_sample(tmp_path):
    data = dataset(two_inputs(tmp_path, 5, 5), 5)
    assert len(data) == 5
    for index, batch in enumerate(data):
        assert set(batch) == {"ids", "mask"}
        assert batch["ids"].dtype == np.int64 and batch["ids"].shape == (1, 4)
        assert (batch["ids"] == index).all() and (batch["mask"] == index * 10).all()


def test_lists_of_different_lengths_name_both_lengths(tmp_path):
    with pytest.raises(DataError) as info:
        dataset(two_inputs(tmp_path, 5, 3), 5)
    message = str(info.value)
    assert "ids: 5" in message and "mask: 3" in message


def test_fewer_samples_than_calibration_step_uses_all_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="xquant"):
        data = dataset(two_inputs(tmp_path, 4, 4), 100)
    assert data.count == 4 and len(list(data)) == 4
    assert any("calibration_step is 100" in r.getMessage() and "4" in r.getMessage() for r in caplog.records)


def test_calibration_step_takes_the_first_samples(tmp_path):
    data = dataset(two_inputs(tmp_path, 6, 6), 3)
    assert data.count == 3
    assert [int(batch["ids"][0, 0]) for batch in data] == [0, 1, 2]


# --------------------------------------------------------------------------- bounded memory

class CountingReader:
    is_image = False

    def __init__(self):
        self.reads = 0

    def read(self, path, spec):
        self.reads += 1
        return np.load(str(path))


def test_samples_are_read_lazily_and_the_cache_stays_within_its_budget(tmp_path, monkeypatch):
    sample_bytes = 3 * 8 * 8 * 4
    monkeypatch.setattr(data_mod, "CACHE_BUDGET_BYTES", 5 * sample_bytes)
    for index in range(3):
        np.save(tmp_path / f"s{index}.npy", np.full((3, 8, 8), index, np.float32))
    spec = make_spec(write_list(tmp_path / "list.txt", [f"s{i % 3}.npy" for i in range(20)]), file_type="npy")
    counting = CountingReader()
    data = CalibrationDataset([spec], {"input": counting}, {"input": preprocessor("none")}, 20)
    assert counting.reads == 0  # nothing read before iteration
    for _ in range(3):  # three calibration passes
        values = [int(batch["input"][0, 0, 0, 0]) for batch in data]
        assert values == [i % 3 for i in range(20)]
        assert data._cache_bytes <= data_mod.CACHE_BUDGET_BYTES
        assert len(data._cache) == 5
    assert counting.reads == 20 + 2 * 15  # cached samples are read once, the rest once per pass


# --------------------------------------------------------------------------- custom preprocess files

CUSTOM = '''
import numpy as np

calls = []

def ok(path_list, params):
    calls.append((list(path_list), dict(params)))
    import torch
    return torch.stack([torch.full(tuple(params["input_shape"][1:]), float(len(p))) for p in path_list])

def boom(path_list, params):
    raise RuntimeError("cannot decode " + path_list[0])

def wrong_shape(path_list, params):
    return np.zeros((len(path_list), 5))
'''


def custom_spec(tmp_path, func: str) -> InputSpec:
    (tmp_path / "pre.py").write_text(CUSTOM)
    return make_spec(write_list(tmp_path / "list.txt", ["x.jpg", "yy.jpg"]), file_type="img",
                     preprocess_file=f"{tmp_path / 'pre.py'}:{func}", color_format="rgb", mean_value=MEAN)


def test_custom_function_gets_paths_and_parameters_and_may_return_torch(tmp_path):
    spec = custom_spec(tmp_path, "ok")
    data = dataset([spec], 2)
    batches = list(data)
    assert [b["input"].shape for b in batches] == [(1, 3, 8, 8)] * 2
    assert batches[0]["input"].dtype == np.float32
    assert batches[0]["input"][0, 0, 0, 0] == len(str(tmp_path / "x.jpg"))
    module_calls = data.preprocessors["input"].func.__globals__["calls"]
    paths, params = module_calls[0]
    assert paths == [str(tmp_path / "x.jpg")]
    assert params["input_name"] == "input" and params["input_shape"] == [1, 3, 8, 8]
    assert params["color_format"] == "rgb" and params["mean_value"] == list(MEAN)
    assert params["dtype"] == "float32" and params["file_type"] == "img"


@pytest.mark.parametrize("func, expected", [
    ("boom", "raised RuntimeError: cannot decode"),
    ("wrong_shape", "gives shape [1, 5], expected [1, 3, 8, 8]"),
])
def test_custom_function_failures_name_file_and_function(tmp_path, func, expected):
    with pytest.raises(DataError) as info:
        dataset([custom_spec(tmp_path, func)], 2).batch(0)
    message = str(info.value)
    assert f"{tmp_path / 'pre.py'}:{func}" in message and expected in message


def test_custom_file_missing_or_function_missing(tmp_path):
    with pytest.raises(DataError) as info:
        PathFunctionPreprocessor(f"{tmp_path / 'nope.py'}:prep")
    assert f"{tmp_path / 'nope.py'}:prep" in str(info.value) and "does not exist" in str(info.value)
    (tmp_path / "pre.py").write_text(CUSTOM)
    with pytest.raises(DataError) as info:
        PathFunctionPreprocessor(f"{tmp_path / 'pre.py'}:prep")
    assert f"{tmp_path / 'pre.py'}:prep" in str(info.value) and "no function 'prep'" in str(info.value)


def test_sample_custom_preprocess_letterboxes(material, tmp_path):
    pre = PathFunctionPreprocessor(f"{REPO / 'samples' / 'custom_preprocess' / 'preprocess.py'}:preprocess")
    spec = make_spec(material / "calib" / "list.txt", shape=(1, 3, 224, 224), color_format="rgb",
                     mean_value=MEAN, std_value=STD)
    paths = read_list(spec.config, "input")[:2]
    batch = pre.batch(paths, spec)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    assert np.isfinite(batch).all() and -3 < batch.min() < batch.max() < 3


# --------------------------------------------------------------------------- reference preprocessing

def photos(material: Path) -> list[Path]:
    return read_list(make_spec(material / "calib" / "list.txt").config, "input") + \
        sorted((material / "eval").glob("imagenet_*.jpg"))


@pytest.mark.parametrize("name, reference", [("PT_IMAGENET", "reference_pt_imagenet"),
                                             ("IMAGENET", "reference_imagenet_cv")])
@pytest.mark.slow
def test_imagenet_preprocessors_match_the_independent_reference(material, tmp_path, name, reference, sample_module):
    reference = getattr(sample_module("mobilenet_v2/evaluate.py"), reference)
    paths = photos(material)
    assert len(paths) == 60
    spec = make_spec(material / "calib" / "list.txt", shape=(1, 3, 224, 224), color_format="rgb",
                     preprocess_file=name, mean_value=MEAN, std_value=STD)
    img, pre = reader("img"), preprocessor(name)
    worst = 0.0
    for path in paths:
        ours = pre(img.read(path, spec), spec, img)
        ref = reference(path, 224, 224, MEAN, STD, rgb=True)[0]
        assert ours.shape == ref.shape == (3, 224, 224)
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= 1e-5, f"{name}: max |ours - reference| = {worst}"


@pytest.mark.parametrize("name, reference", [("PT_IMAGENET", "reference_pt_imagenet"),
                                             ("IMAGENET", "reference_imagenet_cv")])
def test_imagenet_preprocessors_bgr_non_square(material, name, reference, sample_module):
    reference = getattr(sample_module("mobilenet_v2/evaluate.py"), reference)
    spec = make_spec(material / "calib" / "list.txt", shape=(1, 3, 192, 160), color_format="bgr",
                     preprocess_file=name, mean_value=(0.0, 0.0, 0.0), std_value=(1.0, 1.0, 1.0))
    img, pre = reader("img"), preprocessor(name)
    for path in photos(material)[::6]:
        ours = pre(img.read(path, spec), spec, img)
        ref = reference(path, 192, 160, (0, 0, 0), (1, 1, 1), rgb=False)[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=str(path))
