"""The report written: measure, find, render, the console lines and the --summary-json figures."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from xquant_core.hookspecs import ReportContext
from xquant_core.outputs import write_bytes_atomically
from xquant_core.plugins import get_host
from xquant_core.reporting import Report
from xquant_core.runtime import release_memory

from . import fallback
from .findings import Row, _json_number, rows_worst_first, suggest
from .limits import CANDIDATE_BATCHES, FLAG_COSINE, FLAG_SNR, HELD_BACK_CANDIDATES, TIME_FRACTION
from .measure import Measurement, held_back_outputs, measure
from .render import _cos, _num, render_chart, render_markdown, verdict

log = logging.getLogger("xquant.analysis")


def summary_lines(
    measurement: Measurement,
    rows: list[Row],
    report_path: Path,
    quantize_seconds: float,
    analysis_seconds: float,
    candidates: Sequence[fallback.Candidate] | None = None,
    baseline: float | None = None,
) -> list[str]:
    lines = [f"analysis: {verdict(measurement)}".replace("`", "")]
    outputs = ", ".join(f"{name} SNR {_num(s.snr)} cosine {_cos(s.cosine)}" for name, s in measurement.outputs.items())
    if outputs:
        lines.append(f"analysis: model output {outputs} on {measurement.outputs_on} (SNR: lower is better)")
    flagged = sum(1 for row in rows if row.stats.flagged)
    lines.append(
        f"analysis: {flagged} of {len(measurement.stats)} tensors flagged (SNR > {FLAG_SNR} or cosine < {FLAG_COSINE})"
    )
    if rows:
        worst = rows[0]
        lines.append(
            f"analysis: worst {worst.op.label} {worst.probe.var}: SNR {_num(worst.stats.snr)}, "
            f"cosine {_cos(worst.stats.cosine)}"
        )
    hint = "; a custom_setting to keep the worst subgraph in float is in it" if flagged else ""
    if candidates and baseline is not None and candidates[0].error < baseline:
        best = candidates[0]
        lines.append(
            f"analysis: keeping {', '.join(best.proposal.input_names)} -> "
            f"{', '.join(best.proposal.output_names)} in float ({best.ops} ops) measured mean output SNR "
            f"{_num(baseline)} -> {_num(best.error)}"
        )
        hint = "; its custom_setting is in it"
    lines.append(f"analysis: report {report_path}{hint}")
    fraction = analysis_seconds / quantize_seconds if quantize_seconds > 0 else math.nan
    lines.append(
        f"analysis: took {analysis_seconds:.1f} s = {fraction:.0%} of the quantization time ({quantize_seconds:.1f} s)"
    )
    return lines


def summary_figures(
    measurement: Measurement,
    rows: list[Row],
    candidates: Sequence[fallback.Candidate] | None,
    baseline: float | None,
    analysis_seconds: float,
) -> dict[str, Any]:
    """The summary's figures for scripts (``--summary-json``): what the console lines say, as numbers."""
    worst = rows[0] if rows else None
    return {
        "verdict": verdict(measurement).replace("`", ""),
        "needs_attention": any(out.flagged for out in measurement.outputs.values()),
        "outputs": {
            name: {"snr": _json_number(out.snr), "cosine": _json_number(out.cosine)}
            for name, out in measurement.outputs.items()
        },
        "batches": measurement.batches_used,
        "outputs_measured_on": measurement.outputs_on,
        "tensors_flagged": sum(1 for row in rows if row.stats.flagged),
        "tensors": len(measurement.stats),
        "worst": None
        if worst is None
        else {
            "op": worst.op.label,
            "tensor": worst.probe.var,
            "snr": _json_number(worst.stats.snr),
            "cosine": _json_number(worst.stats.cosine),
        },
        "next_step": None
        if candidates is None
        else {
            "mean_output_snr_now": baseline,
            "batches": candidates[0].batches if candidates else 0,
            "measured_on": measurement.candidates_on,
            "candidates": [
                {
                    **c.custom_setting(),
                    "proposed_as": c.proposal.why,
                    "ops": c.ops,
                    "compute_ops": c.compute_ops,
                    "mean_output_snr": _json_number(c.error),
                    "output_snr": {name: _json_number(v) for name, v in c.output_errors.items()},
                }
                for c in candidates
            ],
        },
        "seconds": analysis_seconds,
    }


def _where_outputs_are_measured(measurement, float_model, quant_model, batches, held_back):
    """The batches the candidates are measured on and both models' outputs on them (None: not run
    yet); with held-back samples, the model outputs' figures are replaced by those over them."""
    used = list(batches)[:CANDIDATE_BATCHES]
    measurement.candidates_on = f"{len(used)} calibration batch(es) spread over the list"
    if not held_back:
        measurement.notes.append(
            "no sample is held back: the model outputs and the Next step are measured on "
            "calibration batches; list more samples than calibration_step and the report "
            "measures them on the rest, which calibration never saw"
        )
        # the first batches went through both models in measure(): their outputs are kept
        reference = [f for f, _ in measurement.output_values[: len(used)]]
        quantized = [q for _, q in measurement.output_values[: len(used)]]
        rest = used[len(reference) :]
        if rest:
            reference += fallback.model_outputs(float_model, rest)
            quantized += fallback.model_outputs(quant_model, rest)
        return used, reference, quantized
    measurement.outputs, used, reference, quantized = held_back_outputs(
        float_model, quant_model, held_back, len(held_back), HELD_BACK_CANDIDATES
    )
    total = getattr(held_back, "total", len(held_back))
    measurement.outputs_on = f"{len(held_back)} held-back sample(s)" + (
        f" spread over the {total} listed" if total > len(held_back) else ""
    )
    measurement.candidates_on = (
        f"{len(used)} held-back sample(s) (listed after the first calibration_step: never calibrated on)"
    )
    return used, reference, quantized


def _measure_candidates(float_model, quant_model, suggestions, trial, used, reference, quantized, progress):
    """The "Next step" proposals measured (:mod:`.fallback`) and the mean output SNR as exported
    (``reference``/``quantized``: the models' outputs on ``used`` when already run, else None)."""
    reference = reference if reference is not None else fallback.model_outputs(float_model, used)
    quantized = quantized if quantized is not None else fallback.model_outputs(quant_model, used)
    baseline = float(np.mean(list(fallback.errors_between(quantized, reference).values())))
    proposals = [
        fallback.Proposal(s.input_names, s.output_names, f"where the error grows most: {s.op.label}")
        for s in suggestions
    ] + fallback.stem_proposals(float_model)
    bar = progress("analysis: float-fallback candidates", len(proposals)) if progress else None
    candidates = fallback.measure_candidates(
        float_model, proposals, trial, used, reference, bar.update if bar is not None else None
    )
    if bar is not None:
        bar.close()
    return candidates, baseline


def _measured(float_model, quant_model, batches, quantize_seconds: float) -> Measurement:
    """Every probe measured within the report's time budget; what quantization freed and what the
    measurement freed handed back to the system before and after (the report's runs come on top
    of what is kept)."""
    budget = TIME_FRACTION * quantize_seconds if quantize_seconds > 0 else None
    release_memory()
    measurement = measure(float_model, quant_model, list(batches), time_budget=budget)
    release_memory()
    return measurement


def write_report(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    report_path: Path,
    settings: dict,
    quantize_seconds: float,
    sections: Sequence[str] = (),
    trial: fallback.Trial | None = None,
    progress: Any = None,
    held_back: Sequence[dict[str, np.ndarray]] | None = None,
) -> Report:
    """Measure the exported QDQ model against the float model; write the report and its chart.

    ``float_model``: the model quantized (after onnxsim); ``quant_model``: the exported QDQ model;
    ``batches``: calibration batches ``{input_name: array}`` (at most :data:`DEFAULT_MAX_BATCHES`).
    Writes ``report_path`` (Markdown) and its ``.png`` chart atomically; returns the console's
    summary lines and the summary's figures. Neither model is modified; raises on failure (the
    pipeline warns and keeps the model). ``sections``: Markdown lines after the settings (e.g.
    auto-precision's). With ``trial`` (the engine's quantized graph) the "Next step" measures its
    float-fallback candidates (:mod:`.fallback`), else it lists unmeasured suggestions.
    ``held_back``: samples never calibrated on; when given, the outputs' figures and the
    candidates are measured on them, not on ``batches``.
    """
    started = time.perf_counter()
    report_path = Path(report_path)
    measurement = _measured(float_model, quant_model, batches, quantize_seconds)
    rows = rows_worst_first(measurement)
    suggestions = suggest(measurement)
    used, reference, quantized = _where_outputs_are_measured(measurement, float_model, quant_model, batches, held_back)
    release_memory()
    candidates, baseline = None, None
    if trial is not None:
        candidates, baseline = _measure_candidates(
            float_model, quant_model, suggestions, trial, used, reference, quantized, progress
        )
    context = ReportContext(
        float_model, quant_model, list(batches)[: measurement.batches_used], dict(measurement.outputs),
        measurement.outputs_on, report_path,
    )  # fmt: skip
    sections = (*sections, *get_host().report_sections(context))
    chart_path = report_path.with_suffix(".png")
    title = report_path.stem.removesuffix("_report")
    _write_chart(chart_path, measurement, title, candidates, baseline)
    analysis_seconds = time.perf_counter() - started
    text = render_markdown(
        measurement, rows, suggestions, settings, quantize_seconds, analysis_seconds, chart_path.name, title,
        sections, candidates, baseline,
    )  # fmt: skip
    write_bytes_atomically(report_path, text.encode("utf-8"))
    lines = summary_lines(measurement, rows, report_path, quantize_seconds, analysis_seconds, candidates, baseline)
    figures = summary_figures(measurement, rows, candidates, baseline, analysis_seconds)
    log.debug(
        "analysis: %d ops, %d tensors, %d batches in %.2f s",
        len(measurement.ops),
        len(measurement.stats),
        measurement.batches_used,
        analysis_seconds,
    )
    return Report(lines, figures)


def _write_chart(chart_path: Path, measurement, title: str, candidates, baseline) -> None:
    """The per-op SNR chart as a PNG, the best measured fallback's ops marked when it helps."""
    import cv2

    helps = candidates and (baseline is None or candidates[0].error < baseline)
    image = render_chart(measurement, title, float_ops=candidates[0].op_names if candidates and helps else ())
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the chart as PNG")
    write_bytes_atomically(chart_path, png.tobytes())
