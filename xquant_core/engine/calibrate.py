"""Activation calibration with xquant's algorithm plugins (replaces PPQ's observers)."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np

from ..calibration import HISTOGRAM_BINS, CalibrationAlgorithm, CalibrationContext, TensorStatistics
from .common import choice_batches, clearly_lower, float_graph
from .finetune import output_error
from .plan import EnginePlan

log = logging.getLogger("xquant.engine")


class _TensorObserver:
    """Collects min/max, then optionally a histogram, of one activation tensor."""

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
        self.phase = "minmax"
        self.low, self.high = float("inf"), float("-inf")
        self.histogram: np.ndarray | None = None
        self.last_step = -1
        self.step = 0

    def observe(self, value) -> None:
        if self.last_step == self.step:  # the same tensor seen as an output and as an input
            return
        self.last_step = self.step
        import torch

        value = value.detach().float()
        if self.phase == "minmax":
            self.low = min(self.low, value.min().item())
            self.high = max(self.high, value.max().item())

        elif self.phase == "histogram" and self.high > self.low:
            counts = torch.histc(value, bins=HISTOGRAM_BINS, min=self.low, max=self.high).cpu().numpy()
            counts = counts.astype(np.float64)
            self.histogram = counts if self.histogram is None else self.histogram + counts

    def statistics(self) -> TensorStatistics:
        histogram = self.histogram
        if histogram is None and self.algorithm.needs_histogram:
            histogram = np.zeros(HISTOGRAM_BINS)
            histogram[0] = 1.0
        return TensorStatistics(self.name, self.low, self.high, histogram, self.consumers, self.is_output)

    def compute(self) -> int:
        """Work out the candidate ranges; return how many there are."""
        candidates = getattr(self.algorithm, "candidate_ranges", None)  # plugins may only duck-type
        self.ranges = (
            candidates(self.statistics(), self.context)
            if candidates is not None
            else [self.algorithm.compute_range(self.statistics(), self.context)]
        )
        return len(self.ranges)

    def render(self, strategy: int = 0) -> None:
        """Write the range of ``strategy`` (the last one when there are fewer) into the configs."""
        import torch
        from ppq import QuantizationProperty, QuantizationStates

        low, high = self.ranges[min(strategy, len(self.ranges) - 1)]
        for config in self.configs:
            scale, offset = range_to_scale_offset(
                low,
                high,
                config.quant_min,
                config.quant_max,
                symmetric=config.policy.has_property(QuantizationProperty.SYMMETRICAL),
            )
            config.scale = torch.tensor(scale, dtype=torch.float32)
            config.offset = torch.tensor(offset, dtype=torch.float32)
            config.state = QuantizationStates.ACTIVATED


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

    def __init__(self, plan: EnginePlan, regions=()):
        self.plan = plan
        self.regions = regions

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
        from ppq import QuantableOperation, QuantizationStates
        from ppq.quantization.observer import CalibrationHook

        per_tensor = self._settings_per_tensor(graph)
        observers: dict[str, _TensorObserver] = {}
        tables: dict[str, dict] = {}
        for operation in graph.topological_sort():
            if not isinstance(operation, QuantableOperation):
                continue
            table = {}
            for config, var in operation.config_with_variable:
                if var.is_parameter or config.state != QuantizationStates.INITIAL:
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

        def render_noop() -> None:  # rendering happens once, below
            return None

        hooks = {}
        for name, table in tables.items():
            hook = CalibrationHook(operation=graph.operations[name], observer_table=table)
            hook.render_quantization_config = render_noop
            hooks[name] = hook

        needs_histogram = any(observer.algorithm.needs_histogram for observer in observers.values())
        phases = ["minmax"] + (["histogram"] if needs_histogram else [])
        steps = itertools.count()
        for phase in phases:
            for observer in observers.values():
                observer.phase = phase if (phase == "minmax" or observer.algorithm.needs_histogram) else "done"
            self._forward_all(executor, feeds, hooks, observers, steps, num_batches, progress, f"calibration ({phase})")
        strategies = max(observer.compute() for observer in observers.values())
        if strategies > 1:
            bar = progress("strategy choice", strategies) if progress else None
            self._choose_strategy(graph, executor, feeds, observers, strategies, bar)
        else:
            for observer in observers.values():
                observer.render()

    def _choose_strategy(self, graph, executor, feeds, observers, strategies: int, bar=None) -> None:
        """Keep the strategy whose quantized model output is closest to the float one.

        Measured on :func:`.common.choice_batches`, biases still float: one quantized pass over those batches
        per strategy.
        """
        import torch

        batches = choice_batches(feeds)
        with torch.no_grad(), float_graph(graph):
            references = [executor.forward(inputs=feed) for feed in batches]
        errors = []
        for strategy in range(strategies):
            for observer in observers.values():
                observer.render(strategy)
            errors.append(output_error(graph, executor, batches, references))
            if bar is not None:
                bar.update(1)
        if bar is not None:
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

    @staticmethod
    def _forward_all(executor, feeds, hooks, observers, steps, num_batches, progress, label) -> None:
        import torch

        bar = progress(label, num_batches) if progress else None
        with torch.no_grad():
            for feed in feeds():
                step = next(steps)
                for observer in observers.values():
                    observer.step = step
                executor.forward(inputs=feed, hooks=hooks)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
