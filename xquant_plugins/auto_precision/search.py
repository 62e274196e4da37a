"""The auto-precision search: the fewest ops to keep in float for a target error, then explained."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from xquant_core.config import XQuantConfig
from xquant_core.data import CalibrationDataset, Subset
from xquant_core.errors import DataError
from xquant_core.plugins import registry
from xquant_core.runtime import onnxruntime_session

log = logging.getLogger("xquant")


@dataclass(frozen=True)
class Search:
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

    @classmethod
    def of(cls, first, second, metric, held_back: int, every: int) -> Search:
        """The two stages' :class:`xquant_core.engine.SearchResult` taken together."""
        return cls(
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
            held_back,
            every,
        )


def search_precision(cfg: XQuantConfig, model: onnx.ModelProto, dataset: CalibrationDataset, platform, plan, progress):
    """auto_precision: return the final quantized model and what the search found.

    Stage 1 calibrates on all samples but every 4th and searches for the float ops that
    meet the target on the held-back ones. Stage 2 quantizes on all samples with those
    ops in float (what the emitted custom_setting reproduces) and measures the exported
    model on the same held-back samples; when recalibration moved it past the target,
    the search goes on from there within the remaining budget. Every measurement is of an
    exported model run by onnxruntime, as the user will run it.
    """
    from xquant_core.engine import HOLD_BACK_EVERY, FloatOpSearch, quantize_graph

    auto = cfg.auto_precision
    assert auto is not None, "search_precision runs only with auto_precision set"
    metric = registry("metric").get(auto.metric)
    training, held_back = _split(dataset, HOLD_BACK_EVERY)
    log.info(
        "auto_precision: calibrating on %d samples, measuring %s on %d held back",
        len(training),
        auto.metric,
        len(held_back),
    )
    measure = _measurer(model, metric, held_back)
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
        _keeping_float(plan, first.chosen),
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
    return second.model, Search.of(first, second, metric, len(held_back), HOLD_BACK_EVERY)


def _split(dataset: CalibrationDataset, every: int) -> tuple[Subset, list]:
    """(the samples to calibrate on, the held-back feeds: every ``every``-th sample)."""
    indices = list(range(len(dataset)))
    held_back = [dataset.batch(index) for index in indices if index % every == 0]
    training = Subset(dataset.batch, [index for index in indices if index % every])
    if not len(training):
        raise DataError(
            f"auto_precision needs at least 2 calibration samples (one is held back); {dataset.count} found"
        )
    return training, held_back


def _measurer(model: onnx.ModelProto, metric, held_back: list):
    """``measure(quantized model) -> the metric`` on the held-back feeds, the float outputs cached."""
    float_runner = onnx_runner(model)
    cached = {id(feed): float_runner(feed) for feed in held_back}

    def reference_outputs(feed):  # a metric with its own data gets them computed
        return cached[id(feed)] if id(feed) in cached else float_runner(feed)

    def measure(quantized: onnx.ModelProto) -> float:
        return metric.measure(onnx_runner(quantized), reference_outputs, held_back)

    return measure


def _keeping_float(plan, ops) -> Any:
    """``plan`` with ``ops`` kept float after calibration, after the config's own custom_setting."""
    from xquant_core.engine import SubgraphOverride

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


def onnx_runner(model: onnx.ModelProto):
    """Run an ONNX model on one feed with onnxruntime: ``{input: array} -> {output: array}``."""
    session = onnxruntime_session(model)
    names = [output.name for output in session.get_outputs()]

    def run(feed):
        return dict(zip(names, session.run(names, feed)))

    return run


def _reproducing_setting(cfg: XQuantConfig, search: Search) -> list[dict]:
    """The config's own custom_setting followed by the ops the search kept float: the same model
    without the search."""
    settings = [
        {
            key: (list(value) if isinstance(value, tuple) else value)
            for key, value in dataclasses.asdict(item).items()
            if value is not None and not (key == "float_after_calibration" and not value)
        }
        for item in cfg.quantization.custom_setting
    ]
    return settings + [
        {
            "input_names": list(op.input_names),
            "output_names": list(op.output_names),
            "precision_level": 3,
            "float_after_calibration": True,
        }
        for op in search.chosen
    ]


def finish_search(cfg: XQuantConfig, search: Search, out_path: Path):
    """Warn when the target is missed, explain the search, write the reproducible custom_setting."""
    auto, final = cfg.auto_precision, search.final
    assert auto is not None, "finish_search runs only with auto_precision set"
    met = search.metric.meets(final, auto.target_value)
    snippet = json.dumps({"custom_setting": _reproducing_setting(cfg, search)}, indent=2)
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
    lines = _search_section(auto, search, met, snippet, snippet_path)
    return tuple(lines), summary, (snippet_path, (snippet + "\n").encode("utf-8"))


def _search_section(auto, search: Search, met: bool, snippet: str, snippet_path: Path) -> list[str]:
    """The report's "Automatic mixed precision" section."""
    final, count = search.final, len(search.chosen)
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
    return lines
