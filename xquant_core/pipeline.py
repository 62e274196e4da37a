"""The quantization pipeline, from a validated config to the written QDQ model.

load model -> onnxsim (unless skip_onnxsim) -> resolve inputs -> calibration data ->
engine (PPQ) with the platform plugin -> atomic write of ``<working_dir>/<prefix>.onnx``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import onnx

from . import control_flow
from . import model as model_io
from .calibration import CalibrationContext
from .config import XQuantConfig, load_config
from .data import CalibrationDataset, resolve_preprocessor
from .errors import DataError, ModelError, XQuantError
from .outputs import OutputError, check_folder, check_not_read, files_read, write_bytes_atomically
from .plugins import registry
from .runtime import onnxruntime_session
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
    #: the analysis summary's figures (:func:`xquant_core.analysis.summary_figures`), None without a report
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
        return Path(output)
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
    if model_path is not None:  # before the model is even read
        check_not_read(out_path, {model_path: "the input model"}, also_writes)
    check_folder(out_path)

    float_model = model_io.load_model(source)
    specs = model_io.resolve_inputs(float_model, cfg.calibration.inputs, "input_parametres")
    float_model = model_io.fix_input_shapes(float_model, specs)
    if cfg.quantization.precision_level == 3:
        check_not_read(out_path, files_read(model_path, float_model, cfg.source), also_writes)
        return Prepared(model_path, out_path, float_model, specs, None, None, None)

    readers = {spec.name: registry("reader").get(spec.config.file_type) for spec in specs}
    preprocessors = {spec.name: resolve_preprocessor(spec.config, registry("preprocessor")) for spec in specs}
    dataset = CalibrationDataset(specs, readers, preprocessors, cfg.calibration.calibration_step)
    check_not_read(
        out_path,
        files_read(
            model_path,
            float_model,
            cfg.source,
            [spec.config.data_list_path for spec in specs],
            [path for lists in (dataset.lists, dataset.held_back_lists) for paths in lists.values() for path in paths],
            [
                Path(spec.config.preprocess_file.rsplit(":", 1)[0])
                for spec in specs
                if ":" in spec.config.preprocess_file
            ],
        ),
        also_writes,
    )
    dataset.batch(0)  # fail fast on unreadable data, before the expensive parts
    return Prepared(
        model_path,
        out_path,
        float_model,
        specs,
        dataset,
        registry("platform").get(cfg.quantization.platform),
        registry("calibration").get(cfg.calibration.calibration_type),
    )


def run(
    cfg: XQuantConfig,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    output: str | os.PathLike | None = None,
    progress: ProgressFactory | None = None,
    also_writes: Mapping[Path, str] | None = None,
) -> QuantizationResult:
    """Run the whole pipeline; raise an :class:`XQuantError` on bad input. ``also_writes``: see
    :func:`prepare`."""
    started = time.perf_counter()
    prepared = prepare(cfg, model, output, also_writes)
    out_path, float_model, dataset = prepared.out_path, prepared.float_model, prepared.dataset
    if not cfg.model.skip_onnxsim:
        with _stage(progress, "onnxsim"):
            float_model = model_io.simplify(float_model, keep=_named_tensors(cfg))

    if dataset is None:
        from .dynamic import quantize_dynamic

        quantized = quantize_dynamic(float_model)
        write_model_atomically(quantized, out_path)
        return QuantizationResult(quantized, out_path, time.perf_counter() - started, 0, "cpu")

    if control_flow.count_quantized_ops(float_model)[1] == 0:
        ops = sorted({node.op_type for node in float_model.graph.node})
        raise ModelError(
            f"nothing to quantize: the model has no {'/'.join(sorted(control_flow.COMPUTE_OPS))} op "
            f"(its ops: {', '.join(ops) or 'none'}); xquant writes no model"
        )

    platform, algorithm = prepared.platform, prepared.algorithm
    device = choose_device(cfg.calibration.calibration_device)

    from .engine import EnginePlan, SubgraphOverride, quantize_graph

    plan = EnginePlan(
        algorithm=algorithm,
        context=CalibrationContext(max_percentile=cfg.quantization.max_percentile),
        precision_level=cfg.quantization.precision_level,
        finetune_level=cfg.quantization.finetune_level,
        device=device,
        overrides=tuple(
            SubgraphOverride(
                index=index,
                input_names=item.input_names,
                output_names=item.output_names,
                precision_level=item.precision_level,
                max_percentile=item.max_percentile,
                algorithm=registry("calibration").get(item.calibration_type) if item.calibration_type else None,
                float_after_calibration=item.float_after_calibration,
            )
            for index, item in enumerate(cfg.quantization.custom_setting)
        ),
    )
    cut = cfg.quantization.truncate_var_names
    upper, lower = model_io.split_at(float_model, cut) if cut else (float_model, [])
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
            quantized, search = search_precision(cfg, upper, dataset, platform, plan, progress)
        elif cfg.quantization.analysis_enable and not cut:  # the report measures fallbacks on the graph
            quantized, trial = quantize_graph(upper, dataset, len(dataset), platform, plan, progress, keep_graph=True)
        else:
            quantized = quantize_graph(upper, dataset, len(dataset), platform, plan, progress)
    except XQuantError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError, NotImplementedError) as exc:
        raise diagnose_failure(float_model, dataset, exc) from exc

    sections: tuple[str, ...] = ()
    summary: tuple[str, ...] = tuple(branches.lines()) + (quantized_ops_line(quantized),)
    snippet = None
    if search is not None:
        sections, summary, snippet = finish_search(cfg, search, out_path)
    if cut:
        quantized = model_io.reattach(quantized, float_model, lower)
    gap = verify_model(quantized, float_model, dataset.batch(0))
    if gap:
        log.warning(gap)
    seconds = time.perf_counter() - started
    report_path, figures = None, None
    if cfg.quantization.analysis_enable:  # before the model is written: an interrupt leaves no model
        with _stage(progress, "analysis"):
            report_path, lines, figures = analyse(
                cfg, float_model, quantized, dataset, out_path, seconds, device, sections, trial, progress
            )
        summary += lines
    elif sections:  # no analysis asked for: the report holds what auto_precision found, and nothing else
        report_path = out_path.with_name(f"{out_path.stem}_report.md")
        write_bytes_atomically(
            report_path,
            "\n".join(
                (
                    f"# Quantization report: {out_path.stem}",
                    "",
                    "(analysis_enable is false: no per-tensor analysis)",
                    "",
                    *sections,
                    "",
                )
            ).encode("utf-8"),
        )
        summary += (f"report: {report_path}",)
    write_model_atomically(quantized, out_path)
    if snippet is not None:
        write_bytes_atomically(*snippet)
    return QuantizationResult(quantized, out_path, seconds, dataset.count, device, report_path, summary, figures)


@dataclass(frozen=True)
class _Search:
    """What the auto-precision search found."""

    chosen: tuple  #: FloatOps, in the order they were chosen
    before: float  #: all-INT8, calibrated without the held-back samples
    estimate: float  #: with the first stage's ops in float, same calibration
    plain: float | None  #: all-INT8, calibrated on all samples (None: the first stage kept nothing float)
    recalibrated: float  #: the first stage's ops in float, calibrated on all samples
    final: float  #: the exported final model (calibrated on all samples)
    topped_up: int  #: ops added in the second stage
    candidates_tried: int
    seconds: float  #: both searches (ranking, candidates), not the two quantizations
    metric: Any
    held_back: int  #: how many samples were held back: every ``every``-th
    every: int


class _Subset(Sequence):
    """Some batches of a dataset, re-iterable and sized: ``load(index)`` reads one; ``total``:
    how many there were to pick from."""

    def __init__(self, load: Callable[[int], dict], indices: list[int], total: int | None = None):
        self.load, self.indices = load, indices
        self.total = len(indices) if total is None else total

    def __getitem__(self, position):  # one batch, never a slice
        return self.load(self.indices[position])

    def __iter__(self):
        return (self.load(index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def search_precision(cfg: XQuantConfig, model: onnx.ModelProto, dataset: CalibrationDataset, platform, plan, progress):
    """auto_precision: return the final quantized model and what the search found.

    Stage 1 calibrates on all samples but every 4th and searches for the float ops that
    meet the target on the held-back ones. Stage 2 quantizes on all samples with those
    ops in float (what the emitted custom_setting reproduces) and measures the exported
    model on the same held-back samples; when recalibration moved it past the target,
    the search goes on from there within the remaining budget. Every measurement is of an
    exported model run by onnxruntime, as the user will run it.
    """
    from .engine import HOLD_BACK_EVERY, FloatOpSearch, SubgraphOverride, quantize_graph

    auto = cfg.auto_precision
    assert auto is not None, "search_precision runs only with auto_precision set"
    metric = registry("metric").get(auto.metric)
    indices = list(range(len(dataset)))
    held_back = [dataset.batch(index) for index in indices if index % HOLD_BACK_EVERY == 0]
    training = _Subset(dataset.batch, [index for index in indices if index % HOLD_BACK_EVERY])
    if not len(training):
        raise DataError(
            f"auto_precision needs at least 2 calibration samples (one is held back); {dataset.count} found"
        )
    log.info(
        "auto_precision: calibrating on %d samples, measuring %s on %d held back",
        len(training),
        auto.metric,
        len(held_back),
    )
    float_runner = onnx_runner(model)
    cached = {id(feed): float_runner(feed) for feed in held_back}

    def reference_outputs(feed):  # a metric with its own data gets them computed
        return cached[id(feed)] if id(feed) in cached else float_runner(feed)

    def measure(quantized: onnx.ModelProto) -> float:
        return metric.measure(onnx_runner(quantized), reference_outputs, held_back)

    def keeping_float(ops) -> Any:
        first = len(plan.overrides)
        extra = tuple(
            SubgraphOverride(
                index=first + offset,
                input_names=op.input_names,
                output_names=op.output_names,
                precision_level=3,
                float_after_calibration=True,
            )
            for offset, op in enumerate(ops)
        )
        return dataclasses.replace(plan, overrides=plan.overrides + extra)

    first = quantize_graph(
        model,
        training,
        len(training),
        platform,
        plan,
        progress,
        search=FloatOpSearch(measure, metric, auto.target_value, auto.max_float_ops, held_back),
    )
    log.info("auto_precision: quantizing on all %d samples with %d op(s) in float", len(dataset), len(first.chosen))
    second = quantize_graph(
        model,
        dataset,
        len(dataset),
        platform,
        keeping_float(first.chosen),
        progress,
        search=FloatOpSearch(
            measure,
            metric,
            auto.target_value,
            auto.max_float_ops,
            held_back,
            already_float=[op.name for op in first.chosen],
        ),
    )
    search = _Search(
        first.chosen + second.chosen,
        first.before,
        first.estimate,
        second.plain,
        second.before,
        second.estimate,
        len(second.chosen),
        first.candidates_tried + second.candidates_tried,
        first.seconds + second.seconds,
        metric,
        len(held_back),
        HOLD_BACK_EVERY,
    )
    return second.model, search


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


def onnx_runner(model: onnx.ModelProto):
    """Run an ONNX model on one feed with onnxruntime: ``{input: array} -> {output: array}``."""
    session = onnxruntime_session(model)
    names = [output.name for output in session.get_outputs()]

    def run(feed):
        return dict(zip(names, session.run(names, feed)))

    return run


def finish_search(cfg: XQuantConfig, search: _Search, out_path: Path):
    """Warn when the target is missed, explain the search, write the reproducible custom_setting."""
    auto, final = cfg.auto_precision, search.final
    assert auto is not None, "finish_search runs only with auto_precision set"
    met = search.metric.meets(final, auto.target_value)
    settings = [dataclasses.asdict(item) for item in cfg.quantization.custom_setting]
    settings = [
        {
            key: (list(value) if isinstance(value, tuple) else value)
            for key, value in item.items()
            if value is not None and not (key == "float_after_calibration" and not value)
        }
        for item in settings
    ]
    settings += [
        {
            "input_names": list(op.input_names),
            "output_names": list(op.output_names),
            "precision_level": 3,
            "float_after_calibration": True,
        }
        for op in search.chosen
    ]
    snippet = json.dumps({"custom_setting": settings}, indent=2)
    snippet_path = out_path.with_name(f"{out_path.stem}_custom_setting.json")
    achieved = f"{auto.metric} {final:.6g} (target {auto.target_value:g})"
    count = len(search.chosen)
    if not met:
        log.warning(
            "auto_precision: the target was not met within max_float_ops=%d: %s with %d op(s) in float; "
            "writing the best model found",
            auto.max_float_ops,
            achieved,
            count,
        )
    summary = (
        f"auto_precision: {count} op(s) in float, {achieved}; all-INT8 {search.before:.6g}; "
        f"{search.candidates_tried} candidate(s) tried in {search.seconds:.1f} s",
        f"auto_precision: to reproduce without the search, use the custom_setting in {snippet_path}",
    )
    relation = ">=" if search.metric.higher_is_better else "<="
    lines = [
        "## Automatic mixed precision",
        "",
        f"Target: `{auto.metric}` {relation} {auto.target_value:g} at the model outputs on "
        f"{search.held_back} held-back calibration batch(es) (every {search.every}th), at most "
        f"{auto.max_float_ops} op(s) in float: **{'met' if met else 'not met'}**. Every value below is "
        "measured on an exported model run by onnxruntime.",
        "",
        "| stage | calibrated on | ops in float | metric |",
        "|---|---|---|---|",
        f"| all-INT8 | all but the held-back samples | 0 | {search.before:.6g} |",
        f"| search | all but the held-back samples | {count - search.topped_up} | {search.estimate:.6g} |",
        *([f"| all-INT8, recalibrated | all samples | 0 | {search.plain:.6g} |"] if search.plain is not None else []),
        f"| search, recalibrated | all samples | {count - search.topped_up} | {search.recalibrated:.6g} |",
        f"| final model | all samples | {count} | {final:.6g} |",
        "",
        f"Candidates tried: {search.candidates_tried}, search time {search.seconds:.1f} s (ranking: one float "
        "and one quantized pass; each candidate: one export and one onnxruntime pass over the held-back "
        "samples)"
        + (f"; {search.topped_up} op(s) added after recalibration on all samples" if search.topped_up else "")
        + ".",
        "",
    ]
    lines += ["| op | type | sensitivity (SNR added) | inputs | outputs |", "|---|---|---|---|---|"]
    lines += [
        f"| `{op.name}` | {op.type} | {op.sensitivity:.4g} | {', '.join(op.input_names)} | "
        f"{', '.join(op.output_names)} |"
        for op in search.chosen
    ]
    lines += [
        "",
        "The same model without the search: put this in `quantization_parameters` (it is also in "
        f"`{snippet_path.name}`) and remove `auto_precision`:",
        "",
        "```json",
        snippet,
        "```",
    ]
    return tuple(lines), summary, (snippet_path, (snippet + "\n").encode("utf-8"))


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
    """Write ``<prefix>_report.md`` (+ chart); a failure costs a warning, never the model."""
    from .analysis import CANDIDATE_BATCHES, DEFAULT_MAX_BATCHES, HELD_BACK_MAX, spread, write_report

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
    try:
        wanted = CANDIDATE_BATCHES if trial is not None else DEFAULT_MAX_BATCHES
        batches = [dataset.batch(index) for index in spread(len(dataset), wanted)]
        held_back = _Subset(
            dataset.held_back_batch, spread(dataset.held_back_count, HELD_BACK_MAX), dataset.held_back_count
        )
        report = write_report(
            float_model,
            quantized,
            batches,
            report_path,
            settings,
            seconds,
            sections,
            trial,
            progress,
            held_back if len(held_back) else None,
        )
    except OutputError:
        raise  # the folder cannot take files (a full disk): the model would not be written either
    except Exception as exc:  # the analysis is advice: never lose the quantized model over it
        log.warning("the analysis report could not be made (%s: %s); going on without it", type(exc).__name__, exc)
        log.debug("analysis failure", exc_info=True)
        return None, (), None
    return report_path, tuple(report.lines), report.figures


def write_model_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` via a temporary file + rename: never a partial file."""
    write_bytes_atomically(path, model.SerializeToString())
