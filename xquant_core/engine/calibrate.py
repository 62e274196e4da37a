"""Activation calibration with xquant's algorithm plugins (replaces PPQ's observers)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..calibration import HISTOGRAM_BINS, CalibrationAlgorithm, CalibrationContext, TensorStatistics
from ..errors import DataError, PluginError, XQuantError
from ..runtime import cores, in_parallel
from .backend import ppq_ir, tensors
from .common import choice_batches, clearly_lower, onnxruntime_outputs, run_now
from .finetune import BiasShift, bias_layers, error_between
from .plan import EnginePlan

log = logging.getLogger("xquant.engine")

#: bins of the one-pass histogram's grid (:class:`OnePassHistogram`): four per bin handed to algorithms
INTERNAL_BINS = 4 * HISTOGRAM_BINS


class OnePassHistogram:
    """A histogram gathered in the same pass as the min/max, though the range is known only at the end.

    The bins lie on a grid aligned to 0 whose width is a power of two, at most ``INTERNAL_BINS`` of
    them: when a batch reaches past them, adjacent pairs merge (the width doubles; counts stay
    exact) until it fits. :meth:`spread` then shares the counts out onto equal bins between the
    exact min and max, uniformly within each grid bin. The grid width stays below twice the final
    range over ``INTERNAL_BINS``, so each of ``HISTOGRAM_BINS`` target bins gathers two grid bins or
    more: the two-pass histogram (min/max first, then counts over it) at half the forward passes.
    """

    def __init__(self) -> None:
        self.counts = np.zeros(0)
        self.first = 0  # grid index of counts[0]; grid bin k holds [k * width, (k + 1) * width)
        self.width = 0.0
        self.constant: list[tuple[float, int]] = []  # batches of one value, seen before the width was set

    def add(self, value, low: float, high: float) -> None:
        """Count ``value`` (a tensor), whose min and max are ``low`` and ``high``."""
        if not self.width:
            if high <= low:
                self.constant.append((low, value.numel()))
                return
            low, high = min([low] + [v for v, _ in self.constant]), max([high] + [v for v, _ in self.constant])
            self.width = 2.0 ** math.ceil(math.log2((high - low) / (INTERNAL_BINS // 2)))
            self.first = math.floor(low / self.width)
        self._cover(low, high)
        start, bins = self.first * self.width, len(self.counts)
        self.counts += tensors.histogram_counts(value, bins, start, start + bins * self.width)
        for constant, count in self.constant:
            self.counts[min(math.floor(constant / self.width) - self.first, bins - 1)] += count
        self.constant = []

    def _cover(self, low: float, high: float) -> None:
        """Extend the grid to [low, high], merging bin pairs while it would exceed ``INTERNAL_BINS``."""
        while True:
            first = min(self.first, math.floor(low / self.width))
            end = max(self.first + len(self.counts), math.floor(high / self.width) + 1)
            if end - first <= INTERNAL_BINS:
                break
            counts = np.concatenate([np.zeros(self.first % 2), self.counts])
            counts = np.concatenate([counts, np.zeros(len(counts) % 2)])
            self.counts, self.first, self.width = counts.reshape(-1, 2).sum(axis=1), self.first // 2, self.width * 2
        before, after = self.first - first, end - self.first - len(self.counts)
        self.counts = np.concatenate([np.zeros(before), self.counts, np.zeros(after)])
        self.first = first

    def spread(self, low: float, high: float, bins: int) -> np.ndarray:
        """The counts on ``bins`` equal bins over [low, high]."""
        if not self.width:
            counts = np.zeros(bins)
            counts[0] = sum(count for _, count in self.constant)
            return counts
        edges = (self.first + np.arange(len(self.counts) + 1)) * self.width
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        at = np.interp(np.linspace(low, high, bins + 1), edges, cumulative)
        at[0], at[-1] = 0.0, cumulative[-1]  # what the grid's edge bins hold beyond [low, high] is at its ends
        return np.diff(at)


class _TensorObserver:
    """Collects the min/max of one activation tensor and, when its algorithm wants one, a histogram."""

    def __init__(
        self,
        name: str,
        configs: list,
        consumers: tuple[str, ...],
        is_output: bool,
        algorithm: CalibrationAlgorithm,
        context: CalibrationContext,
    ):
        self.name, self.configs, self.consumers, self.is_output = name, configs, consumers, is_output
        self.algorithm, self.context = algorithm, context
        self.low, self.high = float("inf"), float("-inf")
        self.histogram = OnePassHistogram() if algorithm.needs_histogram else None
        self.last_step = -1
        self.step = 0
        # where the histogram counting runs (ActivationCalibration._forward_all: on a second core)
        self.submit: Callable = run_now

    def observe(self, value) -> None:
        if self.last_step == self.step:  # the same tensor seen as an output and as an input
            return
        self.last_step = self.step
        value = value.detach().float()
        low, high = tensors.min_max(value)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise DataError(
                f"tensor {self.name} of the float model holds inf or NaN on calibration batch {self.step + 1} "
                f"(values {low:g} .. {high:g}), which int8 cannot hold: are the calibration samples in the "
                "range the model expects (their values, their preprocessing)? If the graph makes them itself "
                "(an attention mask of -inf), keep the ops around that tensor in float with a custom_setting"
            )
        self.low, self.high = min(self.low, low), max(self.high, high)
        if self.histogram is not None:
            self.submit(self.histogram.add, value, low, high)

    def statistics(self) -> TensorStatistics:
        histogram = None
        if self.histogram is not None and self.high > self.low:
            histogram = self.histogram.spread(self.low, self.high, HISTOGRAM_BINS)
        elif self.algorithm.needs_histogram:
            histogram = np.zeros(HISTOGRAM_BINS)
            histogram[0] = 1.0
        return TensorStatistics(self.name, self.low, self.high, histogram, self.consumers, self.is_output)

    def compute(self) -> int:
        """Work out the candidate ranges; return how many there are. An algorithm (a plugin's,
        maybe) that fails or answers no finite ``(low, high)`` is named."""
        candidates = getattr(self.algorithm, "candidate_ranges", None)  # plugins may only duck-type
        what = f"calibration algorithm {type(self.algorithm).__module__}.{type(self.algorithm).__qualname__}"
        try:
            ranges = (
                candidates(self.statistics(), self.context)
                if candidates is not None
                else [self.algorithm.compute_range(self.statistics(), self.context)]
            )
            self.ranges = [_valid_range(entry) for entry in ranges]
        except XQuantError:  # a plugin saying what is wrong in xquant's own terms
            raise
        except Exception as exc:  # a plugin's own exception types
            raise PluginError(f"{what} failed on tensor {self.name}: {type(exc).__name__}: {exc}") from None
        if not self.ranges:
            raise PluginError(f"{what} gave no range for tensor {self.name}")
        return len(self.ranges)

    def render(self, strategy: int = 0) -> None:
        """Write the range of ``strategy`` (the last one when there are fewer) into the configs."""
        low, high = self.ranges[min(strategy, len(self.ranges) - 1)]
        for config in self.configs:
            scale, offset = range_to_scale_offset(
                low, high, config.quant_min, config.quant_max, symmetric=ppq_ir.is_symmetric(config)
            )
            ppq_ir.set_range(config, tensors.scalar(scale), tensors.scalar(offset))


def _valid_range(entry) -> tuple[float, float]:
    """``(low, high)`` as two finite floats with ``low <= high``, or a ValueError saying what it is instead."""
    try:
        low, high = (float(value) for value in entry)
    except (TypeError, ValueError):
        raise ValueError(f"a range must be two numbers (low, high), not {entry!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"a range must be finite with low <= high, not ({low:g}, {high:g})")
    return low, high


def _no_grad(function, *args) -> None:
    with tensors.no_grad():  # grad mode is per thread
        function(*args)


def range_to_scale_offset(
    low: float, high: float, quant_min: int, quant_max: int, symmetric: bool = False
) -> tuple[float, float]:
    """Scale and zero point so that [low, high] (widened to include 0) maps to the int range."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        bound = max(-low, high)
        scale = max(2 * bound / (quant_max - quant_min), 1e-8)
        return scale, 0.0
    scale = max((high - low) / (quant_max - quant_min), 1e-8)
    offset = float(np.clip(quant_min - np.round(low / scale), quant_min, quant_max))
    return scale, offset


class ActivationCalibration:
    """Activation calibration with xquant's algorithm plugins (replaces PPQ's pass)."""

    def __init__(self, plan: EnginePlan, regions=(), correct_bias: bool = False, float_model=None, export=None):
        self.plan = plan
        self.regions = regions
        self.correct_bias = correct_bias
        #: the ONNX model the graph was parsed from: onnxruntime runs it for the strategy choice's references
        self.float_model = float_model
        #: ``export() -> onnx.ModelProto`` of the graph as it stands: the choice measures each
        #: strategy's exported model with onnxruntime (None: PPQ's simulation measures them)
        self.export = export

    def _settings_per_tensor(self, graph) -> dict[str, tuple[CalibrationAlgorithm, CalibrationContext]]:
        """custom_setting calibration_type/max_percentile for the tensors their subgraphs touch."""
        settings: dict[str, tuple[CalibrationAlgorithm, CalibrationContext]] = {}
        for override, ops in self.regions:
            if override.algorithm is None and override.max_percentile is None:
                continue
            for name in ops:
                operation = graph.operations[name]
                for var in operation.inputs + operation.outputs:
                    if var.is_parameter:
                        continue
                    algorithm, context = settings.get(var.name, (self.plan.algorithm, self.plan.context))
                    if override.algorithm is not None:
                        algorithm = override.algorithm
                    if override.max_percentile is not None:
                        context = dataclasses.replace(context, max_percentile=override.max_percentile)
                    settings[var.name] = (algorithm, context)
        return settings

    def run(self, graph, executor, feeds, num_batches: int, progress) -> None:
        per_tensor = self._settings_per_tensor(graph)
        observers: dict[str, _TensorObserver] = {}
        tables: dict[str, dict] = {}
        for operation in ppq_ir.quantized_ops(graph, order=True):
            table = {}
            for config, var in operation.config_with_variable:
                if var.is_parameter or not ppq_ir.awaits_calibration(config):
                    continue
                observer = observers.get(var.name)
                if observer is None:
                    consumers = tuple(op.type for op in var.dest_ops)
                    algorithm, context = per_tensor.get(var.name, (self.plan.algorithm, self.plan.context))
                    observer = observers[var.name] = _TensorObserver(
                        var.name, [], consumers, var.name in graph.outputs, algorithm, context
                    )
                observer.configs.append(config)
                table[config] = observer
            if table:
                tables[operation.name] = table
        if not observers:
            return

        context = ppq_ir.op_context(executor)
        shifts = {op.name: BiasShift(op, context) for op in bias_layers(graph)} if self.correct_bias else {}
        hooks = {
            name: ppq_ir.calibration_hook(
                graph.operations[name], tables.get(name, {}), shifts[name].observe if name in shifts else None
            )
            for name in set(tables) | set(shifts)
        }
        self._forward_all(executor, feeds, hooks, [*observers.values(), *shifts.values()], num_batches, progress)
        for shift in shifts.values():
            shift.apply()
        strategies, batches, references = self._ranges_and_references(graph, feeds, observers)
        if strategies > 1:
            bar = progress("strategy choice", strategies) if progress else None
            batches = batches if batches is not None else choice_batches(feeds)
            self._choose_strategy(graph, executor, batches, references, observers, strategies, bar)
        else:
            for observer in observers.values():
                observer.render()

    def _ranges_and_references(self, graph, feeds, observers) -> tuple[int, list | None, list | None]:
        """Every observer's candidate ranges (the number of strategies) and, where the plan's algorithm
        offers several, the strategy choice's batches and the float model's outputs on them. Working
        out the ranges holds the GIL (numpy on small arrays) while onnxruntime releases it, so the
        float model runs on the second core meanwhile (PP-OCRv4 det: 24 runs of 0.07 s)."""

        def ranges() -> int:
            return max(observer.compute() for observer in observers.values())

        if len(getattr(self.plan.algorithm, "strategies", ())) < 2:
            return ranges(), None, None
        batches = choice_batches(feeds)
        references, strategies = in_parallel(
            functools.partial(onnxruntime_outputs, self.float_model, batches, list(graph.outputs))
            if self.float_model is not None
            else lambda: None,
            ranges,
        )
        return strategies, batches, references

    def _choose_strategy(self, graph, executor, batches, references, observers, strategies: int, bar=None) -> None:
        """Keep the strategy whose quantized model output is closest to the float one.

        Measured on ``batches`` (:func:`.common.choice_batches`; ``references``: the float model's
        outputs on them, or None), biases still float: each strategy's model as exported, run by
        onnxruntime (:meth:`_errors_as_exported`), or where that fails as PPQ simulates it
        (:meth:`_errors_as_simulated`).
        """
        errors = self._errors_as_exported(graph, batches, observers, strategies, references)
        if errors is None:
            errors = self._errors_as_simulated(graph, executor, batches, observers, strategies, references)
        if bar is not None:
            bar.update(strategies)
            bar.close()
        best = 0  # the first strategy, unless another is clearly better (DECISION_MARGIN)
        for index, error in enumerate(errors):
            if clearly_lower(error, errors[best]):
                best = index
        named = (tuple(getattr(observer.algorithm, "strategies", ())) for observer in observers.values())
        names = next((names for names in named if len(names) == strategies), ())
        label = lambda index: names[index] if index < len(names) else f"strategy {index}"  # noqa: E731
        log.info(
            "calibration: output SNR on %d calibration batch(es): %s; keeping %s",
            len(batches),
            ", ".join(f"{label(index)} {error:.5g}" for index, error in enumerate(errors)),
            label(best),
        )
        for observer in observers.values():
            observer.render(best)

    def _errors_as_exported(self, graph, batches, observers, strategies: int, references=None) -> list[float] | None:
        """Each strategy's output error, its model exported and run by onnxruntime (exact int8
        arithmetic, one thread per session, two sessions at a time on two cores): the model the
        user gets, and faster than PPQ's simulation (PP-OCRv4 det: 13.8 -> 7.4 s). It kept the
        simulation's strategy on eight of nine models measured; EfficientNet-Lite0, a near tie,
        moved from the wider percentile windows to KL+MSE (held-out logits SNR 0.0056 -> 0.0058).
        ``references``: the float model's outputs, when already run. None when a model cannot be
        exported or run."""
        if self.export is None or self.float_model is None:
            return None
        try:
            models = [] if references is not None else [self.float_model]
            for strategy in range(strategies):
                for observer in observers.values():
                    observer.render(strategy)
                models.append(self.export())
        except Exception as exc:
            log.debug("strategy choice by onnxruntime failed (%s: %s): PPQ simulates it", type(exc).__name__, exc)
            return None
        outputs = _outputs_two_at_a_time(models, batches, list(graph.outputs))
        if references is None:
            references, outputs = outputs[0], outputs[1:]
        if references is None or any(values is None for values in outputs):  # onnxruntime could not run one
            return None
        return [error_between(references, quantized) for quantized in outputs]

    def _errors_as_simulated(
        self, graph, executor, batches, observers, strategies: int, references=None
    ) -> list[float]:
        """Each strategy's output error in PPQ's quantized forward pass (float references from
        onnxruntime, run already or on the second core while PPQ runs the first strategy, else PPQ's
        float pass)."""

        def quantized(strategy: int) -> list:
            for observer in observers.values():
                observer.render(strategy)
            with tensors.no_grad():
                return [executor.forward(inputs=feed) for feed in batches]

        references, first = in_parallel(
            functools.partial(onnxruntime_outputs, self.float_model, batches, list(graph.outputs))
            if self.float_model is not None and references is None
            else lambda: references,
            functools.partial(quantized, 0),
        )
        if references is None:
            with tensors.no_grad(), ppq_ir.float_graph(graph):
                references = [executor.forward(inputs=feed) for feed in batches]
        errors = [error_between(references, first)]
        return errors + [error_between(references, quantized(strategy)) for strategy in range(1, strategies)]

    @staticmethod
    def _forward_all(executor, feeds, hooks, watchers, num_batches, progress) -> None:
        """One pass. With a second core, what the watchers (tensor observers, bias shifts) count of a
        batch is counted on it while the next batch runs, and the main thread takes its share once
        that forward is done (:class:`_SideWork`). The same numbers whichever thread counts them:
        each watcher's work runs in batch order, one batch's before the next one's is handed out."""
        bar = progress("calibration", num_batches) if progress else None
        with tensors.no_grad(), _SideWork(enabled=cores() > 1) as side:
            for watcher in watchers:
                watcher.submit = side.collect
            for step, feed in enumerate(feeds()):
                for watcher in watchers:
                    watcher.step = step
                executor.forward(inputs=feed, hooks=hooks)
                side.finish_previous_and_start_collected()
                if bar is not None:
                    bar.update(1)
        for watcher in watchers:
            watcher.submit = run_now
        if bar is not None:
            bar.close()


def _outputs_two_at_a_time(models: list, batches: list, names: list[str]) -> list:
    """:func:`.common.onnxruntime_outputs` of each model, two sessions at a time on two cores; an
    odd one out runs its batches in two halves side by side (None for a model that cannot run)."""
    runs = [functools.partial(onnxruntime_outputs, model, batches, names) for model in models]
    outputs: list = []
    for first, second in zip(runs[0::2], runs[1::2]):
        outputs += in_parallel(first, second)
    if len(runs) % 2:
        outputs.append(onnxruntime_outputs(models[-1], batches, names, halves=True))
    return outputs


class _SideWork:
    """The watchers' work of one batch, shared by a helper thread (from the front) and the main
    thread (from the back, once the next forward is done). The PP-OCRv4 detector's histograms
    took longer than its forward passes, and the main thread waited for them a third of the time.
    Without ``enabled`` (one core) every job runs where it is collected."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.collected: list[_Job] = []
        self.started: list[tuple[_Job, Future]] = []

    def __enter__(self) -> _SideWork:
        self.pool = ThreadPoolExecutor(1, initializer=tensors.one_thread) if self.enabled else None
        return self

    def collect(self, function, *args) -> None:
        if self.pool is None:
            _no_grad(function, *args)
        else:
            self.collected.append(_Job(function, args))

    def finish_previous_and_start_collected(self) -> None:
        """Run what is left of the previous batch's jobs here, wait for the helper's, then hand it
        the batch just collected."""
        for job, _ in reversed(self.started):
            job.run()
        for _, future in self.started:
            future.result()
        if self.pool is not None:
            self.started = [(job, self.pool.submit(job.run)) for job in self.collected]
        self.collected = []

    def __exit__(self, *exc_info) -> None:
        try:
            if exc_info[0] is None:
                self.finish_previous_and_start_collected()  # the last batch's
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


class _Job:
    """One watcher's work on one batch, run once by whichever thread claims it first."""

    def __init__(self, function, args):
        self.function, self.args = function, args
        self._claim = threading.Lock()

    def run(self) -> None:
        if self._claim.acquire(blocking=False):
            _no_grad(self.function, *self.args)
