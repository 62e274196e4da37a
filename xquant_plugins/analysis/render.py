"""The report's Markdown and its chart."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from . import fallback
from .findings import Row, Suggestion, _finite, _op_flagged, op_snr
from .graph import Probe
from .limits import (
    _SPARK,
    _SPARK_EMPTY,
    CHART_LABELS,
    DEFAULT_MAX_BATCHES,
    FLAG_COSINE,
    FLAG_SNR,
    HISTOGRAM_BINS,
    TIME_FRACTION,
)
from .measure import Measurement, TensorStats


def sparkline(counts: Sequence[int]) -> str:
    """A unicode sparkline of histogram counts (log scale, so a lone outlier still shows)."""
    top = max(counts) if counts else 0
    if top <= 0:
        return _SPARK_EMPTY * len(counts)
    out = []
    for count in counts:
        if count <= 0:
            out.append(_SPARK_EMPTY)
        else:
            level = math.log1p(count) / math.log1p(top)
            out.append(_SPARK[min(len(_SPARK) - 1, round(level * (len(_SPARK) - 1)))])
    return "".join(out)


def _num(value: float) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.4g}"


def _cos(value: float) -> str:
    return f"{value:.5f}" if math.isfinite(value) else "nan"


def _cell(text: str, code: bool = True) -> str:
    """A Markdown table cell: pipes escaped, code span unless the text holds a backtick."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    if code and "`" not in text:
        return f"`{text}`"
    return text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _explain(suggestion: Suggestion, stats: dict[Probe, TensorStats]) -> str:
    op = suggestion.op
    head = f"{_cell(op.label)} adds {_num(suggestion.added_snr)} to the SNR"
    if suggestion.cause == "input":
        names = ", ".join(_cell(p.var) for p in op.inputs)
        text = f"{head} computing on its INT8 input(s) {names}."
    else:
        text = f"{head} when its output is quantized."
    clipped = suggestion.clipped
    if clipped is not None:
        s = stats[clipped]
        text += (
            f" The INT8 range of {_cell(clipped.var)} [{_num(s.q_min)}, {_num(s.q_max)}] clips its float "
            f'range [{_num(s.f_min)}, {_num(s.f_max)}]: the same entry with `"calibration_type": '
            '"minmax"` instead of `precision_level` may fix it and keep INT8.'
        )
    elif suggestion.cause == "input":
        text += (
            " Their rounding step is too coarse for this op (a rare outlier that sets the step shows "
            "here, in the consumer, not in the tensor itself, whose power the outlier dominates)."
        )
    return text


def _measured_next_step(
    measurement: Measurement, rows: list[Row], candidates: Sequence[fallback.Candidate], baseline: float | None
) -> list[str]:
    best = candidates[0]
    now = f"{_num(baseline)} now" if baseline is not None else "as exported"
    lines = [
        f"Each subgraph below was kept in float (the same calibration; `float_after_calibration`) and the "
        f"model run with onnxruntime on {measurement.candidates_on}: "
        f"the mean SNR of its outputs against the float model ({now}), lowest first.",
        "",
    ]
    lines += _table(
        ["#", "keep in float", "proposed as", "ops in float (Conv/MatMul/Gemm)", "output SNR", "change"],
        (
            [
                str(number),
                f"{', '.join(_cell(n) for n in c.proposal.input_names)} -> "
                f"{', '.join(_cell(n) for n in c.proposal.output_names)}",
                c.proposal.why,
                f"{c.ops} ({c.compute_ops})",
                _num(c.error),
                f"{(c.error - baseline) / baseline:+.0%}" if baseline else "",
            ]
            for number, c in enumerate(candidates, 1)
        ),
        ["--:", "---", "---", "--:", "--:", "--:"],
    )
    if baseline is not None and not best.error < baseline:
        lines += [
            "",
            "None of them lowers the output error: keeping ops in float will not help this model; "
            "try another `calibration_type` or more calibration samples.",
        ]
        return lines
    lines += [
        "",
        "To keep #1 in float, add this to `quantization_parameters` in the config (merge with an "
        "existing `custom_setting` list) and quantize again:",
        "",
        "```json",
        json.dumps({"custom_setting": [best.custom_setting()]}, indent=2)[1:-1].strip("\n"),
        "```",
    ]
    if rows and rows[0].probe.var not in best.proposal.output_names + best.proposal.input_names:
        lines += [
            "",
            f"Why not the worst tensor ({_cell(rows[0].probe.var)})? Errors add up along the graph: the "
            "tensor where the error is largest mostly carries what earlier ops added, so keeping its own "
            "op in float buys little. The table measures what each fallback buys.",
        ]
    return lines


def verdict(measurement: Measurement) -> str:
    """One sentence: does the model need attention, judged by its outputs (not by counting flags)."""
    bad = [(name, out) for name, out in measurement.outputs.items() if out.flagged]
    if bad:
        name, out = max(bad, key=lambda item: item[1].snr)
        return (
            f"The model needs attention: its output {_cell(name)} departs from float (SNR {_num(out.snr)}, "
            f"cosine {_cos(out.cosine)}; flagged above SNR {FLAG_SNR} or below cosine {FLAG_COSINE})."
        )
    return (
        f"By its outputs the model is close to float (every output SNR <= {FLAG_SNR}, cosine >= "
        f"{FLAG_COSINE}): flagged tensors inside it are no reason to act by themselves; check the task "
        "metric on your own data (`xquant compare`)."
    )


def render_markdown(
    measurement: Measurement,
    rows: list[Row],
    suggestions: list[Suggestion],
    settings: dict,
    quantize_seconds: float,
    analysis_seconds: float,
    chart_name: str,
    title: str,
    sections: Sequence[str] = (),
    candidates: Sequence[fallback.Candidate] | None = None,
    baseline: float | None = None,
) -> str:
    """The report: summary, settings, the sections given, next step, chart, tensors worst first."""
    lines = [f"# Quantization analysis: {title}", ""]
    lines.append(
        "SNR is the noise-to-signal power ratio sum((q - f)^2) / sum(f^2) of the INT8 model's "
        "tensor q against the float model's f: **lower is better, not decibels**. Errors are "
        "cumulative (the whole INT8 graph against the whole float graph), measured with "
        f"onnxruntime on the exported model. Flagged: SNR > {FLAG_SNR} or cosine < {FLAG_COSINE}."
    )
    lines += _summary(measurement, rows, quantize_seconds, analysis_seconds, candidates)
    lines += ["", "### Settings", ""]
    lines += _table(
        ["setting", "value"],
        (
            [_cell(str(key)), _cell(json.dumps(value) if not isinstance(value, str) else value)]
            for key, value in settings.items()
        ),
    )
    if sections:
        lines += ["", *sections]
    lines += ["", "## Next step", ""]
    lines += _next_step(measurement, rows, suggestions, candidates, baseline)
    lines += [
        "",
        "## Per-op SNR along the graph",
        "",
        f"![per-op SNR along the graph, worst ops labelled]({chart_name})",
        "",
        "## Tensors, worst first",
        "",
    ]
    lines += _tensor_table(rows)
    return "\n".join(lines)


def _summary(
    measurement: Measurement,
    rows: list[Row],
    quantize_seconds: float,
    analysis_seconds: float,
    candidates: Sequence[fallback.Candidate] | None = None,
) -> list[str]:
    flagged = sum(1 for row in rows if row.stats.flagged)
    lines = ["", "## Summary", "", verdict(measurement), ""]
    for name, out in measurement.outputs.items():
        flag = f" **flagged ({out.flags})**" if out.flagged else ""
        lines.append(
            f"- Model output {_cell(name)}: SNR {_num(out.snr)}, cosine {_cos(out.cosine)}{flag} "
            f"(every element, {measurement.outputs_on})"
        )
    lines.append(
        f"- Flagged tensors: {flagged} of {len(measurement.stats)} (in {len(rows)} rows: a tensor is a row "
        "for its producer and for each consumer)"
    )
    if rows:
        worst = rows[0]
        lines.append(
            f"- Worst: {_cell(worst.op.label)} {worst.role} {_cell(worst.probe.var)}: "
            f"SNR {_num(worst.stats.snr)}, cosine {_cos(worst.stats.cosine)}"
        )
    fraction = analysis_seconds / quantize_seconds if quantize_seconds > 0 else math.nan
    measured = (
        f"; then {len(candidates)} float-fallback candidate(s) of the Next step, each on {candidates[0].batches} "
        "batch(es), outside that budget"
        if candidates
        else ""
    )
    lines.append(
        f"- Time: analysis {analysis_seconds:.2f} s = {fraction:.0%} of the quantization time "
        f"({quantize_seconds:.2f} s): the tensors compared on {measurement.batches_used} of "
        f"{measurement.batches_given} calibration batch(es), every element (histograms of at most "
        f"{measurement.max_elements}; budget: {DEFAULT_MAX_BATCHES} batches, {TIME_FRACTION:.0%} of the "
        f"quantization time after the first batch){measured}"
    )
    lines += [f"- Note: {note}" for note in measurement.notes]
    return lines


def _next_step(
    measurement: Measurement,
    rows: list[Row],
    suggestions: list[Suggestion],
    candidates: Sequence[fallback.Candidate] | None,
    baseline: float | None,
) -> list[str]:
    """The measured candidates; without them, the unmeasured growth suggestions and their snippet."""
    if candidates:
        return _measured_next_step(measurement, rows, candidates, baseline)
    if not suggestions:
        return ["No quantized op was measured: nothing to suggest."]
    if any(row.stats.flagged for row in rows):
        lines = [
            "The error jumps most in the subgraph(s) below. If the model's accuracy is not good "
            "enough, keep them in float: add this to `quantization_parameters` in the config "
            "(merge with an existing `custom_setting` list) and quantize again."
        ]
    else:
        lines = [
            "Nothing is flagged. If the model's accuracy is still not good enough, the subgraph "
            "where the error grows most is below; to keep it in float, add this to "
            "`quantization_parameters` in the config and quantize again."
        ]
    lines.append("")
    for suggestion in suggestions:
        lines.append(
            f"- {_explain(suggestion, measurement.stats)} Subgraph: "
            f"{', '.join(_cell(label) for label in suggestion.op_labels)}."
        )
    snippet = json.dumps({"custom_setting": [s.custom_setting() for s in suggestions]}, indent=2)
    return [*lines, "", "```json", snippet[1:-1].strip("\n"), "```"]


#: the tensor table's columns and their alignment
_COLUMNS = (
    ("#", "--:"),
    ("Op", "---"),
    ("Var", "---"),
    ("I/O", "---"),
    ("SNR", "--:"),
    ("MSE", "--:"),
    ("Cosine", "--:"),
    ("Q min", "--:"),
    ("Q max", "--:"),
    ("F min", "--:"),
    ("F max", "--:"),
    ("F histogram", "---"),
    ("Flag", "---"),
)


def _tensor_table(rows: list[Row]) -> list[str]:
    body = []
    for number, row in enumerate(rows, 1):
        s = row.stats
        body.append(
            [
                str(number),
                _cell(row.op.label),
                _cell(row.probe.var),
                "out" if row.role == "output" else "in",
                _num(s.snr),
                _num(s.mse),
                _cos(s.cosine),
                _num(s.q_min),
                _num(s.q_max),
                _num(s.f_min),
                _num(s.f_max),
                f"`{sparkline(s.histogram)}`",
                f"**{s.flags}**" if s.flags else "",
            ]
        )
    lines = _table([name for name, _ in _COLUMNS], body, [align for _, align in _COLUMNS])
    legend = (
        f"F histogram: {HISTOGRAM_BINS} bins from F min to F max of the float tensor, log scale "
        f"(`{_SPARK_EMPTY}` = empty bin); SNR, MSE, cosine, min and max over all "
        "elements of the batches used."
    )
    return [*lines, "", legend, ""]


def render_chart(
    measurement: Measurement, title: str, size: tuple[int, int] = (1200, 760), float_ops: Iterable[str] = ()
) -> np.ndarray:
    """A BGR image of what the flags use, per quantized op in graph order: SNR (top panel) and
    1 - cosine (bottom), both log scale, each with its flag threshold dashed; flagged ops red,
    the worst ops numbered and named below; ``float_ops`` (the Next step's #1) shaded green."""
    chart = _Chart(measurement, size, set(float_ops))
    ops, left, top, plot_w = chart.ops, chart.left, chart.top, chart.plot_w
    snr = [op_snr(op, measurement.stats) for op in ops]
    gap = [
        1.0 - min(measurement.stats[p].cosine for p in op.inputs + op.outputs if p in measurement.stats) for op in ops
    ]
    chart.text(f"Per-op error along the graph (cumulative, lower is better): {title}"[:110], (left, 28), 0.6)
    shaded = "; green: kept in float by the Next step's #1" if chart.float_ops & {op.name for op in ops} else ""
    chart.text(
        f"red: flagged (SNR > {FLAG_SNR} or cosine < {FLAG_COSINE}); dashed: the thresholds; bar: the op's "
        f"worst tensor{shaded}",
        (left, 52),
        0.45,
        (0, 0, 200),
    )
    snr_y = chart.panel(snr, top, "SNR", FLAG_SNR)
    chart.panel(gap, top + chart.panel_h + 24, "1 - cosine", 1.0 - FLAG_COSINE)
    bottom = top + 2 * chart.panel_h + 24
    chart.text(f"quantized ops in graph order ({len(ops)})", (left + plot_w // 2 - 120, bottom + 22))
    worst = sorted(range(len(ops)), key=lambda i: (-_finite(snr[i]), i))[:CHART_LABELS]
    for rank, i in enumerate(worst, 1):
        x = int(left + (i + 0.5) * chart.step)
        chart.text(str(rank), (x - 4, max(top + 12, snr_y(snr[i]) - 6)), 0.5, (0, 0, 0), 2)
        chart.text(
            f"{rank}: {ops[i].label}  SNR {_num(snr[i])}  cosine {_cos(1.0 - gap[i])}"[:140],
            (left, bottom + 44 + 22 * (rank - 1)),
        )
    return chart.image


class _Chart:
    """The canvas of :func:`render_chart`: its geometry, text and the two log-scale panels."""

    left, right, top = 80, 20, 70

    def __init__(self, measurement: Measurement, size: tuple[int, int], float_ops: set[str]):
        width, height = size
        self.measurement, self.float_ops = measurement, float_ops
        self.image = np.full((height, width, 3), 255, np.uint8)
        self.ops = [op for op in measurement.ops if any(p in measurement.stats for p in op.inputs + op.outputs)]
        legend_h = 50 + 22 * CHART_LABELS
        self.panel_h = (height - self.top - legend_h - 44) // 2
        self.plot_w = width - self.left - self.right
        self.step = self.plot_w / max(len(self.ops), 1)

    def text(self, s: str, org: tuple[int, int], scale: float = 0.45, color=(40, 40, 40), thick: int = 1) -> None:
        import cv2

        cv2.putText(self.image, _ascii(s), org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)

    def panel(self, values: list[float], y0: int, name: str, threshold: float) -> Callable[[float], int]:
        """Draw one panel of bars (one per op) from ``y0`` down; returns its value -> y mapping."""
        import cv2

        image, left, plot_w, panel_h, step = self.image, self.left, self.plot_w, self.panel_h, self.step
        logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
        low = max(-6, math.floor(min(logs + [math.log10(threshold)])))
        high = max(0, math.ceil(max(logs))) if logs else 0

        def y_of(value: float) -> int:
            if not value > 0:
                return y0 + panel_h
            level = (min(max(math.log10(min(value, 1e300)), low), high) - low) / (high - low)
            return round(y0 + panel_h - level * panel_h)

        for i, op in enumerate(self.ops):  # the Next step's #1 behind the bars
            if op.name in self.float_ops:
                cv2.rectangle(
                    image, (int(left + i * step), y0), (int(left + (i + 1) * step), y0 + panel_h), (200, 235, 200), -1
                )
        for exponent in range(low, high + 1):
            y = y_of(10.0**exponent)
            cv2.line(image, (left, y), (left + plot_w, y), (225, 225, 225), 1)
            self.text(f"1e{exponent}", (8, y + 5))
        self.text(name, (left + 6, y0 + 14), 0.5, (0, 0, 0))
        y = y_of(threshold)
        for x in range(left, left + plot_w, 12):
            cv2.line(image, (x, y), (min(x + 6, left + plot_w), y), (0, 0, 200), 1)
        for i, (op, value) in enumerate(zip(self.ops, values)):
            x0 = int(left + i * step + (1 if step > 3 else 0))
            x1 = max(x0, int(left + (i + 1) * step) - (1 if step > 3 else 0) - 1)
            color = (40, 40, 220) if _op_flagged(op, self.measurement.stats) else (180, 130, 60)
            cv2.rectangle(image, (x0, y_of(value)), (x1, y0 + panel_h), color, -1)
        cv2.line(image, (left, y0), (left, y0 + panel_h), (0, 0, 0), 1)
        cv2.line(image, (left, y0 + panel_h), (left + plot_w, y0 + panel_h), (0, 0, 0), 1)
        return y_of


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()
