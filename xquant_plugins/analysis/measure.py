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


def _equalization_scales(quant_model, float_run, groups, batch) -> dict[Probe, np.ndarray]:
    """Per probe, the channel scales cross-layer equalization put on it (from one batch: the
    exported graph without its activation Q/DQ against the float model); only rescaled probes."""
    reference, renamed = float_activations(quant_model)
    reference_run = SegmentedModel(reference, [[renamed.get(p.quant, p.quant) for p in group] for group in groups])
    scales: dict[Probe, np.ndarray] = {}
    for group, r_values, f_values in zip(groups, reference_run.run(batch), float_run.run(batch)):
        for probe in group:
            f, r = f_values.get(probe.var), r_values.get(renamed.get(probe.quant, probe.quant))
            if f is not None and r is not None and np.issubdtype(f.dtype, np.floating):
                scale = channel_scales(r, f)
                if scale is not None:
                    scales[probe] = scale
    return scales


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
    scales = _equalization_scales(quant_model, float_run, groups, batches[0])
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
        f"{used} calibration batch(es)", output_values=output_values,
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
