"""Meta-tests: properties of the project itself rather than of one feature.

The schema is valid and documented, every hook is documented and typed, the cheap paths
(import, config validation, --help, plugins) stay free of torch and PPQ, the built-ins
are declared as entry points, and the plugin host refuses duplicate names.
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import json
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

import xquant_core
from xquant_core import hookspecs
from xquant_core.config import load_config, load_schema
from xquant_core.errors import PluginError
from xquant_core.plugins import DISTRIBUTION, ENTRY_POINT_GROUP, KINDS, get_host, registry

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "schemas" / "xquant_config.schema.json"
VALID_CONFIG = Path(__file__).resolve().parent / "data" / "configs" / "valid" / "vendor_resnet18" / "config.json"
INVALID_CONFIG = (Path(__file__).resolve().parent / "data" / "configs" / "invalid" / "typo_type_unknown_algorithm"
                  / "config.json")

#: The config tables of the design reference (REFERENCE.md), table -> fields. Kept here so
#: the test runs where the reference is not checked out; when it is, the two must agree.
REFERENCE_FIELDS = {
    "model_parameters": ["onnx_model", "output_prefix", "working_dir", "skip_onnxsim"],
    "calibration_parameters": ["calibration_step", "calibration_device", "calibration_type", "input_parametres"],
    "input_parameter": ["input_name", "input_shape", "dtype", "file_type", "color_format", "mean_value",
                        "std_value", "preprocess_file", "data_list_path"],
    "quantization_parameters": ["analysis_enable", "precision_level", "finetune_level", "max_percentile",
                                "custom_setting", "truncate_var_names"],
}
REFERENCE_CANDIDATES = [REPO / "REFERENCE.md", REPO / "docs" / "REFERENCE.md", REPO.parent / "shared" / "REFERENCE.md"]


# --------------------------------------------------------------------------- schema
def test_schema_is_valid_under_its_metaschema():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    # the loader reads the same file (from the wheel or the checkout)
    assert load_schema() == schema


def _properties(node, path="#"):
    """Every (location, property schema) under a "properties" keyword, recursively."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, prop in value.items():
                    yield f"{path}/properties/{name}", prop
                    yield from _properties(prop, f"{path}/properties/{name}")
            else:
                yield from _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _properties(item, f"{path}/{index}")


def test_every_schema_property_has_a_description():
    props = list(_properties(load_schema()))
    assert len(props) > 30  # the walk does reach $defs
    undocumented = [path for path, prop in props if not str(prop.get("description", "")).strip()]
    assert undocumented == []


def _reference_tables(text: str) -> dict[str, list[str]]:
    """Field names in the first column of each config table of REFERENCE.md."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^### (\w+)", line)
        if heading:
            current = heading.group(1)
        elif line.startswith("Per input"):
            current = "input_parameter"
        elif line.startswith("#") or line.startswith("Preprocessing"):
            current = None
        elif current and line.startswith("|") and not line.startswith(("| field", "|---")):
            cell = line.split("|")[1]
            tables.setdefault(current, []).extend(name.strip(" `") for name in cell.split(","))
    return tables


def test_reference_fields_exist_in_the_schema():
    schema = load_schema()
    sections = {
        "model_parameters": schema["properties"]["model_parameters"]["properties"],
        "calibration_parameters": schema["properties"]["calibration_parameters"]["properties"],
        "input_parameter": schema["$defs"]["input_parameter"]["properties"],
        "quantization_parameters": schema["properties"]["quantization_parameters"]["properties"],
    }
    for table, fields in REFERENCE_FIELDS.items():
        missing = [name for name in fields if name not in sections[table]]
        assert missing == [], f"{table}: {missing}"
    # the vendor's and the English spelling of the input list
    assert {"input_parametres", "input_parameters"} <= set(sections["calibration_parameters"])
    # custom_setting entries take what REFERENCE lists for them
    assert set(schema["$defs"]["custom_setting"]["properties"]) >= {
        "input_names", "output_names", "precision_level", "max_percentile", "calibration_type"}


def test_reference_field_list_matches_reference_md():
    reference = next((path for path in REFERENCE_CANDIDATES if path.is_file()), None)
    if reference is None:
        pytest.skip("REFERENCE.md is not checked out next to the repository")
    assert _reference_tables(reference.read_text(encoding="utf-8")) == REFERENCE_FIELDS


# --------------------------------------------------------------------------- hooks
def _hookspecs():
    return [(name, func) for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(func, f"{hookspecs.PROJECT}_spec")]


def test_hookspecs_are_prefixed_documented_and_typed():
    specs = _hookspecs()
    assert {name for name, _ in specs} >= {hook for hook, _ in KINDS.values()}
    for name, func in specs:
        assert name.startswith("xquant_"), name
        doc = inspect.getdoc(func) or ""
        assert len(doc.splitlines()) >= 3, f"{name}: the docstring must say when it is called and what it gets"
        assert "Called" in doc, f"{name}: the docstring must say when it is called"
        hints = typing.get_type_hints(func)
        params = inspect.signature(func).parameters
        assert params, name
        for param in params:
            assert param in hints, f"{name}: parameter {param} has no type annotation"
        assert "return" in hints, f"{name}: no return annotation"


def test_the_plugin_manager_knows_only_prefixed_hooks():
    names = [name for name in dir(get_host().manager.hook) if not name.startswith("_")]
    assert names and all(name.startswith("xquant_") for name in names), names


# --------------------------------------------------------------------------- cheap paths stay light
LIGHT_CHECK = """
import sys
{body}
heavy = sorted(name for name in sys.modules
               if name.split(".")[0] in ("torch", "ppq", "onnxruntime", "onnxsim"))
assert not heavy, "imported: " + ", ".join(heavy[:10])
print("LIGHT-OK")
"""


@pytest.mark.parametrize("what, body", [
    ("import", """
        import xquant_core, xquant_core.cli, xquant_core.config, xquant_core.plugins, xquant
    """),
    ("load_config", """
        from xquant_core.config import load_config
        cfg = load_config(sys.argv[1])  # validates the plugin names too
        assert cfg.calibration.calibration_type == "default"
        assert cfg.calibration.inputs[0].preprocess_file == "PT_IMAGENET"
    """),
    ("invalid_config", """
        import contextlib, io
        from xquant_core import cli
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["-c", sys.argv[2]]) == 2
        assert "calibration_type foo not implemented yet." in err.getvalue()
    """),
    ("help", """
        import contextlib, io
        from xquant_core import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                cli.main(["--help"])
            except SystemExit as exc:
                assert exc.code == 0
        assert "usage: xquant" in out.getvalue()
    """),
    ("plugins", """
        import contextlib, io
        from xquant_core import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["plugins"]) == 0
        assert "spacemit" in out.getvalue() and "percentile" in out.getvalue()
        from xquant_core.plugins import registry
        for kind in ("calibration", "reader", "preprocessor", "platform"):
            assert registry(kind).names()
    """),
])
def test_cheap_paths_do_not_import_torch_or_ppq(what, body, tmp_path):
    code = LIGHT_CHECK.format(body=textwrap.dedent(body))
    result = subprocess.run([sys.executable, "-c", code, str(VALID_CONFIG), str(INVALID_CONFIG)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LIGHT-OK" in result.stdout


# --------------------------------------------------------------------------- packaging
def test_builtins_are_declared_as_entry_points():
    dist = metadata.distribution(DISTRIBUTION)
    assert dist.version == xquant_core.__version__
    declared = {ep.name: ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    assert declared == {
        "auto_precision": "xquant_plugins.auto_precision",
        "calibration": "xquant_plugins.calibration",
        "commands": "xquant_plugins.commands",
        "metrics": "xquant_plugins.metrics",
        "preprocessors": "xquant_plugins.preprocessors",
        "readers": "xquant_plugins.readers",
        "reporter": "xquant_plugins.reporter",
        "spacemit": "xquant_plugins.spacemit",
    }
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"xquant": "xquant_core.cli:entry"}


def test_host_loaded_the_builtins_from_entry_points():
    host = get_host()
    builtins = {name: info for name, info in host.infos.items() if info.builtin}
    assert sorted(builtins) == ["auto_precision", "calibration", "commands", "metrics", "preprocessors", "readers", "reporter",
                                "spacemit"]
    for info in builtins.values():
        assert info.distribution == DISTRIBUTION
        assert info.version == xquant_core.__version__


# --------------------------------------------------------------------------- plugin host
class _FullRange:
    """The smallest calibration algorithm: the observed range."""

    def compute_range(self, stats, ctx):
        return stats.min, stats.max


class TemporaryCalibration:
    """A calibration plugin used only by these tests."""

    def __init__(self, names, override=False):
        self.names = names
        self.override = override
        self.components = {name: _FullRange() for name in names}

    @xquant_core.hookimpl
    def xquant_register_calibration_algorithms(self, register):
        for name in self.names:
            register(name, self.components[name], override=self.override)


def test_temporary_plugin_name_resolves(temporary_plugin):
    plugin = temporary_plugin(TemporaryCalibration(["tmp_algo"]), "tmp-plugin")
    assert registry("calibration").get("tmp_algo") is plugin.components["tmp_algo"]
    assert "tmp_algo" in registry("calibration").names()
    # ... and a config may use it
    cfg = load_config({"calibration_parameters": {"calibration_type": "tmp_algo",
                                                  "input_parametres": [{"data_list_path": "l.txt"}]}})
    assert cfg.calibration.calibration_type == "tmp_algo"
    provided = {info.name: names for info, names in get_host().describe()}
    assert provided["tmp-plugin"] == {"calibration": ["tmp_algo"]}


def test_temporary_plugin_is_gone_after_unregister(temporary_plugin):
    assert "tmp_algo" not in registry("calibration")
    with pytest.raises(PluginError, match="calibration_type tmp_algo not implemented yet"):
        registry("calibration").get("tmp_algo")


def test_duplicate_name_names_both_plugins(temporary_plugin):
    temporary_plugin(TemporaryCalibration(["minmax"]), "tmp-dup")
    with pytest.raises(PluginError) as info:
        registry("calibration")
    message = str(info.value)
    assert "'tmp-dup'" in message and "'calibration'" in message
    assert "'minmax'" in message
    assert "override=True" in message


def test_override_replaces_and_is_reported(temporary_plugin):
    original = registry("calibration").get("minmax")
    plugin = temporary_plugin(TemporaryCalibration(["minmax"], override=True), "tmp-override")
    assert registry("calibration").get("minmax") is plugin.components["minmax"]
    assert registry("calibration").get("minmax") is not original
    provided = {info.name: names for info, names in get_host().describe()}
    assert provided["tmp-override"] == {"calibration": ["minmax (overrides calibration)"]}
    assert "minmax" not in provided["calibration"]["calibration"]


def test_registering_a_plugin_name_twice_is_refused(temporary_plugin):
    temporary_plugin(TemporaryCalibration(["tmp_a"]), "tmp-same")
    with pytest.raises(PluginError, match="'tmp-same' is already registered"):
        get_host().register(TemporaryCalibration(["tmp_b"]), "tmp-same")


class TemporaryReporter:
    """A plugin replacing the built-in analysis report (``analysis_enable``) with its own file."""

    def __init__(self):
        self.requests = []

    @xquant_core.hookimpl
    def xquant_register_reporters(self, register):
        from xquant_core.reporting import REPORTER

        register(REPORTER, self, override=True)

    def write(self, request):
        from xquant_core.outputs import write_bytes_atomically
        from xquant_core.reporting import Report

        self.requests.append(request)
        text = f"# mine: {len(request.quant_model.graph.node)} nodes\n"
        write_bytes_atomically(request.report_path, text.encode("utf-8"))
        return Report(["my report"], {"mine": True})


def test_a_plugin_reporter_replaces_the_analysis_report(temporary_plugin, small_project):
    from xquant_core.config import load_config as load
    from xquant_core.pipeline import run

    config = json.loads((small_project / "cfg.json").read_text(encoding="utf-8"))
    config["quantization_parameters"]["analysis_enable"] = True
    (small_project / "cfg.json").write_text(json.dumps(config), encoding="utf-8")
    plugin = temporary_plugin(TemporaryReporter(), "tmp-reporter")
    result = run(load(small_project / "cfg.json"))
    (request,) = plugin.requests
    assert request.dataset.count == 12 and request.settings["calibration samples used"] == 12
    assert request.report_path == result.report_path and result.report_path.name.endswith("_report.md")
    assert result.report_path.read_text(encoding="utf-8").startswith("# mine: ")
    assert "my report" in result.summary and result.analysis == {"mine": True}
    provided = {info.name: names for info, names in get_host().describe()}
    assert provided["tmp-reporter"] == {"reporter": ["analysis (overrides reporter)"]}
