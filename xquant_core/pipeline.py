"""The quantization pipeline, from a validated config to the written QDQ model.

load model -> onnxsim (unless skip_onnxsim) -> resolve inputs -> calibration data ->
engine (PPQ) with the platform plugin -> atomic write of ``<working_dir>/<prefix>.onnx``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import onnx

from . import control_flow
from . import model as model_io
from .calibration import CalibrationContext
from .config import PREPROCESS_NONE, XQuantConfig, load_config
from .data import CalibrationDataset, resolve_preprocessor
from .errors import ConfigError, ModelError, XQuantError
from .outputs import (
    OutputError,
    all_or_nothing,
    check_folder,
    check_not_read,
    files_read,
    output_file,
    write_bytes_atomically,
)
from .plugins import registry
from .reporting import REPORTER, ReportRequest
from .runtime import libraries_loaded
from .searching import SEARCHER
from .verify import diagnose_failure, verify_model

log = logging.getLogger("xquant")

ProgressFactory = Callable[[str, Optional[int]], Any]


@dataclass(frozen=True)
class QuantizationResult:
    model: onnx.ModelProto
    output_path: Path
    seconds: float
    samples: int
    device: str
    report_path: Path | None = None
    summary: tuple[str, ...] = ()
    #: the report's summary figures (the built-in one's: :func:`xquant_plugins.analysis.summary_figures`), None without
    analysis: dict[str, Any] | None = None


def quantize_onnx_model(
    config_or_path: str | os.PathLike | Mapping[str, Any] | XQuantConfig,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
) -> onnx.ModelProto:
    """Quantize a float ONNX model as the config says; return the QDQ ``onnx.ModelProto``.

    ``config_or_path``: a config file path, a dict in the same format, or a loaded config.
    ``model``: overrides ``model_parameters.onnx_model`` (a path or an ``onnx.ModelProto``).
    ``output``: overrides ``<working_dir>/<output_prefix>.onnx``. The returned model is
    the one written to disk.
    """
    cfg = config_or_path if isinstance(config_or_path, XQuantConfig) else load_config(config_or_path)
    return run(cfg, model=model, output=output).model


def output_path_for(cfg: XQuantConfig, model_path: Path | None, output: str | os.PathLike | None) -> Path:
    if output is not None:
        return output_file(output)
    if model_path is not None:
        stem = model_path.stem
    else:
        stem = "model"
    prefix = cfg.model.output_prefix or f"{stem}.q"
    working_dir = cfg.model.working_dir or (model_path.parent if model_path is not None else Path.cwd())
    return working_dir / f"{prefix}.onnx"


def choose_device(requested: str | None) -> str:
    from .engine import cuda_available

    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        log.warning("calibration_device is cuda but CUDA is not available: calibrating on cpu")
    return "cpu"


@dataclass
class Prepared:
    """What a run has checked before the expensive parts: paths, the float model, the data."""

    model_path: Path | None
    out_path: Path
    float_model: onnx.ModelProto
    specs: list
    dataset: CalibrationDataset | None  # None (and no platform, algorithm) for dynamic quantization
    platform: Any
    algorithm: Any


def prepare(
    cfg: XQuantConfig,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
    also_writes: Mapping[Path, str] | None = None,
) -> Prepared:
    """Output paths, the model and its inputs, the calibration lists and first batch: every check
    that needs neither PPQ nor torch (``xquant check`` stops here). ``also_writes``: files the
    caller writes after the run (path -> what it is), checked like the run's own outputs."""
    source = model if model is not None else cfg.model.onnx_model
    if source is None:
        raise ModelError("no model: set model_parameters.onnx_model in the config or pass a model (-i)")
    model_path = None if isinstance(source, onnx.ModelProto) else Path(source)
    out_path = output_path_for(cfg, model_path, output)
    check_folder(out_path)
    if model_path is not None:  # before the model is even read
        check_not_read(out_path, {model_path: "the input model"}, also_writes)

    float_model, external_data = model_io.read_model(source)
    specs = model_io.resolve_inputs(float_model, cfg.calibration.inputs, "input_parametres")
    float_model = model_io.fix_input_shapes(float_model, specs)
    platform = registry("platform").get(cfg.quantization.platform)
    if cfg.quantization.precision_level == 3:
        if not callable(getattr(platform, "quantize_dynamic", None)):
            raise ConfigError(
                [
                    "$.quantization_parameters.precision_level: 3 (dynamic quantization) is not something platform "
                    f"{cfg.quantization.platform} does (it has no quantize_dynamic); use 0-2, or 3 in a custom_setting"
                ],
                cfg.source or "config",
            )
        check_not_read(out_path, files_read(model_path, external_data, cfg.source), also_writes)
        return Prepared(model_path, out_path, float_model, specs, None, platform, None)

    readers = {spec.name: registry("reader").get(spec.config.file_type) for spec in specs}
    _warn_unused_normalisation(specs, readers)
    _warn_low_percentiles(cfg)
    preprocessors = {spec.name: resolve_preprocessor(spec.config, registry("preprocessor")) for spec in specs}
    dataset = CalibrationDataset(specs, readers, preprocessors, cfg.calibration.calibration_step)
    check_not_read(out_path, _inputs_read(cfg, model_path, external_data, specs, dataset), also_writes)
    dataset.batch(0)  # fail fast on unreadable data, before the expensive parts
    return Prepared(
        model_path,
        out_path,
        float_model,
        specs,
        dataset,
        platform,
        registry("calibration").get(cfg.calibration.calibration_type),
    )


def _warn_unused_normalisation(specs, readers) -> None:
    """mean_value/std_value normalise 0-255 pixel values: given for samples that are not images
    (npy, raw) and no preprocess function that could read them, they change nothing."""
    for spec in specs:
        config = spec.config
        image = getattr(readers[spec.name], "is_image", False)
        builtin = (config.preprocess_file or PREPROCESS_NONE) == PREPROCESS_NONE  # a plugin's may read them
        if (config.mean_value or config.std_value) and not image and builtin:
            log.warning(
                "input %s: mean_value/std_value apply to images (file_type img); its %s samples are fed as "
                "they are, so they are ignored (normalise the samples themselves, or use a preprocess_file)",
                spec.name,
                config.file_type,
            )


#: a max_percentile below this clips so much of every activation that outputs land far from float
LOW_PERCENTILE = 0.99


def _warn_low_percentiles(cfg: XQuantConfig) -> None:
    """max_percentile 0.9 is valid and exits 0, with O-net's outputs at cosine 0.59: say so up front."""
    values = [("max_percentile", cfg.quantization.max_percentile)] + [
        (f"custom_setting[{index}].max_percentile", item.max_percentile)
        for index, item in enumerate(cfg.quantization.custom_setting)
    ]
    for field, value in values:
        if value is not None and value < LOW_PERCENTILE:
            log.warning(
                "%s is %g: the clip windows may then cut off %.3g%% of every activation's values, and the "
                "model's outputs usually land far from float (the default is 0.9999)",
                field,
                value,
                100 * (1 - value),
            )


def _inputs_read(cfg: XQuantConfig, model_path, external_data, specs, dataset: CalibrationDataset):
    """Every file a static run reads: the model, the config, the lists, the samples, the preprocessors."""
    return files_read(
        model_path,
        external_data,
        cfg.source,
        [spec.config.data_list_path for spec in specs],
        [path for lists in (dataset.lists, dataset.held_back_lists) for paths in lists.values() for path in paths],
        [Path(spec.config.preprocess_file.rsplit(":", 1)[0]) for spec in specs if ":" in spec.config.preprocess_file],
    )


def run(
    cfg: XQuantConfig,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
    progress: ProgressFactory | None = None,
    also_writes: Mapping[Path, str] | None = None,
    own_process: bool = False,
) -> QuantizationResult:
    """Run the whole pipeline; raise an :class:`XQuantError` on bad input. ``also_writes``: see
    :func:`prepare`. The inputs are checked before the heavy libraries load (a bad input fails in
    a second); those load up front and out of garbage collection (:func:`.runtime.libraries_loaded`;
    ``own_process``: the process ends with the run, as the command line's does)."""
    started = time.perf_counter()
    _check_arguments(model, output)
    prepared = prepare(cfg, model, output, also_writes)
    cache = None if cfg.model.skip_onnxsim else model_io.OnnxsimCache.for_model(prepared.float_model)
    needs_onnxsim = not cfg.model.skip_onnxsim and not (cache is not None and cache.hit)
    with (
        libraries_loaded(ppq=prepared.dataset is not None, onnxsim=needs_onnxsim, own_process=own_process),
        all_or_nothing(),  # the model, its report and chart: all written, or none
    ):
        return _run(cfg, prepared, started, progress, cache)


def _check_arguments(model, output) -> None:
    """The API's ``model=`` and ``output=``, before anything uses them."""
    if isinstance(model, (bytes, bytearray)):
        raise ModelError("model= is bytes: give a path, or onnx.load_model_from_string(data) for a serialized model")
    if model is not None and not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ModelError(f"model= must be a path or an onnx.ModelProto, not {type(model).__name__}")
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise OutputError(f"output= must be a path, not {type(output).__name__}")


def _run(
    cfg: XQuantConfig, prepared: Prepared, started: float, progress: ProgressFactory | None, cache
) -> QuantizationResult:
    out_path, float_model, dataset = prepared.out_path, prepared.float_model, prepared.dataset
    if not cfg.model.skip_onnxsim:
        with _stage(progress, "onnxsim"):
            float_model = model_io.simplify(float_model, keep=_named_tensors(cfg), cache=cache)
    if dataset is None:  # global precision_level 3: the platform's dynamic mode
        quantized = prepared.platform.quantize_dynamic(float_model)
        model_io.keep_metadata(quantized, prepared.float_model)
        write_model_atomically(quantized, out_path)
        return QuantizationResult(quantized, out_path, time.perf_counter() - started, 0, "cpu")
    _check_something_to_quantize(float_model)

    device = choose_device(cfg.calibration.calibration_device)
    plan = engine_plan(cfg, prepared.algorithm, device)
    cut = cfg.quantization.truncate_var_names
    upper, lower = model_io.split_at(float_model, cut) if cut else (float_model, [])
    if cut:
        _check_settings_above_the_cut(cfg, upper, float_model)
    quantized, search, trial, branches = _quantize(cfg, float_model, upper, dataset, prepared.platform, plan, progress)

    summary: tuple[str, ...] = (*branches.lines(), quantized_ops_line(quantized))
    sections: tuple[str, ...] = ()
    snippet = None
    if search is not None:
        sections, summary, snippet = registry("searcher").get(SEARCHER).explain(cfg, search, out_path)
    if cut:
        quantized = model_io.reattach(quantized, float_model, lower)
    model_io.keep_metadata(quantized, prepared.float_model)
    gap = verify_model(quantized, float_model, dataset.batch(0))
    if gap:
        log.warning(gap)
    seconds = time.perf_counter() - started
    figures = None
    if cfg.quantization.analysis_enable:
        with _stage(progress, "analysis"):
            report_path, lines, figures = analyse(
                cfg, float_model, quantized, dataset, out_path, seconds, device, sections, trial, progress
            )
    else:
        report_path, lines = _auto_precision_report(out_path, sections)
    write_model_atomically(quantized, out_path)
    if snippet is not None:
        write_bytes_atomically(*snippet)
    return QuantizationResult(
        quantized, out_path, seconds, dataset.count, device, report_path, summary + lines, figures
    )


def _check_settings_above_the_cut(cfg: XQuantConfig, upper: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    """A custom_setting tensor below the truncate_var_names cut (that part stays float) is named as
    such: "not in the graph" sent users to skip_onnxsim, which does not help."""

    def tensors(model: onnx.ModelProto) -> set[str]:
        return {name for node in model.graph.node for name in node.output} | {v.name for v in model.graph.input}

    above, everywhere = tensors(upper), tensors(float_model)
    for index, item in enumerate(cfg.quantization.custom_setting):
        for field, names in (("input_names", item.input_names), ("output_names", item.output_names)):
            below = [name for name in names if name not in above and name in everywhere]
            if below:
                raise ModelError(
                    f"$.quantization_parameters.custom_setting[{index}].{field}: {', '.join(below)} lie(s) below "
                    "the truncate_var_names cut, which stays float: a custom_setting applies above it"
                )


def _check_something_to_quantize(float_model: onnx.ModelProto) -> None:
    if control_flow.count_quantized_ops(float_model)[1] == 0:
        ops = sorted({node.op_type for node in float_model.graph.node})
        raise ModelError(
            f"nothing to quantize: the model has no {'/'.join(sorted(control_flow.COMPUTE_OPS))} op "
            f"(its ops: {', '.join(ops) or 'none'}); xquant writes no model"
        )


def engine_plan(cfg: XQuantConfig, algorithm, device: str):
    """The config resolved for the engine: plugin names to plugin objects, ``custom_setting`` in order."""
    from .engine import EnginePlan, SubgraphOverride

    calibration = registry("calibration")
    overrides = tuple(
        SubgraphOverride(
            index=index,
            input_names=item.input_names,
            output_names=item.output_names,
            precision_level=item.precision_level,
            max_percentile=item.max_percentile,
            algorithm=calibration.get(item.calibration_type) if item.calibration_type else None,
            float_after_calibration=item.float_after_calibration,
        )
        for index, item in enumerate(cfg.quantization.custom_setting)
    )
    return EnginePlan(
        algorithm=algorithm,
        context=CalibrationContext(max_percentile=cfg.quantization.max_percentile),
        precision_level=cfg.quantization.precision_level,
        finetune_level=cfg.quantization.finetune_level,
        device=device,
        overrides=overrides,
    )


def _quantize(cfg: XQuantConfig, float_model, upper, dataset: CalibrationDataset, platform, plan, progress):
    """The upper graph quantized (If branches first, then the rest, or the auto-precision search):
    ``(model, search or None, FloatTrial or None, BranchReport)``. A PPQ failure is diagnosed."""
    from .engine import quantize_graph

    search = trial = None
    branches = control_flow.BranchReport()
    try:
        if control_flow.has_control_flow(upper):
            branch_plan = dataclasses.replace(plan, overrides=())  # custom_setting names the outer graph's tensors
            upper, branches = control_flow.quantize_branches(
                upper,
                [dataset.batch(index) for index in range(len(dataset))],
                lambda branch, feeds: quantize_graph(branch, feeds, len(feeds), platform, branch_plan, progress),
            )
        if cfg.auto_precision is not None:
            searcher = registry("searcher").get(SEARCHER)
            quantized, search = searcher.quantize(cfg, upper, dataset, platform, plan, progress)
        elif cfg.quantization.analysis_enable and not cfg.quantization.truncate_var_names:
            # the report measures float fallbacks on the quantized graph
            quantized, trial = quantize_graph(upper, dataset, len(dataset), platform, plan, progress, keep_graph=True)
        else:
            quantized = quantize_graph(upper, dataset, len(dataset), platform, plan, progress)
    except XQuantError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError, NotImplementedError) as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, XQuantError):  # PPQ wraps what its hooks raise
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise diagnose_failure(float_model, dataset, exc) from exc
    return quantized, search, trial, branches


def _auto_precision_report(out_path: Path, sections: tuple[str, ...]) -> tuple[Path | None, tuple[str, ...]]:
    """With analysis off, a report holding only what auto_precision found (``sections``), if anything."""
    if not sections:
        return None, ()
    report_path = out_path.with_name(f"{out_path.stem}_report.md")
    text = "\n".join(
        (
            f"# Quantization report: {out_path.stem}",
            "",
            "(analysis_enable is false: no per-tensor analysis)",
            "",
            *sections,
            "",
        )
    )
    write_bytes_atomically(report_path, text.encode("utf-8"))
    return report_path, (f"report: {report_path}",)


def _named_tensors(cfg: XQuantConfig) -> set[str]:
    """The tensors the config names (custom_setting boundaries, truncation points): the rewrites keep them."""
    named = set(cfg.quantization.truncate_var_names)
    for item in cfg.quantization.custom_setting:
        named.update(item.input_names, item.output_names)
    return named


@contextlib.contextmanager
def _stage(progress: ProgressFactory | None, label: str):
    """A stage without batches (onnxsim, the analysis) for the progress reporter."""
    bar = progress(label, None) if progress else None
    try:
        yield
    finally:
        if bar is not None:
            bar.close()


def quantized_ops_line(model: onnx.ModelProto) -> str:
    """How many Conv/ConvTranspose/Gemm/MatMul ops run in INT8 (subgraphs included); a warning when none do."""
    reading, compute = control_flow.count_quantized_ops(model)
    if compute and not reading:
        log.warning(
            "nothing was quantized: none of the model's %d Conv/ConvTranspose/Gemm/MatMul ops reads "
            "int8 data (they sit where xquant keeps float: a custom_setting, precision_level, a branch "
            "no calibration sample takes)",
            compute,
        )
    return f"INT8: {reading} of {compute} Conv/ConvTranspose/Gemm/MatMul ops"


def analyse(
    cfg: XQuantConfig,
    float_model,
    quantized,
    dataset,
    out_path: Path,
    seconds: float,
    device: str,
    sections: tuple[str, ...] = (),
    trial=None,
    progress: ProgressFactory | None = None,
) -> tuple[Path | None, tuple[str, ...], dict | None]:
    """Write ``<prefix>_report.md`` (+ chart) with the registered reporter; a failure costs a
    warning, never the model."""
    report_path = out_path.with_name(f"{out_path.stem}_report.md")
    settings = {
        "platform": cfg.quantization.platform,
        "calibration_type": cfg.calibration.calibration_type,
        "calibration_step": cfg.calibration.calibration_step,
        "calibration samples used": dataset.count,
        "calibration_device": device,
        "precision_level": cfg.quantization.precision_level,
        "finetune_level": cfg.quantization.finetune_level,
        "max_percentile": cfg.quantization.max_percentile,
        "custom_setting": len(cfg.quantization.custom_setting),
        "truncate_var_names": list(cfg.quantization.truncate_var_names),
        "skip_onnxsim": cfg.model.skip_onnxsim,
    }
    request = ReportRequest(float_model, quantized, dataset, report_path, settings, seconds, sections, trial, progress)
    try:
        report = registry("reporter").get(REPORTER).write(request)
    except OutputError:
        raise  # the folder cannot take files (a full disk): the model would not be written either
    except Exception as exc:  # the report is advice: never lose the quantized model over it
        log.warning("the analysis report could not be made (%s: %s); going on without it", type(exc).__name__, exc)
        log.debug("analysis failure", exc_info=True)
        return None, (), None
    return report_path, tuple(report.lines), report.figures


def write_model_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` via a temporary file + rename: never a partial file."""
    write_bytes_atomically(path, model.SerializeToString())
