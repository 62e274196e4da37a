"""Quantization analysis: where the exported INT8 model departs from the float model.

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

This module imports onnx, onnxruntime, numpy and cv2 only (no torch, no PPQ).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import fallback
from .outputs import write_bytes_atomically
from .runtime import onnxruntime_session
from .snr import PowerSums, flat32

log = logging.getLogger("xquant.analysis")

#: a row is flagged above this noise-to-signal power ratio
FLAG_SNR = 0.1
#: ... or below this cosine similarity
FLAG_COSINE = 0.99
#: calibration batches run through both models at most
DEFAULT_MAX_BATCHES = 8
#: calibration batches the "Next step" candidates are measured on at most
CANDIDATE_BATCHES = 16
#: held-back samples (listed after the first ``calibration_step``) the headline outputs are measured on at most
HELD_BACK_MAX = 256
#: ... and the "Next step" candidates
HELD_BACK_CANDIDATES = 32
#: elements per tensor in its float histogram at most (over all batches)
DEFAULT_MAX_ELEMENTS = 65536
#: after the first batch, run only as many batches as fit in this fraction of the quantization time
TIME_FRACTION = 0.25
#: bins of the float histogram sparkline
HISTOGRAM_BINS = 10
#: ops labelled in the chart and the summary's custom_setting suggestions
CHART_LABELS = 5
MAX_SUGGESTIONS = 2
#: a further suggestion must add at least this share of the first one's SNR growth
SECONDARY_SHARE = 0.25

QDQ_TYPES = ("QuantizeLinear", "DequantizeLinear")
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_EMPTY = "·"


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` of ``range(count)`` spread over it, in an order whose every prefix is spread too
    (0, 1/2, 1/4, 3/4, 1/8, ... of the way): calibration lists are often sorted by source photo."""
    picked: list[int] = []
    position = 0
    while len(picked) < min(count, wanted):
        fraction, base, rest = 0.0, 0.5, position
        while rest:  # van der Corput: the bits of position, mirrored after the binary point
            fraction, rest, base = fraction + base * (rest & 1), rest >> 1, base / 2
        index = int(fraction * count)
        if index not in picked:
            picked.append(index)
        position += 1
    return picked


# --------------------------------------------------------------------------- graph side
@dataclass(frozen=True)
class Probe:
    """One tensor to compare: its name in the QDQ model and in the float model."""

    quant: str
    var: str


@dataclass(frozen=True)
class QuantizedOp:
    """A quantized op of the QDQ model with the probes of its activation inputs/outputs."""

    index: int  # position among the QDQ model's nodes (graph order)
    name: str
    op_type: str
    inputs: tuple[Probe, ...]
    outputs: tuple[Probe, ...]
    raw_outputs: tuple[Probe, ...]  # outputs before their own Q/DQ (only those that have one)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.op_type}]"


class _QdqGraph:
    """Producer/consumer index of the QDQ model and the tensor-name mapping to the float model."""

    def __init__(self, quant_model: onnx.ModelProto, float_model: onnx.ModelProto):
        graph = quant_model.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.constants = {init.name for init in graph.initializer}
        self.constants |= {out for node in self.nodes if node.op_type == "Constant" for out in node.output}
        self.graph_inputs = {value.name for value in graph.input} - self.constants
        self.graph_outputs = {value.name for value in graph.output}
        fgraph = float_model.graph
        float_constants = {init.name for init in fgraph.initializer}
        float_constants |= {out for node in fgraph.node if node.op_type == "Constant" for out in node.output}
        self.float_constants = float_constants
        self.float_names = {value.name for value in fgraph.input} | {
            out for node in fgraph.node for out in node.output if out
        }
        self.float_names -= float_constants

    def _node(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def backward_chain(self, name: str) -> list[str]:
        """``name`` and the tensors behind it through DQ / Q nodes: DQ output -> Q output -> original."""
        chain = [name]
        node = self._node(name)
        while node is not None and node.op_type in QDQ_TYPES and len(chain) < 8:
            chain.append(node.input[0])
            node = self._node(node.input[0])
        return chain

    def forward_dq(self, name: str) -> str | None:
        """The DQ output after ``name``'s Q -> DQ pair, if the tensor has one."""
        for q_index in self.consumers.get(name, []):
            q_node = self.nodes[q_index]
            if q_node.op_type != "QuantizeLinear":
                continue
            for dq_index in self.consumers.get(q_node.output[0], []):
                if self.nodes[dq_index].op_type == "DequantizeLinear":
                    return self.nodes[dq_index].output[0]
        return None

    def is_constant(self, name: str) -> bool:
        return any(item in self.constants or item in self.float_constants for item in self.backward_chain(name))

    def is_dq_output(self, name: str) -> bool:
        node = self._node(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def float_name(self, name: str) -> str | None:
        """The float model's name of a QDQ-model tensor (None when it has none)."""
        candidates = self.backward_chain(name)
        forward = self.forward_dq(name)
        if forward is not None:
            candidates.append(forward)
        return next((item for item in candidates if item in self.float_names), None)

    def consumer_nodes(self, name: str) -> list[int]:
        """The non-Q/DQ nodes that read ``name``, directly or through its Q -> DQ chain."""
        out, frontier, seen = [], [name], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for index in self.consumers.get(tensor, []):
                node = self.nodes[index]
                if node.op_type in QDQ_TYPES:
                    frontier.append(node.output[0])
                elif index not in out:
                    out.append(index)
        return out

    def has_qdq(self, name: str) -> bool:
        return self.forward_dq(name) is not None or self.is_dq_output(name)

    def subgraph(self, seeds: Iterable[int]) -> tuple[list[int], list[str], list[str]]:
        """Close a node set over float links (a tensor without Q/DQ, e.g. Conv -> Clip fused) and
        return (nodes, float-model input names, float-model output names) bounding it."""
        members = set(seeds)
        for _ in range(2):
            grown = set(members)
            for index in members:
                node = self.nodes[index]
                for name in node.output:
                    if name and not self.has_qdq(name):
                        grown.update(self.consumer_nodes(name))
                for name in node.input:
                    if name and not self.is_constant(name) and not self.has_qdq(name):
                        origin = self.origin_node(name)
                        if origin is not None:
                            grown.add(origin)
            if grown == members:
                break
            members = grown
        inputs, outputs = [], []
        for index in sorted(members):
            node = self.nodes[index]
            for name in node.input:
                if not name or self.is_constant(name) or self.origin_node(name) in members:
                    continue
                var = self.float_name(name)
                if var is not None and var not in inputs:
                    inputs.append(var)
            for name in node.output:
                if not name:
                    continue
                leaves = (
                    name in self.graph_outputs
                    or self.forward_dq(name) in self.graph_outputs
                    or any(c not in members for c in self.consumer_nodes(name))
                )
                var = self.float_name(name)
                if leaves and var is not None and var not in outputs:
                    outputs.append(var)
        return sorted(members), inputs, outputs

    def origin_node(self, name: str) -> int | None:
        """The non-Q/DQ node that produces ``name`` (through its Q/DQ chain)."""
        chain = self.backward_chain(name)
        index = self.producer.get(chain[-1])
        if index is None or self.nodes[index].op_type in QDQ_TYPES:
            return None
        return index


def quantized_ops(
    quant_model: onnx.ModelProto, float_model: onnx.ModelProto, index: _QdqGraph | None = None
) -> list[QuantizedOp]:
    """The quantized ops of ``quant_model`` in graph order, with their probes."""
    index = index or _QdqGraph(quant_model, float_model)
    ops = []
    for position, node in enumerate(index.nodes):
        if node.op_type in QDQ_TYPES or not any(index.is_dq_output(name) for name in node.input if name):
            continue
        inputs, outputs, raw_outputs = [], [], []
        for name in node.input:
            if not name or index.is_constant(name):
                continue
            var = index.float_name(name)
            if var is not None:
                inputs.append(Probe(name, var))
        for name in node.output:
            if not name:
                continue
            var = index.float_name(name)
            if var is None:
                continue
            after = index.forward_dq(name)
            outputs.append(Probe(after or name, var))
            if after is not None:
                raw_outputs.append(Probe(name, var))
        if inputs or outputs:
            ops.append(
                QuantizedOp(
                    position,
                    node.name or f"node_{position}",
                    node.op_type,
                    tuple(inputs),
                    tuple(outputs),
                    tuple(raw_outputs),
                )
            )
    return ops


# --------------------------------------------------------------------------- measurement
@dataclass
class TensorStats:
    """Quantized-vs-float statistics of one tensor over every element of the batches used."""

    snr: float
    mse: float
    cosine: float
    q_min: float
    q_max: float
    f_min: float
    f_max: float
    histogram: tuple[int, ...]
    elements: int

    @property
    def flagged(self) -> bool:
        return self.snr > FLAG_SNR or self.cosine < FLAG_COSINE

    @property
    def flags(self) -> str:
        parts = []
        if self.snr > FLAG_SNR:
            parts.append("SNR")
        if self.cosine < FLAG_COSINE:
            parts.append("cosine")
        return ", ".join(parts)


class _Accumulator:
    """Running sums for one (quantized tensor, float tensor) pair."""

    def __init__(self):
        self.power = PowerSums()
        self.q2 = self.qf = 0.0
        self.count = 0
        self.q_min = self.f_min = math.inf
        self.q_max = self.f_max = -math.inf
        self.samples: list[np.ndarray] = []

    def add(self, q: np.ndarray, f: np.ndarray, picks: np.ndarray | None) -> None:
        self.q_min = min(self.q_min, float(np.min(q)))
        self.q_max = max(self.q_max, float(np.max(q)))
        self.f_min = min(self.f_min, float(np.min(f)))
        self.f_max = max(self.f_max, float(np.max(f)))
        q, f = flat32(q), flat32(f)  # sums over every element (a sample misses rare peaks)
        self.power.add(q, f)
        self.q2 += float(np.dot(q, q))
        self.qf += float(np.dot(q, f))
        self.count += f.size
        self.samples.append(f if picks is None else f[picks])  # for the histogram

    def result(self) -> TensorStats:
        f2 = self.power.signal
        if f2 > 0 and self.q2 > 0:
            cosine = self.qf / math.sqrt(f2 * self.q2)
        else:
            cosine = 1.0 if f2 == self.q2 else 0.0
        samples = np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)
        histogram = _histogram(samples, self.f_min, self.f_max)
        return TensorStats(
            self.power.snr,
            self.power.noise / max(self.count, 1),
            cosine,
            self.q_min,
            self.q_max,
            self.f_min,
            self.f_max,
            histogram,
            self.count,
        )


def _histogram(values: np.ndarray, low: float, high: float) -> tuple[int, ...]:
    if values.size == 0 or not (math.isfinite(low) and math.isfinite(high)):
        return (0,) * HISTOGRAM_BINS
    if high <= low:
        high = low + 1.0
    counts, _ = np.histogram(values[np.isfinite(values)], bins=HISTOGRAM_BINS, range=(low, high))
    return tuple(int(count) for count in counts)


@dataclass
class Measurement:
    """What :func:`measure` found."""

    graph: _QdqGraph
    ops: list[QuantizedOp]
    stats: dict[Probe, TensorStats]
    outputs: dict[str, TensorStats]  # model output name -> stats
    batches_used: int
    batches_given: int
    max_elements: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    #: what the model outputs' figures are over
    outputs_on: str = ""
    #: what the "Next step" candidates are measured on
    candidates_on: str = ""


def _instrumented(model: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """A serialized copy of ``model`` with ``names`` added as graph outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {value.name for value in copy.graph.output}
    inputs = {value.name for value in copy.graph.input}
    for name in names:
        if name not in present and name not in inputs:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy.SerializeToString()


def _session(model_bytes: bytes):
    return onnxruntime_session(model_bytes)


def _run(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {value.name for value in session.get_inputs()}
    feed = {name: array for name, array in batch.items() if name in wanted}
    names = [value.name for value in session.get_outputs()]
    values = dict(zip(names, session.run(names, feed)))
    values.update(feed)
    return values


class _Sampler:
    """Deterministic element picks per tensor size: the same elements in both models."""

    def __init__(self, per_batch: int):
        self.per_batch = max(1, per_batch)
        self._cache: dict[int, np.ndarray | None] = {}

    def picks(self, size: int) -> np.ndarray | None:
        if size not in self._cache:
            if size <= self.per_batch:
                self._cache[size] = None
            else:
                rng = np.random.default_rng(size)
                self._cache[size] = np.sort(rng.choice(size, self.per_batch, replace=False))
        return self._cache[size]


def float_activations(quant_model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The exported graph with its activation Q/DQ pairs removed (weights as exported), and the
    map from each removed DQ output to the tensor that replaces it."""
    graph = _QdqGraph(quant_model, quant_model)
    replaced: dict[str, str] = {}
    dropped: set[int] = set()
    for index, node in enumerate(graph.nodes):
        if node.op_type != "QuantizeLinear" or graph.is_constant(node.input[0]):
            continue
        consumers = graph.consumers.get(node.output[0], [])
        if not consumers or any(graph.nodes[c].op_type != "DequantizeLinear" for c in consumers):
            continue
        dropped.add(index)
        for consumer in consumers:
            dropped.add(consumer)
            replaced[graph.nodes[consumer].output[0]] = node.input[0]
    copy = onnx.ModelProto()
    copy.CopyFrom(quant_model)
    del copy.graph.node[:]
    for index, node in enumerate(graph.nodes):
        if index in dropped:
            continue
        node = copy_node = onnx.NodeProto()
        copy_node.CopyFrom(graph.nodes[index])
        for position, name in enumerate(node.input):
            node.input[position] = _final(replaced, name)
        copy.graph.node.append(node)
    for value in copy.graph.output:
        if value.name in replaced:
            copy.graph.node.append(onnx.helper.make_node("Identity", [_final(replaced, value.name)], [value.name]))
    return copy, {name: _final(replaced, name) for name in replaced}


def _final(replaced: dict[str, str], name: str) -> str:
    for _ in range(8):
        if name not in replaced:
            break
        name = replaced[name]
    return name


#: a channel counts as rescaled by cross-layer equalization when the float-activation reference
#: matches scale x float this closely (relative residual power) ...
RESCALE_FIT = 1e-2
#: ... with a scale this far from 1 (weight rounding alone moves channel gains far less)
RESCALE_MIN_FACTOR = 1.25
#: ... over at least this many nonzero float values in the channel (any scale fits one value)
RESCALE_MIN_VALUES = 16


def channel_scales(reference: np.ndarray, f: np.ndarray) -> np.ndarray | None:
    """Per-channel (axis 1) factors s with reference ~= s * f where that fit is exact up to
    weight rounding and s is far from 1; 1 elsewhere. None when no channel is rescaled.

    Cross-layer equalization (finetune_level >= 1) scales the channels of the tensors
    between the layers it balances, so the exported model's tensors are not comparable with
    the float model's as they are. The float-activation reference (the exported graph
    without its activation Q/DQ) tells the scales apart from damage: a channel zeroed or
    distorted by a badly quantized constant does not fit ``s * f`` and keeps s = 1.
    """
    if f.ndim < 2 or f.shape != reference.shape or f.size < RESCALE_MIN_VALUES * f.shape[1]:
        return None
    axes = tuple(axis for axis in range(f.ndim) if axis != 1)
    f = f.astype(np.float32, copy=False)
    reference = reference.astype(np.float32, copy=False)
    f_c = np.sum(f * f, axis=axes, dtype=np.float64)
    r_c = np.sum(reference * reference, axis=axes, dtype=np.float64)
    rf_c = np.sum(reference * f, axis=axes, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(f_c > 0, rf_c / f_c, 1.0)
        residual = np.where(r_c > 0, (r_c - 2 * scale * rf_c + scale * scale * f_c) / r_c, 1.0)
    support = np.count_nonzero(f, axis=axes)
    good = (
        (support >= RESCALE_MIN_VALUES)
        & (r_c > 0)
        & (residual < RESCALE_FIT)
        & ((scale > RESCALE_MIN_FACTOR) | ((scale > 0) & (scale < 1 / RESCALE_MIN_FACTOR)))
    )
    if np.count_nonzero(good) < 2:  # one channel alone is no evidence of equalization
        return None
    shape = [1] * f.ndim
    shape[1] = f.shape[1]
    return np.where(good, scale, 1.0).reshape(shape).astype(np.float32)


def measure(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    max_batches: int = DEFAULT_MAX_BATCHES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    time_budget: float | None = None,
) -> Measurement:
    """Run both models on the batches and compare every probe of every quantized op.

    ``time_budget``: seconds; after the first batch, stop before a batch that would exceed
    it (at least one batch always runs). The inputs are not modified.
    """
    started = time.perf_counter()
    if not batches:
        raise ValueError("no calibration batches to analyse")
    graph = _QdqGraph(quant_model, float_model)
    ops = quantized_ops(quant_model, float_model, graph)
    probes = sorted(
        {probe for op in ops for probe in op.inputs + op.outputs + op.raw_outputs}, key=lambda p: (p.var, p.quant)
    )
    model_outputs = [value.name for value in float_model.graph.output]
    quant_outputs = {value.name for value in quant_model.graph.output}
    model_outputs = [name for name in model_outputs if name in quant_outputs]

    float_session = _session(_instrumented(float_model, [p.var for p in probes]))
    quant_session = _session(_instrumented(quant_model, [p.quant for p in probes]))
    # channel scales of cross-layer equalization, from the first batch
    reference, renamed = float_activations(quant_model)
    reference_session = _session(_instrumented(reference, {renamed.get(p.quant, p.quant) for p in probes}))
    r_values = _run(reference_session, batches[0])
    f_values = _run(float_session, batches[0])
    scales: dict[Probe, np.ndarray] = {}
    for probe in probes:
        f, r = f_values.get(probe.var), r_values.get(renamed.get(probe.quant, probe.quant))
        if f is not None and r is not None and np.issubdtype(f.dtype, np.floating):
            scale = channel_scales(r, f)
            if scale is not None:
                scales[probe] = scale
    del reference_session, r_values, f_values
    planned = min(len(batches), max_batches)
    sampler = _Sampler(math.ceil(max_elements / planned))
    accumulators = {probe: _Accumulator() for probe in probes}
    output_accumulators = {name: _Accumulator() for name in model_outputs}
    notes: list[str] = []
    skipped: set[Probe] = set()
    used = 0
    for batch in batches[:planned]:
        batch_started = time.perf_counter()
        f_values = _run(float_session, batch)
        q_values = _run(quant_session, batch)
        for probe, acc in accumulators.items():
            if probe in skipped:
                continue
            f, q = f_values.get(probe.var), q_values.get(probe.quant)
            if (
                f is None
                or q is None
                or f.shape != q.shape
                or f.size == 0
                or not np.issubdtype(f.dtype, np.floating)
                or not np.issubdtype(q.dtype, np.floating)
            ):
                skipped.add(probe)
                continue
            if probe in scales:
                f = f * scales[probe]
            acc.add(q, f, sampler.picks(f.size))
        for name, acc in output_accumulators.items():  # every element: a softmax's few peaks carry its error
            f, q = f_values[name], q_values[name]
            if f.shape == q.shape and np.issubdtype(f.dtype, np.floating):
                acc.add(q, f, None)
        used += 1
        per_batch = time.perf_counter() - batch_started
        elapsed = time.perf_counter() - started
        if time_budget is not None and used < planned and elapsed + per_batch > time_budget:
            notes.append(
                f"stopped after {used} of {planned} batches to stay within the time budget ({time_budget:.1f} s)"
            )
            break
    row_probes = {p for op in ops for p in op.inputs + op.outputs}
    rescaled = {p.var for p in row_probes if p in scales}
    if rescaled:
        notes.append(
            f"{len(rescaled)} tensor(s) have channels rescaled by cross-layer equalization: they are "
            "compared with the float tensor in the equalized scale (F columns too)"
        )
    skipped_rows = row_probes & skipped
    if skipped_rows:
        notes.append(f"{len(skipped_rows)} tensor(s) not compared (not float, or shapes differ between the models)")
    stats = {probe: acc.result() for probe, acc in accumulators.items() if probe not in skipped and acc.count}
    outputs = {name: acc.result() for name, acc in output_accumulators.items() if acc.count}
    return Measurement(
        graph,
        ops,
        stats,
        outputs,
        used,
        len(batches),
        max_elements,
        time.perf_counter() - started,
        notes,
        f"{used} calibration batch(es)",
    )


def held_back_outputs(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    held_back: Iterable[dict[str, np.ndarray]],
    count: int,
    keep: int,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
):
    """Every held-back sample through both models, once: the outputs' statistics over every
    element, and ``keep`` of the samples spread over them with the float model's outputs (for
    the "Next step" candidates). ``count``: how many samples ``held_back`` yields."""
    names = [value.name for value in float_model.graph.output]
    float_session, quant_session = _session(float_model.SerializeToString()), _session(quant_model.SerializeToString())
    accumulators = {name: _Accumulator() for name in names}
    sampler, picks = _Sampler(math.ceil(max_elements / max(count, 1))), set(spread(count, keep))
    kept, reference = [], []
    for index, batch in enumerate(held_back):
        f_values, q_values = _run(float_session, batch), _run(quant_session, batch)
        for name, acc in accumulators.items():
            f, q = f_values[name], q_values.get(name)
            if q is not None and f.shape == q.shape and np.issubdtype(f.dtype, np.floating):
                acc.add(q, f, sampler.picks(f.size))
        if index in picks:
            kept.append(batch)
            reference.append({name: f_values[name] for name in names})
    return {name: acc.result() for name, acc in accumulators.items() if acc.count}, kept, reference


# --------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Row:
    op: QuantizedOp
    role: str  # "input" / "output"
    probe: Probe
    stats: TensorStats


def rows_worst_first(measurement: Measurement) -> list[Row]:
    """One row per measured input/output of each quantized op, worst (highest SNR) first."""
    rows = []
    for op in measurement.ops:
        for role, probes in (("input", op.inputs), ("output", op.outputs)):
            for probe in probes:
                stats = measurement.stats.get(probe)
                if stats is not None:
                    rows.append(Row(op, role, probe, stats))
    rows.sort(key=lambda row: (-_finite(row.stats.snr), row.stats.cosine, row.op.index, row.role != "output"))
    return rows


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e300


def _op_error(op: QuantizedOp, stats: dict[Probe, TensorStats], probes: Sequence[Probe]) -> float:
    values = [_finite(stats[p].snr) for p in probes if p in stats]
    return max(values) if values else 0.0


def op_snr(op: QuantizedOp, stats: dict[Probe, TensorStats]) -> float:
    """The op's SNR in the chart: its worst output (its worst input when no output was measured)."""
    if any(p in stats for p in op.outputs):
        return _op_error(op, stats, op.outputs)
    return _op_error(op, stats, op.inputs)


def _op_flagged(op: QuantizedOp, stats: dict[Probe, TensorStats]) -> bool:
    return any(stats[p].flagged for p in op.inputs + op.outputs if p in stats)


@dataclass(frozen=True)
class Suggestion:
    """A subgraph to keep in float: where the error grows the most, and why."""

    op: QuantizedOp
    added_snr: float
    cause: str  # "output": quantizing the op's output; "input": the op on its quantized inputs
    op_labels: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    clipped: Probe | None = None  # an output (cause "output") or input whose INT8 range clips the float range

    def custom_setting(self) -> dict[str, Any]:
        return {"input_names": list(self.input_names), "output_names": list(self.output_names), "precision_level": 3}


def _clips(stats: TensorStats, factor: float = 1.5) -> bool:
    """True when the float range exceeds the INT8 range by ``factor`` on either side."""
    return stats.f_max > factor * max(stats.q_max, 0) + 1e-12 or stats.f_min < factor * min(stats.q_min, 0) - 1e-12


def suggest(measurement: Measurement, limit: int = MAX_SUGGESTIONS) -> list[Suggestion]:
    """Subgraphs to keep in float, the largest error growth first.

    Errors are cumulative, so the op to fix is where the error grows, not where it is
    largest: each op is scored by its output SNR minus its worst input SNR. The growth is
    split in two with the op's output before its own Q/DQ: growth before it comes from the
    op computing on its quantized inputs (an input whose rounding step is set by a rare
    outlier hides in its own SNR, since the outlier dominates that tensor's power, and shows
    here), so the subgraph takes in the inputs' producers; growth after it comes from
    quantizing the output (e.g. a range that clips), so the subgraph takes in the output's
    consumers. Either way the tensor in between stays float. Flagged ops come first (a
    further one only when it adds at least :data:`SECONDARY_SHARE` of the first one's
    growth); with nothing flagged, the one op with the largest growth is suggested.
    """
    stats, graph = measurement.stats, measurement.graph
    scored = []
    for op in measurement.ops:
        if not any(p in stats for p in op.outputs):
            continue
        before = _op_error(op, stats, op.inputs)
        after = _op_error(op, stats, op.outputs)
        raw = [p for p in op.raw_outputs if p in stats]
        computed = _op_error(op, stats, raw) if raw else after
        cause = "output" if after - computed > computed - before else "input"
        scored.append((after - before, cause, op))
    scored.sort(key=lambda item: (-item[0], item[2].index))
    flagged = [item for item in scored if item[0] > 0 and _op_flagged(item[2], stats)]
    suggestions: list[Suggestion] = []
    taken: set[int] = set()
    for added, cause, op in flagged or scored[:1]:
        if len(suggestions) >= limit or (suggestions and added < SECONDARY_SHARE * suggestions[0].added_snr):
            break
        node = graph.nodes[op.index]
        seeds = {op.index}
        if cause == "input":
            seeds.update(
                i
                for name in node.input
                if name and not graph.is_constant(name)
                for i in [graph.origin_node(name)]
                if i is not None
            )
        else:
            seeds.update(i for name in node.output if name for i in graph.consumer_nodes(name))
        members, inputs, outputs = graph.subgraph(seeds)
        if taken & set(members) or not outputs:
            continue
        taken.update(members)
        suspects = op.outputs if cause == "output" else op.inputs
        clipped = next((p for p in suspects if p in stats and _clips(stats[p])), None)
        labels = tuple(f"{graph.nodes[i].name or f'node_{i}'}[{graph.nodes[i].op_type}]" for i in members)
        suggestions.append(Suggestion(op, added, cause, labels, tuple(inputs), tuple(outputs), clipped))
    return suggestions


# --------------------------------------------------------------------------- rendering
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
    stats = measurement.stats
    flagged = sum(1 for row in rows if row.stats.flagged)
    tensors = len(stats)
    lines = [f"# Quantization analysis: {title}", ""]
    lines.append(
        "SNR is the noise-to-signal power ratio sum((q - f)^2) / sum(f^2) of the INT8 model's "
        "tensor q against the float model's f: **lower is better, not decibels**. Errors are "
        "cumulative (the whole INT8 graph against the whole float graph), measured with "
        f"onnxruntime on the exported model. Flagged: SNR > {FLAG_SNR} or cosine < {FLAG_COSINE}."
    )
    lines += ["", "## Summary", "", verdict(measurement), ""]
    for name, out in measurement.outputs.items():
        flag = f" **flagged ({out.flags})**" if out.flagged else ""
        lines.append(
            f"- Model output {_cell(name)}: SNR {_num(out.snr)}, cosine {_cos(out.cosine)}{flag} "
            f"(every element, {measurement.outputs_on})"
        )
    lines.append(
        f"- Flagged tensors: {flagged} of {tensors} (in {len(rows)} rows: a tensor is a row "
        "for its producer and for each consumer)"
    )
    if rows:
        worst = rows[0]
        lines.append(
            f"- Worst: {_cell(worst.op.label)} {worst.role} {_cell(worst.probe.var)}: "
            f"SNR {_num(worst.stats.snr)}, cosine {_cos(worst.stats.cosine)}"
        )
    fraction = analysis_seconds / quantize_seconds if quantize_seconds > 0 else math.nan
    lines.append(
        f"- Time: analysis {analysis_seconds:.2f} s = {fraction:.0%} of the quantization time "
        f"({quantize_seconds:.2f} s); {measurement.batches_used} of {measurement.batches_given} "
        f"calibration batch(es), every element compared (histograms of at most {measurement.max_elements}) "
        f"(budget: {DEFAULT_MAX_BATCHES} batches, {TIME_FRACTION:.0%} of the quantization time "
        "after the first batch)"
    )
    for note in measurement.notes:
        lines.append(f"- Note: {note}")
    lines += ["", "### Settings", ""]
    lines += _table(
        ["setting", "value"],
        (
            [_cell(str(key)), _cell(json.dumps(value) if not isinstance(value, str) else value)]
            for key, value in settings.items()
        ),
    )
    if sections:
        lines += [""] + list(sections)
    lines += ["", "## Next step", ""]
    if candidates:
        lines += _measured_next_step(measurement, rows, candidates, baseline)
    elif suggestions:
        if flagged:
            lines.append(
                "The error jumps most in the subgraph(s) below. If the model's accuracy is not good "
                "enough, keep them in float: add this to `quantization_parameters` in the config "
                "(merge with an existing `custom_setting` list) and quantize again."
            )
        else:
            lines.append(
                "Nothing is flagged. If the model's accuracy is still not good enough, the subgraph "
                "where the error grows most is below; to keep it in float, add this to "
                "`quantization_parameters` in the config and quantize again."
            )
        lines.append("")
        for suggestion in suggestions:
            lines.append(
                f"- {_explain(suggestion, measurement.stats)} Subgraph: "
                f"{', '.join(_cell(label) for label in suggestion.op_labels)}."
            )
        snippet = json.dumps({"custom_setting": [s.custom_setting() for s in suggestions]}, indent=2)
        lines += ["", "```json", snippet[1:-1].strip("\n"), "```"]
    else:
        lines.append("No quantized op was measured: nothing to suggest.")
    lines += [
        "",
        "## Per-op SNR along the graph",
        "",
        f"![per-op SNR along the graph, worst ops labelled]({chart_name})",
        "",
        "## Tensors, worst first",
        "",
    ]
    header = [
        "#",
        "Op",
        "Var",
        "I/O",
        "SNR",
        "MSE",
        "Cosine",
        "Q min",
        "Q max",
        "F min",
        "F max",
        "F histogram",
        "Flag",
    ]
    align = ["--:", "---", "---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "---", "---"]
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
    lines += _table(header, body, align)
    legend = (
        f"F histogram: {HISTOGRAM_BINS} bins from F min to F max of the float tensor, log scale "
        f"(`{_SPARK_EMPTY}` = empty bin); SNR, MSE, cosine, min and max over all "
        "elements of the batches used."
    )
    lines += ["", legend, ""]
    return "\n".join(lines)


def render_chart(
    measurement: Measurement, title: str, size: tuple[int, int] = (1200, 760), float_ops: Iterable[str] = ()
) -> np.ndarray:
    """A BGR image of what the flags use, per quantized op in graph order: SNR (top panel) and
    1 - cosine (bottom), both log scale, each with its flag threshold dashed; flagged ops red,
    the worst ops numbered and named below; ``float_ops`` (the Next step's #1) shaded green."""
    import cv2

    width, height = size
    image = np.full((height, width, 3), 255, np.uint8)
    ops = [op for op in measurement.ops if any(p in measurement.stats for p in op.inputs + op.outputs)]
    snr = [op_snr(op, measurement.stats) for op in ops]
    gap = [
        1.0 - min(measurement.stats[p].cosine for p in op.inputs + op.outputs if p in measurement.stats) for op in ops
    ]
    left, right, top = 80, 20, 70
    legend_h = 50 + 22 * CHART_LABELS
    panel_h = (height - top - legend_h - 44) // 2
    plot_w = width - left - right
    step = plot_w / max(len(ops), 1)
    float_ops = set(float_ops)

    def text(s: str, org: tuple[int, int], scale: float = 0.45, color=(40, 40, 40), thick: int = 1) -> None:
        cv2.putText(image, _ascii(s), org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)

    def panel(values: list[float], y0: int, name: str, threshold: float) -> Callable[[float], int]:
        logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
        low = max(-6, math.floor(min(logs + [math.log10(threshold)])))
        high = max(0, math.ceil(max(logs))) if logs else 0

        def y_of(value: float) -> int:
            if not value > 0:
                return y0 + panel_h
            level = (min(max(math.log10(min(value, 1e300)), low), high) - low) / (high - low)
            return round(y0 + panel_h - level * panel_h)

        for i, op in enumerate(ops):  # the Next step's #1 behind the bars
            if op.name in float_ops:
                cv2.rectangle(
                    image, (int(left + i * step), y0), (int(left + (i + 1) * step), y0 + panel_h), (200, 235, 200), -1
                )
        for exponent in range(low, high + 1):
            y = y_of(10.0**exponent)
            cv2.line(image, (left, y), (left + plot_w, y), (225, 225, 225), 1)
            text(f"1e{exponent}", (8, y + 5))
        text(name, (left + 6, y0 + 14), 0.5, (0, 0, 0))
        y = y_of(threshold)
        for x in range(left, left + plot_w, 12):
            cv2.line(image, (x, y), (min(x + 6, left + plot_w), y), (0, 0, 200), 1)
        for i, (op, value) in enumerate(zip(ops, values)):
            x0 = int(left + i * step + (1 if step > 3 else 0))
            x1 = max(x0, int(left + (i + 1) * step) - (1 if step > 3 else 0) - 1)
            color = (40, 40, 220) if _op_flagged(op, measurement.stats) else (180, 130, 60)
            cv2.rectangle(image, (x0, y_of(value)), (x1, y0 + panel_h), color, -1)
        cv2.line(image, (left, y0), (left, y0 + panel_h), (0, 0, 0), 1)
        cv2.line(image, (left, y0 + panel_h), (left + plot_w, y0 + panel_h), (0, 0, 0), 1)
        return y_of

    text(f"Per-op error along the graph (cumulative, lower is better): {title}"[:110], (left, 28), 0.6)
    shaded = "; green: kept in float by the Next step's #1" if float_ops & {op.name for op in ops} else ""
    text(
        f"red: flagged (SNR > {FLAG_SNR} or cosine < {FLAG_COSINE}); dashed: the thresholds; bar: the op's "
        f"worst tensor{shaded}",
        (left, 52),
        0.45,
        (0, 0, 200),
    )
    snr_y = panel(snr, top, "SNR", FLAG_SNR)
    panel(gap, top + panel_h + 24, "1 - cosine", 1.0 - FLAG_COSINE)
    bottom = top + 2 * panel_h + 24
    text(f"quantized ops in graph order ({len(ops)})", (left + plot_w // 2 - 120, bottom + 22))
    worst = sorted(range(len(ops)), key=lambda i: (-_finite(snr[i]), i))[:CHART_LABELS]
    for rank, i in enumerate(worst, 1):
        x = int(left + (i + 0.5) * step)
        text(str(rank), (x - 4, max(top + 12, snr_y(snr[i]) - 6)), 0.5, (0, 0, 0), 2)
        text(
            f"{rank}: {ops[i].label}  SNR {_num(snr[i])}  cosine {_cos(1.0 - gap[i])}"[:140],
            (left, bottom + 44 + 22 * (rank - 1)),
        )
    return image


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


# --------------------------------------------------------------------------- files
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


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` gives back: the console lines and the summary's figures."""

    lines: list[str]
    figures: dict[str, Any]


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

    ``float_model`` is the model that was quantized (after onnxsim), ``quant_model`` the
    exported QDQ model, ``batches`` calibration batches ``{input_name: array}`` (at most
    :data:`DEFAULT_MAX_BATCHES` are used). Writes ``report_path`` (Markdown) and
    ``report_path.with_suffix('.png')`` (the chart), each atomically, and returns the
    summary lines for the console and the summary's figures (:func:`summary_figures`).
    Neither model is modified. Raises on failure: the caller decides (the pipeline warns and
    keeps the quantized model). ``sections`` are Markdown lines added after the settings (e.g.
    the auto-precision result). With ``trial`` (the engine's quantized graph), the "Next step"
    measures its float-fallback candidates (:mod:`xquant_core.fallback`); without it, it lists
    the unmeasured growth suggestions.
    ``held_back``: samples never calibrated on (listed after the first ``calibration_step``); when
    given, the model outputs' figures and the candidates are measured on them, not on ``batches``.
    """
    import cv2

    started = time.perf_counter()
    report_path = Path(report_path)
    budget = TIME_FRACTION * quantize_seconds if quantize_seconds > 0 else None
    measurement = measure(float_model, quant_model, list(batches), time_budget=budget)
    rows = rows_worst_first(measurement)
    suggestions = suggest(measurement)
    candidates, baseline = None, None
    used, reference = list(batches)[:CANDIDATE_BATCHES], None
    measurement.candidates_on = f"{len(used)} calibration batch(es) spread over the list"
    if held_back:
        measurement.outputs, used, reference = held_back_outputs(
            float_model, quant_model, held_back, len(held_back), HELD_BACK_CANDIDATES
        )
        total = getattr(held_back, "total", len(held_back))
        measurement.outputs_on = f"{len(held_back)} held-back sample(s)" + (
            f" spread over the {total} listed" if total > len(held_back) else ""
        )
        measurement.candidates_on = (
            f"{len(used)} held-back sample(s) (listed after the first calibration_step: never calibrated on)"
        )
    else:
        measurement.notes.append(
            "no sample is held back: the model outputs and the Next step are measured on "
            "calibration batches; list more samples than calibration_step and the report "
            "measures them on the rest, which calibration never saw"
        )
    if trial is not None:
        reference = reference if reference is not None else fallback.model_outputs(float_model, used)
        baseline = float(np.mean(list(fallback.output_errors(quant_model, used, reference).values())))
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
    chart_path = report_path.with_suffix(".png")
    title = report_path.stem.removesuffix("_report")
    helps = candidates and (baseline is None or candidates[0].error < baseline)
    image = render_chart(measurement, title, float_ops=candidates[0].op_names if candidates and helps else ())
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the chart as PNG")
    write_bytes_atomically(chart_path, png.tobytes())
    analysis_seconds = time.perf_counter() - started
    text = render_markdown(
        measurement,
        rows,
        suggestions,
        settings,
        quantize_seconds,
        analysis_seconds,
        chart_path.name,
        title,
        sections,
        candidates,
        baseline,
    )
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
