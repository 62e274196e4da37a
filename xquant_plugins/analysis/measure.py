"""Both models run side by side with onnxruntime: every probe's SNR, MSE, cosine, ranges and histogram."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from xquant_core.runtime import in_parallel
from xquant_core.snr import PowerSums, flat32

from .graph import Probe, QuantizedOp, _QdqGraph, quantized_ops
from .limits import DEFAULT_MAX_BATCHES, DEFAULT_MAX_ELEMENTS, FLAG_COSINE, FLAG_SNR, HISTOGRAM_BINS, SEGMENT_BYTES
from .segments import SegmentedModel, groups_within, tensor_bytes


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
    #: per measured batch, both models' outputs ``({name: float}, {name: quantized})``, for the candidates' baseline
    output_values: list[tuple[dict, dict]] = field(default_factory=list)
    #: probes compared in the scale cross-layer equalization gave them: per-channel factors
    scales: dict[Probe, np.ndarray] = field(default_factory=dict)


def _run_both(float_run: SegmentedModel, quant_run: SegmentedModel, batch: dict[str, np.ndarray]):
    """Both models on one batch, segment by segment (:mod:`.segments`), the float one on the
    second core (:func:`..runtime.in_parallel`): per segment ``(float values, quantized values)``."""
    float_parts, quant_parts = float_run.run(batch), quant_run.run(batch)
    while True:
        f_values, q_values = in_parallel(
            functools.partial(next, float_parts, None), functools.partial(next, quant_parts, None)
        )
        if f_values is None or q_values is None:
            return
        yield f_values, q_values


def probe_groups(float_model: onnx.ModelProto, graph: _QdqGraph, probes: list[Probe], batch) -> list[list[Probe]]:
    """The probes in the QDQ graph's order, cut into groups whose float and quantized copies
    stay within :data:`.limits.SEGMENT_BYTES` for ``batch`` (one group when they all do)."""
    ordered = sorted(probes, key=lambda p: (graph.producer.get(p.quant, -1), p.quant, p.var))
    sizes = tensor_bytes(float_model, batch)
    if not sizes:
        return [ordered]
    unknown = max(sizes.values())
    costs = [2 * sizes.get(probe.var, unknown) for probe in ordered]
    return [ordered] if sum(costs) <= SEGMENT_BYTES else groups_within(ordered, costs, SEGMENT_BYTES)


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


#: a Conv's output channel counts as rescaled by cross-layer equalization when its exported
#: (dequantized) weights are the float ones times one factor this far from 1 ...
RESCALE_MIN_CHANGE = 0.05
#: ... every weight within this many of its quantization steps of that product (rounding: half a
#: step; a Conv whose input channels were rescaled misses by tens of steps)
RESCALE_TOLERANCE_STEPS = 1.0


def channel_scales(exported: np.ndarray, original: np.ndarray, step: np.ndarray | float = 0.0) -> np.ndarray | None:
    """Per output channel (axis 0) of a Conv's weights, the factor s with exported = s * original
    up to ``step`` (the weights' quantization step, per channel or one) where s is away from 1;
    1 elsewhere. None when no channel is rescaled.

    Cross-layer equalization (finetune_level >= 1, :mod:`xquant_core.engine.equalize`) divides
    the output channels of a depthwise Conv by factors and multiplies the reader's inputs by
    them: the tensor between is in another scale than the float model's, by exactly the ratio
    of the first Conv's weights. A channel zeroed or distorted by a bad quantization scale does
    not fit ``s * original`` and keeps s = 1, so its error shows.
    """
    if exported.shape != original.shape or exported.ndim < 2:
        return None
    axes = tuple(range(1, original.ndim))
    e, o = exported.astype(np.float64), original.astype(np.float64)
    o_c = np.sum(o * o, axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(o_c > 0, np.sum(e * o, axis=axes) / o_c, 1.0)
    shape = (-1,) + (1,) * len(axes)
    miss = np.abs(e - scale.reshape(shape) * o) - RESCALE_TOLERANCE_STEPS * np.asarray(step, np.float64)
    fits = np.max(miss, axis=axes) <= 1e-6 * np.max(np.abs(e), axis=axes)
    good = (o_c > 0) & (scale > 0) & fits & (np.abs(scale - 1.0) > RESCALE_MIN_CHANGE)
    if not good.any():
        return None
    return np.where(good, scale, 1.0).astype(np.float32)


def _equalization_scales(quant_model, float_model, graph: _QdqGraph, probes) -> dict[Probe, np.ndarray]:
    """Per probe, the channel scales cross-layer equalization put on its tensor: for the output of
    a depthwise Conv (the first of the pairs equalization balances), the ratio of its exported
    weights to the float model's (:func:`channel_scales`). Not other Convs: an output channel of
    the pair's second Conv that reads one input channel would fit the scale of its input."""
    float_weights = {init.name: init for init in float_model.graph.initializer}
    float_convs = {node.output[0]: node for node in float_model.graph.node if node.op_type == "Conv"}
    quant_constants = {init.name: init for init in quant_model.graph.initializer}
    by_var: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if node.op_type != "Conv" or len(node.input) < 2 or group == 1:  # no weights dequantized for nothing
            continue
        original = float_convs.get(graph.float_name(node.output[0]) or "")
        exported = _dequantized(graph, quant_constants, node.input[1])
        if original is None or original.input[1] not in float_weights or exported is None:
            continue
        values, step = exported
        if values.ndim < 2 or values.shape[1] != 1 or group != values.shape[0]:  # depthwise only
            continue
        scale = channel_scales(values, numpy_helper.to_array(float_weights[original.input[1]]), step)
        if scale is not None:
            by_var[original.output[0]] = scale.reshape(1, -1, *([1] * (values.ndim - 2)))
    return {probe: by_var[probe.var] for probe in probes if probe.var in by_var}


def _dequantized(graph: _QdqGraph, constants: dict, name: str) -> tuple[np.ndarray, np.ndarray | float] | None:
    """The float value of a constant weight as the exported model computes it and its quantization
    step: an initializer (step 0), or DequantizeLinear of one (per tensor or per ``axis``)."""
    if name in constants:
        return numpy_helper.to_array(constants[name]).astype(np.float32), 0.0
    node = graph._node(name)
    if node is None or node.op_type != "DequantizeLinear" or any(i not in constants for i in node.input if i):
        return None
    values, scale = (numpy_helper.to_array(constants[i]) for i in node.input[:2])
    zero = numpy_helper.to_array(constants[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
    if np.ndim(scale) > 1 or np.ndim(zero) > 1:  # blocked quantization (opset 21): not read here
        return None
    shape = [1] * values.ndim
    if np.ndim(scale) == 1 and values.ndim > 0:
        shape[next((attr.i for attr in node.attribute if attr.name == "axis"), 1)] = -1
    step = np.reshape(np.asarray(scale, np.float32), shape if np.ndim(scale) else [])
    zero = np.reshape(np.asarray(zero, np.float32), shape if np.ndim(zero) else [])
    return (values.astype(np.float32) - zero) * step, step


def _comparable(f: np.ndarray, q: np.ndarray) -> bool:
    """Both tensors float, non-empty and of one shape."""
    return (
        f.shape == q.shape
        and f.size > 0
        and np.issubdtype(f.dtype, np.floating)
        and np.issubdtype(q.dtype, np.floating)
    )


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
    quant_outputs = {value.name for value in quant_model.graph.output}
    model_outputs = [value.name for value in float_model.graph.output if value.name in quant_outputs]
    groups = probe_groups(float_model, graph, probes, batches[0])
    float_outputs = [value.name for value in float_model.graph.output]
    float_run = SegmentedModel(float_model, _fetches(groups, "var", float_outputs))
    quant_run = SegmentedModel(quant_model, _fetches(groups, "quant", sorted(quant_outputs)))
    scales = _equalization_scales(quant_model, float_model, graph, probes)
    planned = min(len(batches), max_batches)
    comparison = _Comparison(probes, model_outputs, scales, _Sampler(math.ceil(max_elements / planned)))
    notes: list[str] = []
    outputs_named = (float_outputs, quant_outputs)
    used, output_values = _compare_batches(
        comparison, (float_run, quant_run, groups), batches[:planned], outputs_named, started, time_budget, notes
    )
    notes += _row_notes({p for op in ops for p in op.inputs + op.outputs}, scales, comparison.skipped)
    stats, outputs = comparison.results()
    return Measurement(
        graph, ops, stats, outputs, used, len(batches), max_elements, time.perf_counter() - started, notes,
        f"{used} calibration batch(es)", output_values=output_values, scales=scales,
    )  # fmt: skip


def _compare_batches(comparison, runs, batches, outputs_named, started: float, time_budget, notes: list[str]):
    """Both models on each batch, each segment's values compared on a thread of their own while the
    next segment runs (:class:`_InOrder`); stops before a batch that would pass ``time_budget``.
    Returns the batches used and both models' outputs on each."""
    float_run, quant_run, groups = runs
    float_outputs, quant_outputs = outputs_named
    used, output_values = 0, []
    with _InOrder() as compare:
        for batch in batches:
            batch_started = time.perf_counter()
            for group, (f_values, q_values) in zip(groups, _run_both(float_run, quant_run, batch)):
                compare.submit(comparison.add, f_values, q_values, group)
            output_values.append(
                (
                    {name: f_values[name] for name in float_outputs},
                    {name: q_values[name] for name in quant_outputs if name in q_values},
                )
            )
            used += 1
            per_batch = time.perf_counter() - batch_started
            elapsed = time.perf_counter() - started
            if time_budget is not None and used < len(batches) and elapsed + per_batch > time_budget:
                notes.append(
                    f"stopped after {used} of {len(batches)} batches to stay within the time budget "
                    f"({time_budget:.1f} s)"
                )
                break
    return used, output_values


class _InOrder:
    """Calls run in order on one thread of their own, one at most waiting while the caller goes on:
    the comparison of a segment runs while onnxruntime computes the next one (on two cores the
    measurement's time went from the runs plus the comparisons to about the larger of them)."""

    def __enter__(self) -> _InOrder:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="xquant-compare")
        self.pending: Future | None = None
        return self

    def submit(self, function, *args) -> None:
        self.wait()
        self.pending = self.pool.submit(function, *args)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, *exc_info) -> None:
        try:
            if exc_info[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _fetches(groups: list[list[Probe]], side: str, outputs: list[str]) -> list[list[str]]:
    """Per group, its probes' tensor names on ``side`` ("var": float, "quant": QDQ); the model
    outputs with the last group."""
    fetches = [[getattr(probe, side) for probe in group] for group in groups]
    fetches[-1] += outputs
    return fetches


class _Comparison:
    """Every probe's and model output's accumulated INT8-against-float error; a probe whose values
    are missing or not comparable goes into ``skipped`` for good."""

    def __init__(self, probes: list[Probe], model_outputs: list[str], scales: dict, sampler: _Sampler):
        self.accumulators = {probe: _Accumulator() for probe in probes}
        self.outputs = {name: _Accumulator() for name in model_outputs}
        self.scales, self.sampler = scales, sampler
        self.skipped: set[Probe] = set()

    def add(self, f_values: dict[str, np.ndarray], q_values: dict[str, np.ndarray], probes: Iterable[Probe]) -> None:
        """``probes``' values (one segment's) and the model outputs among ``f_values``."""
        for probe in probes:
            acc = self.accumulators[probe]
            if probe in self.skipped:
                continue
            f, q = f_values.get(probe.var), q_values.get(probe.quant)
            if f is None or q is None or not _comparable(f, q):
                self.skipped.add(probe)
                continue
            if probe in self.scales:
                f = f * self.scales[probe]
            acc.add(q, f, self.sampler.picks(f.size))
        for name, acc in self.outputs.items():  # every element: a softmax's few peaks carry its error
            f, q = f_values.get(name), q_values.get(name)
            if f is None or q is None:
                continue
            if f.shape == q.shape and np.issubdtype(f.dtype, np.floating):
                acc.add(q, f, None)

    def results(self) -> tuple[dict, dict]:
        """(the probes' statistics, the model outputs')"""
        stats = {p: acc.result() for p, acc in self.accumulators.items() if p not in self.skipped and acc.count}
        return stats, {name: acc.result() for name, acc in self.outputs.items() if acc.count}


def _row_notes(row_probes: set, scales: dict, skipped: set) -> list[str]:
    """The report's notes on the rows: tensors compared in an equalized scale, tensors not compared."""
    notes = []
    rescaled = {p.var for p in row_probes if p in scales}
    if rescaled:
        notes.append(
            f"{len(rescaled)} tensor(s) have channels rescaled by cross-layer equalization: they are "
            "compared with the float tensor in the equalized scale (F columns too)"
        )
    skipped_rows = row_probes & skipped
    if skipped_rows:
        notes.append(f"{len(skipped_rows)} tensor(s) not compared (not float, or shapes differ between the models)")
    return notes


def held_back_outputs(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    held_back: Iterable[dict[str, np.ndarray]],
    count: int,
    keep: int,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
):
    """Every held-back sample through both models, once: the outputs' statistics over every
    element, and ``keep`` of the samples spread over them with both models' outputs (for the
    "Next step" candidates and their baseline). ``count``: how many samples ``held_back`` yields."""
    names = [value.name for value in float_model.graph.output]
    float_run, quant_run = SegmentedModel(float_model, [names]), SegmentedModel(quant_model, [names])
    accumulators = {name: _Accumulator() for name in names}
    sampler, picks = _Sampler(math.ceil(max_elements / max(count, 1))), set(spread(count, keep))
    kept, reference, quantized = [], [], []
    for index, batch in enumerate(held_back):
        f_values, q_values = next(_run_both(float_run, quant_run, batch))
        for name, acc in accumulators.items():
            f, q = f_values[name], q_values.get(name)
            if q is not None and f.shape == q.shape and np.issubdtype(f.dtype, np.floating):
                acc.add(q, f, sampler.picks(f.size))
        if index in picks:
            kept.append(batch)
            reference.append({name: f_values[name] for name in names})
            quantized.append({name: q_values[name] for name in names if name in q_values})
    stats = {name: acc.result() for name, acc in accumulators.items() if acc.count}
    return stats, kept, reference, quantized
