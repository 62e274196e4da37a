"""Config loading and validation: xquant_core.config, and the golden corpus of invalid configs.

The golden corpus lives in ``tests/data/configs/invalid/<case>/``: ``config.json`` (absent
for the missing-file case), ``expected.txt`` (the CLI's exact stderr, with the case
folder written as ``<CASE>``) and ``exit_code``. To add a case, create the folder with
its config, run the CLI on a copy once, normalize with :func:`normalize_case_paths`,
then read the text and make sure a user can act on it before committing it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from xquant_core.config import (CalibrationConfig, InputConfig, ModelConfig, QuantizationConfig,
                                XQuantConfig, load_config, load_schema, validate)
from xquant_core.errors import ConfigError
from xquant_core.plugins import registry

DATA = Path(__file__).resolve().parents[1] / "data" / "configs"
INVALID_CASES = sorted(p for p in (DATA / "invalid").iterdir() if p.is_dir())
VALID_CASES = sorted(p for p in (DATA / "valid").iterdir() if p.is_dir())


def minimal(**calib_extra) -> dict:
    """The smallest valid config, as a dict."""
    return {
        "model_parameters": {"onnx_model": "model.onnx"},
        "calibration_parameters": {"input_parametres": [{"data_list_path": "list.txt"}], **calib_extra},
    }


def write_config(folder: Path, config, name: str = "cfg.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2), encoding="utf-8")
    return path


def normalize_case_paths(text: str, case_dir: Path) -> str:
    """Write the case folder as ``<CASE>`` so the golden text does not depend on where it ran."""
    for form in sorted({str(case_dir.resolve()), str(case_dir)}, key=len, reverse=True):
        text = text.replace(form, "<CASE>")
    return text


# --------------------------------------------------------------------------- all problems at once
def test_typo_wrong_type_and_unknown_algorithm_are_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = minimal(calibration_stepp=100, calibration_step="100", calibration_type="foo")
    write_config(tmp_path, config)

    with pytest.raises(ConfigError) as info:
        load_config("cfg.json")

    problems = info.value.problems
    assert len(problems) == 3, problems
    typo, = [p for p in problems if p.startswith("cfg.json::$.calibration_parameters.calibration_stepp:")]
    assert "unknown key 'calibration_stepp'" in typo
    assert "Did you mean 'calibration_step'?" in typo
    wrong_type, = [p for p in problems if p.startswith("cfg.json::$.calibration_parameters.calibration_step:")]
    assert "'100' is not of type 'integer'" in wrong_type
    unknown, = [p for p in problems if p.startswith("cfg.json::$.calibration_parameters.calibration_type:")]
    assert "calibration_type foo not implemented yet." in unknown
    for name in ("default", "kl", "minmax", "mse", "percentile"):
        assert name in unknown
    assert "xquant plugins" in unknown
    # the message itself says how many problems and lists each on its own line
    text = str(info.value)
    assert text.splitlines()[0] == "cfg.json: 3 problems in the config"
    assert [line[4:] for line in text.splitlines()[1:]] == problems


def test_unknown_names_list_what_is_installed():
    # the installed names come from the plugin registry, not from a hard-coded list
    for name in registry("calibration").names():
        assert name in registry("calibration").unknown_message("foo")


def test_semantic_problems_are_reported_next_to_schema_problems():
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0].update(
        mean_value=[1, 2, 3], std_value=[1, 2], file_type="zz")
    config["quantization_parameters"] = {"finetune_level": 7}
    problems = validate(config)
    assert problems == [
        "$.calibration_parameters.input_parametres[0]: mean_value has 3 values but std_value has 2",
        "$.calibration_parameters.input_parametres[0].file_type: file_type zz not implemented yet. "
        "Installed: img, npy, raw (see `xquant plugins`)",
        "$.quantization_parameters.finetune_level: 7 is not one of [0, 1, 2, 3]",
    ]


def test_a_wrong_type_is_one_problem_not_two():
    config = minimal()
    config["quantization_parameters"] = {"precision_level": "2"}
    assert validate(config) == ["$.quantization_parameters.precision_level: '2' is not of type 'integer'"]


def test_check_plugins_false_skips_plugin_names():
    config = minimal(calibration_type="not_installed")
    assert validate(config, check_plugins=False) == []
    assert len(validate(config)) == 1
    cfg = load_config(config, check_plugins=False)
    assert cfg.calibration.calibration_type == "not_installed"


# --------------------------------------------------------------------------- defaults
def test_defaults_come_from_the_schema(tmp_path):
    cfg = load_config(write_config(tmp_path, minimal()))
    assert cfg.calibration.calibration_step == 100
    assert cfg.calibration.calibration_type == "default"
    assert cfg.calibration.calibration_device is None  # "cuda when available": decided at run time
    assert cfg.quantization.finetune_level == 1
    assert cfg.quantization.precision_level == 0
    assert cfg.quantization.max_percentile == 0.9999
    assert cfg.quantization.analysis_enable is True
    assert cfg.quantization.platform == "spacemit"
    assert cfg.quantization.custom_setting == ()
    assert cfg.quantization.truncate_var_names == ()
    assert cfg.model.skip_onnxsim is False
    assert cfg.model.output_prefix is None
    assert cfg.model.working_dir is None
    (item,) = cfg.calibration.inputs
    assert item.index == 0
    assert item.file_type == "img"
    assert item.color_format == "bgr"
    assert item.preprocess_file == "none"
    assert item.input_name is None and item.input_shape is None and item.dtype is None
    assert item.mean_value is None and item.std_value is None


def test_defaults_in_code_match_the_schema():
    """The values asserted above are the schema's own defaults (one source of truth)."""
    props = load_schema()["properties"]
    assert props["calibration_parameters"]["properties"]["calibration_step"]["default"] == 100
    assert props["calibration_parameters"]["properties"]["calibration_type"]["default"] == "default"
    assert props["quantization_parameters"]["properties"]["finetune_level"]["default"] == 1
    assert props["quantization_parameters"]["properties"]["precision_level"]["default"] == 0
    assert props["quantization_parameters"]["properties"]["max_percentile"]["default"] == 0.9999
    assert props["quantization_parameters"]["properties"]["analysis_enable"]["default"] is True
    assert props["model_parameters"]["properties"]["skip_onnxsim"]["default"] is False
    item = load_schema()["$defs"]["input_parameter"]["properties"]
    assert item["file_type"]["default"] == "img"
    assert item["color_format"]["default"] == "bgr"


def test_explicit_values_override_defaults(tmp_path):
    config = minimal(calibration_step=500, calibration_type="kl", calibration_device="cpu")
    config["quantization_parameters"] = {"finetune_level": 0, "precision_level": 2, "max_percentile": 0.999,
                                         "analysis_enable": False}
    config["model_parameters"]["skip_onnxsim"] = True
    cfg = load_config(config)
    assert (cfg.calibration.calibration_step, cfg.calibration.calibration_type,
            cfg.calibration.calibration_device) == (500, "kl", "cpu")
    assert (cfg.quantization.finetune_level, cfg.quantization.precision_level, cfg.quantization.max_percentile,
            cfg.quantization.analysis_enable) == (0, 2, 0.999, False)
    assert cfg.model.skip_onnxsim is True


# --------------------------------------------------------------------------- input list spellings
def test_both_spellings_of_the_input_list_are_accepted(tmp_path):
    vendor = minimal()
    english = minimal()
    english["calibration_parameters"]["input_parameters"] = english["calibration_parameters"].pop(
        "input_parametres")
    a = load_config(write_config(tmp_path / "a", vendor))
    b = load_config(write_config(tmp_path / "b", english))
    assert [dataclasses.replace(i, data_list_path=None) for i in a.calibration.inputs] == \
        [dataclasses.replace(i, data_list_path=None) for i in b.calibration.inputs]
    assert b.calibration.inputs[0].data_list_path == tmp_path / "b" / "list.txt"


def test_both_spellings_at_once_is_an_error():
    config = minimal()
    config["calibration_parameters"]["input_parameters"] = [{"data_list_path": "other.txt"}]
    assert validate(config) == [
        "$.calibration_parameters: give either 'input_parametres' or 'input_parameters', not both"]


def test_input_list_is_required():
    config = {"model_parameters": {"onnx_model": "m.onnx"}}
    (problem,) = validate(config)
    assert problem.startswith("$.calibration_parameters: 'input_parametres' is required")


# --------------------------------------------------------------------------- paths
def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = minimal()
    config["model_parameters"] = {"onnx_model": "models/m.onnx", "working_dir": "../out"}
    config["calibration_parameters"]["input_parametres"][0].update(
        data_list_path="data/list.txt", preprocess_file="prep/custom.py:load_batch")
    cfg = load_config(write_config(tmp_path / "project", config))

    base = (tmp_path / "project").resolve()
    assert cfg.base_dir == base
    assert cfg.model.onnx_model == base / "models" / "m.onnx"
    assert cfg.model.working_dir == base / ".." / "out"
    assert cfg.model.working_dir.resolve() == (tmp_path / "out").resolve()
    (item,) = cfg.calibration.inputs
    assert item.data_list_path == base / "data" / "list.txt"
    assert item.preprocess_file == f"{base / 'prep' / 'custom.py'}:load_batch"


def test_relative_config_path_resolves_against_its_folder_not_cwd(tmp_path, monkeypatch):
    write_config(tmp_path / "project", minimal())
    monkeypatch.chdir(tmp_path)
    cfg = load_config("project/cfg.json")
    assert cfg.model.onnx_model == (tmp_path / "project").resolve() / "model.onnx"
    assert cfg.source == "project/cfg.json"


def test_absolute_paths_and_named_preprocessors_are_kept(tmp_path):
    config = minimal()
    model = tmp_path / "abs" / "m.onnx"
    config["model_parameters"]["onnx_model"] = str(model)
    config["calibration_parameters"]["input_parametres"][0].update(
        data_list_path=str(tmp_path / "abs" / "list.txt"), preprocess_file="PT_IMAGENET")
    cfg = load_config(write_config(tmp_path / "project", config))
    assert cfg.model.onnx_model == model
    assert cfg.calibration.inputs[0].data_list_path == tmp_path / "abs" / "list.txt"
    assert cfg.calibration.inputs[0].preprocess_file == "PT_IMAGENET"


@pytest.mark.parametrize("value", [None, "none", "None"])
def test_no_preprocessing_spellings(value):
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = value
    assert load_config(config).calibration.inputs[0].preprocess_file == "none"


def test_dict_config_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "p.py:f"
    cfg = load_config(config)
    assert cfg.source == "config"
    assert cfg.base_dir == tmp_path.resolve() or cfg.base_dir == tmp_path
    assert cfg.model.onnx_model == Path.cwd() / "model.onnx"
    assert cfg.calibration.inputs[0].data_list_path == Path.cwd() / "list.txt"
    assert cfg.calibration.inputs[0].preprocess_file == f"{Path.cwd() / 'p.py'}:f"


def test_dict_config_is_not_modified():
    config = minimal()
    before = json.dumps(config, sort_keys=True)
    load_config(config)
    assert json.dumps(config, sort_keys=True) == before


def test_dict_config_errors_are_located_as_config():
    with pytest.raises(ConfigError) as info:
        load_config(minimal(calibration_type="foo"))
    assert info.value.problems[0].startswith("config::$.calibration_parameters.calibration_type: ")


# --------------------------------------------------------------------------- frozen objects
def test_loaded_config_is_frozen(tmp_path):
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0].update(
        mean_value=[1, 2, 3], std_value=[4, 5, 6], input_shape=[1, 3, 8, 8])
    config["quantization_parameters"] = {"custom_setting": [{"input_names": ["a"], "output_names": ["b"]}],
                                         "truncate_var_names": ["t"]}
    cfg = load_config(config)
    assert isinstance(cfg, XQuantConfig)
    assert isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.calibration, CalibrationConfig)
    assert isinstance(cfg.quantization, QuantizationConfig)
    assert isinstance(cfg.calibration.inputs[0], InputConfig)
    targets = [(cfg, "source"), (cfg.model, "onnx_model"), (cfg.calibration, "calibration_step"),
               (cfg.quantization, "precision_level"), (cfg.calibration.inputs[0], "file_type"),
               (cfg.quantization.custom_setting[0], "precision_level")]
    for obj, attribute in targets:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attribute, None)
    # no mutable containers hide inside the frozen objects
    item = cfg.calibration.inputs[0]
    assert isinstance(cfg.calibration.inputs, tuple)
    assert item.mean_value == (1.0, 2.0, 3.0) and item.std_value == (4.0, 5.0, 6.0)
    assert item.input_shape == (1, 3, 8, 8)
    assert cfg.quantization.custom_setting[0].input_names == ("a",)
    assert cfg.quantization.truncate_var_names == ("t",)
    hash(cfg)  # frozen dataclasses of tuples are hashable


# --------------------------------------------------------------------------- file-level problems
def test_invalid_json_names_line_and_column(tmp_path):
    path = write_config(tmp_path, '{\n  "model_parameters": {\n    "onnx_model": "m.onnx",\n  }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith("invalid JSON at line 4, column 3: ")
    assert "comma" in problem


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.json")
    assert info.value.problems == [f"config file not found: {tmp_path / 'nope.json'}"]


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_bytes(b'{"model_parameters": {"onnx_model": "\xff.onnx"}}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith("cannot read the config file: ")


# --------------------------------------------------------------------------- plugin names and semantics
def test_unknown_file_type_names_installed_readers():
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0]["file_type"] = "xxx"
    (problem,) = validate(config)
    assert problem.startswith("$.calibration_parameters.input_parametres[0].file_type: "
                              "file_type xxx not implemented yet. Installed: ")
    for name in ("img", "npy", "raw"):
        assert name in problem


def test_unknown_preprocessor_names_installed_ones_and_the_file_form():
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "TF_IMAGENET"
    (problem,) = validate(config)
    assert problem.startswith("$.calibration_parameters.input_parametres[0].preprocess_file: "
                              "preprocess_file TF_IMAGENET not implemented yet.")
    for name in ("PT_IMAGENET", "IMAGENET", "none", "path/to/file.py:function"):
        assert name in problem


def test_file_function_preprocessor_needs_no_plugin_but_a_function_name():
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "my_prep.py:prep"
    assert validate(config) == []
    config["calibration_parameters"]["input_parametres"][0]["preprocess_file"] = "my_prep.py:"
    (problem,) = validate(config)
    assert "is not of the form 'path/to/file.py:function'" in problem


def test_unknown_platform_and_custom_setting_calibration_type():
    config = minimal()
    config["quantization_parameters"] = {
        "platform": "k9",
        "custom_setting": [{"input_names": ["a"], "output_names": ["b"], "calibration_type": "entropy"}],
    }
    problems = validate(config)
    assert len(problems) == 2
    assert problems[0].startswith("$.quantization_parameters.custom_setting[0].calibration_type: "
                                  "calibration_type entropy not implemented yet.")
    assert problems[1].startswith("$.quantization_parameters.platform: platform k9 not implemented yet. "
                                  "Installed: spacemit")


@pytest.mark.parametrize("setting", [
    {"input_names": [], "output_names": ["b"]},
    {"input_names": ["a"], "output_names": []},
    {"input_names": ["a"]},
    {"precision_level": 3},
])
def test_custom_setting_needs_input_and_output_names(setting):
    config = minimal()
    config["quantization_parameters"] = {"custom_setting": [{"input_names": ["x"], "output_names": ["y"]}, setting]}
    assert validate(config) == ["$.quantization_parameters.custom_setting[1]: "
                                "input_names and output_names should be set."]


def test_mean_std_length_mismatch():
    config = minimal()
    config["calibration_parameters"]["input_parametres"][0].update(mean_value=[1, 2, 3], std_value=[1])
    assert validate(config) == [
        "$.calibration_parameters.input_parametres[0]: mean_value has 3 values but std_value has 1"]


def test_mean_std_mismatch_located_under_the_spelling_used():
    config = minimal()
    item = config["calibration_parameters"].pop("input_parametres")[0]
    item.update(mean_value=[1, 2], std_value=[1, 2, 3])
    config["calibration_parameters"]["input_parameters"] = [{"data_list_path": "a"}, item]
    assert validate(config) == [
        "$.calibration_parameters.input_parameters[1]: mean_value has 2 values but std_value has 3"]


def test_problems_are_sorted_by_path_and_not_repeated():
    config = minimal(calibration_type="zz")
    config["quantization_parameters"] = {"platform": "zz", "analysis_enable": 1}
    config["model_parameters"]["skip_onnxsim"] = "no"
    problems = validate(config)
    paths = [p.split(": ", 1)[0] for p in problems]
    assert paths == sorted(paths)
    assert len(set(problems)) == len(problems) == 4


# --------------------------------------------------------------------------- valid corpus
@pytest.mark.parametrize("case", VALID_CASES, ids=[c.name for c in VALID_CASES])
def test_valid_corpus_loads(case):
    cfg = load_config(case / "config.json")
    assert cfg.base_dir == case.resolve()
    assert cfg.calibration.inputs
    for item in cfg.calibration.inputs:
        assert item.data_list_path.is_absolute()


def test_vendor_config_keeps_every_value():
    cfg = load_config(DATA / "valid" / "vendor_resnet18" / "config.json")
    base = (DATA / "valid" / "vendor_resnet18").resolve()
    assert cfg.model == ModelConfig(onnx_model=base / "data" / "resnet18.onnx", output_prefix="resnet18.q",
                                    working_dir=base / "output", skip_onnxsim=False)
    (item,) = cfg.calibration.inputs
    assert item == InputConfig(index=0, data_list_path=base / "data" / "calib_img_list.txt", input_name="data",
                               input_shape=(1, 3, 224, 224), dtype="float32", file_type="img", color_format="rgb",
                               mean_value=(123.675, 116.28, 103.53), std_value=(58.395, 57.12, 57.375),
                               preprocess_file="PT_IMAGENET")
    assert (cfg.calibration.calibration_step, cfg.calibration.calibration_type) == (500, "default")
    (setting,) = cfg.quantization.custom_setting
    assert (setting.input_names, setting.output_names, setting.precision_level, setting.max_percentile,
            setting.calibration_type) == (("aaa", "bbb"), ("ccc",), 3, 0.999, "kl")
    assert cfg.quantization.truncate_var_names == ("/Concat_5_output_0", "/Transpose_6_output_0")
    assert cfg.quantization.precision_level == 2


# --------------------------------------------------------------------------- golden corpus (CLI)
def test_golden_corpus_is_complete():
    assert len(INVALID_CASES) >= 12
    for case in INVALID_CASES:
        assert (case / "expected.txt").is_file(), case
        assert (case / "exit_code").read_text().strip().isdigit(), case


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.name for c in INVALID_CASES])
def test_golden_invalid_config(case, tmp_path, run_xquant):
    work = tmp_path / case.name
    shutil.copytree(case, work)
    result = run_xquant("-c", str(work / "config.json"), cwd=tmp_path)
    stderr = normalize_case_paths(result.stderr, work)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert stderr == (case / "expected.txt").read_text(encoding="utf-8")
    assert result.returncode == int((case / "exit_code").read_text())
    assert result.returncode == 2
    # nothing was written next to the config
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in case.iterdir())


def test_shipped_sample_configs_are_valid():
    repo = Path(__file__).resolve().parents[2]
    configs = sorted(repo.glob("samples/*/config.json"))
    assert configs, "the samples ship at least one config"
    for path in configs:
        cfg = load_config(path)
        written = json.loads(path.read_text())["model_parameters"]["onnx_model"]
        assert cfg.model.onnx_model == path.parent.resolve() / written  # relative to the config's folder


@pytest.mark.parametrize("field", ["onnx_model", "working_dir"])
def test_a_nul_character_in_a_name_is_a_config_error(tmp_path, field):
    """Found by the property test: "\\u0000" as the model path reached os.path.realpath, which raised
    ValueError (exit 3, an internal error). No file or tensor name can hold one."""
    config = minimal()
    config["model_parameters"][field] = "model\u0000.onnx"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, config))
    assert f"$.model_parameters.{field}" in str(info.value) and "NUL character" in str(info.value)


def test_a_dict_config_with_keys_that_are_not_strings_is_a_config_error():
    """From Python a key can be anything; difflib's did-you-mean used to raise a TypeError."""
    config = minimal()
    config["model_parameters"][1] = 2
    config[None] = 1
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.problems == [
        "config::$.model_parameters[1]: key 1 is not a string: config keys are strings, as in JSON",
        "config::$[None]: key None is not a string: config keys are strings, as in JSON",
    ]

