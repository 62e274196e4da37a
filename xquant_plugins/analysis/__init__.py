"""The analysis report: where the exported INT8 model departs from the float model.

The report measures the real artefacts with onnxruntime, not PPQ's simulation: the float
model that was quantized (after onnxsim) and the exported QDQ model run side by side on a
few calibration batches, with every interesting tensor added as an extra graph output of
copies of both models.

- "Quantized ops" are the nodes of the QDQ model, other than QuantizeLinear /
  DequantizeLinear, that read at least one DequantizeLinear output.
- Each activation input and output of such an op is one row. Its ``Var`` is the tensor's
  name in the float model, found by following the Q/DQ chain (an op input is a DQ output
  whose DQ -> Q chain starts at the original tensor; PPQ's exporter renames an op's
  output and gives the original name to the DQ after it, other exporters keep it on the
  op: both are followed). Weights and other constants are not rows.
- The quantized value of a tensor is the value after its Q/DQ pair when it has one (the
  DQ output), else the tensor itself. The error is cumulative: the whole graph quantized
  against the whole graph in float.
- SNR is the noise-to-signal power ratio ``sum((q - f)^2) / sum(f^2)``: lower is better,
  and it is NOT in decibels. A row is flagged when SNR > 0.1 or cosine < 0.99.

Costs are bounded: at most ``max_batches`` batches, and after the first batch no more
batches than fit in :data:`TIME_FRACTION` of the quantization time. SNR, MSE and cosine are
sums over every element (a sample of a softmax misses its few peaks: PP-OCRv4's recogniser
output read 0.00029 on a sample, 0.052 over every element of the same batches); the histograms use at most
``max_elements`` elements per tensor, sampled deterministically.

This package imports onnx, onnxruntime, numpy and cv2 only (no torch, no PPQ).

The package: :mod:`.limits` (thresholds and budgets), :mod:`.graph` (the QDQ model indexed),
:mod:`.measure` (both models run side by side), :mod:`.findings` (rows, per-op error,
suggestions), :mod:`.fallback` (the measured float-fallback candidates of the "Next step"),
:mod:`.render` (Markdown and chart), :mod:`.report` (all of it written, the console lines).
"""

from . import fallback
from .findings import Row, Suggestion, rows_worst_first, suggest
from .graph import Probe, QuantizedOp, quantized_ops
from .limits import CANDIDATE_BATCHES, DEFAULT_MAX_BATCHES, FLAG_COSINE, FLAG_SNR, HELD_BACK_CANDIDATES, HELD_BACK_MAX
from .measure import Measurement, TensorStats, channel_scales, measure, spread
from .render import sparkline, verdict
from .report import Report, summary_figures, summary_lines, write_report

__all__ = [
    "CANDIDATE_BATCHES",
    "DEFAULT_MAX_BATCHES",
    "FLAG_COSINE",
    "FLAG_SNR",
    "HELD_BACK_CANDIDATES",
    "HELD_BACK_MAX",
    "Measurement",
    "Probe",
    "QuantizedOp",
    "Report",
    "Row",
    "Suggestion",
    "TensorStats",
    "channel_scales",
    "fallback",
    "measure",
    "quantized_ops",
    "rows_worst_first",
    "sparkline",
    "spread",
    "suggest",
    "summary_figures",
    "summary_lines",
    "verdict",
    "write_report",
]
