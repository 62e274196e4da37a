"""Automatic mixed precision: the fewest ops in float that meet a metric target."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .backend import ppq_ir, tensors
from .finetune import rank_layers_by_error

log = logging.getLogger("xquant.engine")

#: the auto-precision search tries at most this many candidates per allowed float op
SEARCH_CANDIDATES_PER_OP = 3


@dataclass(frozen=True)
class FloatOp:
    """An op the auto-precision search keeps in float."""

    name: str
    type: str
    sensitivity: float
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class SearchResult:
    chosen: tuple[FloatOp, ...]  #: ops this search switched to float (not those it started with)
    before: float  #: the metric before this search switched any op
    estimate: float  #: the metric of ``model``
    candidates_tried: int
    model: Any  #: the exported graph with the chosen ops in float
    seconds: float  #: time spent in the search (ranking and candidates)
    plain: float | None = None  #: the metric of the all-INT8 model, when the search started with float ops


class FloatOpSearch:
    """Automatic mixed precision: the fewest ops in float that meet a metric target.

    Ops are ranked by the error they add (:func:`rank_layers_by_error` over all
    quantized ops: one float and one quantized pass over the held-back feeds).
    Greedily, in that order, an op (alone, then with its quantized neighbours) is
    switched to float, the graph is exported and the metric is measured with
    onnxruntime on the held-back feeds, the way the final model will be measured; it
    stays float only if the metric improves, until the target is met or
    ``max_float_ops`` ops are float. A candidate costs one export and one onnxruntime
    pass over the held-back feeds (about 0.3 s for MobileNetV2), not a quantization.

    ``measure(model)`` scores an exported ``onnx.ModelProto`` against the float model;
    ``already_float`` are ops the plan keeps float already (they count against the budget).
    """

    def __init__(
        self,
        measure: Callable[[Any], float],
        metric,
        target: float,
        max_float_ops: int,
        held_back: list[dict[str, np.ndarray]],
        already_float: Iterable[str] = (),
    ):
        self.measure_model, self.metric = measure, metric
        self.target, self.max_float_ops = target, max_float_ops
        self.held_back, self.already_float = held_back, set(already_float)

    def run(
        self,
        graph,
        executor,
        device: str,
        export: Callable[[], Any],
        plain: Any = None,
        progress: Callable[[str, Any], Any] | None = None,
    ) -> SearchResult:
        """Search; ``plain``: the exported all-INT8 model, measured for comparison only."""
        bar = progress("auto-precision candidates", None) if progress else None
        try:
            return self._run(graph, executor, device, export, plain, bar)
        finally:
            if bar is not None:
                bar.close()

    def _run(self, graph, executor, device: str, export: Callable[[], Any], plain: Any, bar) -> SearchResult:
        def measure() -> float:
            return float(self.measure_model(export()))

        started = time.perf_counter()
        plain_value = float(self.measure_model(plain)) if plain is not None else None
        before = best = measure()
        chosen: list[FloatOp] = []
        kept: set[str] = set(self.already_float)
        tried = 0
        if self.metric.meets(best, self.target) or len(kept) >= self.max_float_ops:
            return SearchResult((), before, best, tried, export(), time.perf_counter() - started, plain_value)

        def feeds():
            return iter(
                {name: tensors.to_tensor(np.ascontiguousarray(array), device) for name, array in feed.items()}
                for feed in self.held_back
            )

        ranking = [
            item
            for item in rank_layers_by_error(graph, executor, feeds, len(self.held_back), op_types=None)
            if item[0] not in kept
        ]
        growth = dict(ranking)
        for name, _ in ranking[: SEARCH_CANDIDATES_PER_OP * self.max_float_ops]:
            if len(kept) >= self.max_float_ops or self.metric.meets(best, self.target):
                break
            if name in kept:
                continue
            best_set, best_value, tries = self._best_extension(graph, name, growth, kept, best, measure, bar)
            tried += tries
            if best_set is None:
                continue
            kept |= best_set
            best = best_value
            chosen += [
                _float_op(graph.operations[member], growth[member])
                for member in sorted(best_set, key=lambda op_name: -growth[op_name])
            ]
            log.info("auto_precision: %d op(s) in float: %s %.6g", len(kept), type(self.metric).__name__, best)
        ppq_ir.keep_float(graph, kept - self.already_float)
        return SearchResult(tuple(chosen), before, best, tried, export(), time.perf_counter() - started, plain_value)

    def _best_extension(self, graph, name: str, growth: dict, kept: set, best: float, measure, bar):
        """Try ``name`` in float alone and with its quantized neighbours (a float chain needs no int8
        in between): (the better set or None when neither beats ``best``, its value, tries made)."""
        operation = graph.operations[name]
        neighbours = {
            op.name
            for op in graph.get_upstream_operations(operation) + graph.get_downstream_operations(operation)
            if op.name in growth
        }
        best_set, best_value, tried = None, best, 0
        for candidate in ({name}, {name} | neighbours):
            candidate = candidate - kept
            if not candidate or len(kept | candidate) > self.max_float_ops:
                continue
            undo = ppq_ir.keep_float(graph, kept | candidate)
            value = measure()
            undo()
            tried += 1
            if bar is not None:
                bar.update(1)
            if self.metric.better(value, best_value):
                best_set, best_value = candidate, value
        return best_set, best_value, tried


def _float_op(op, growth: float) -> FloatOp:
    """How the search reports an op it kept in float."""
    return FloatOp(
        op.name,
        op.type,
        growth,
        tuple(var.name for var in op.inputs if not var.is_parameter),
        tuple(var.name for var in op.outputs),
    )
