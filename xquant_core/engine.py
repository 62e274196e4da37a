"""The one core module that talks to PPQ: graph IR, dispatch, calibration, passes.

``quantize_graph`` takes a float ONNX model, calibration batches and a platform and
returns the quantized ``onnx.ModelProto``. The steps:

1. parse the model into PPQ's IR and format it (constants folded into parameters,
   BatchNorm merged into Conv);
2. dispatch: ops the platform quantizes go to INT8, the rest (and what
   ``precision_level`` keeps in float) to FP32;
3. optional cross-layer equalization (``finetune_level`` >= 1);
4. the platform's quantizer creates the tensor quantization configs; the platform
   ties the configs of shape ops to their inputs;
5. weights by min/max, activations by the configured calibration algorithm (two
   passes over the data when it needs a histogram), passive parameters (bias);
6. optional bias correction (``finetune_level`` >= 1);
7. platform policy fixes, then export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from .calibration import HISTOGRAM_BINS, CalibrationAlgorithm, CalibrationContext, TensorStatistics
from .errors import ModelError, QuantizationError
from .ppq_compat import import_ppq

log = logging.getLogger("xquant.engine")

#: parameter-free ops (both operands are activations) kept in float, by precision_level.
#: Level 1 keeps the products (gates such as SiLU's Sigmoid x Mul, attention products) in
#: float: rounding errors of both operands multiply there. Residual Add/Sub stay int8.
#: Level 2 also keeps Add/Sub in float. Level 3 keeps every op in float.
FLOAT_OPS_BY_LEVEL = {
    0: frozenset(),
    1: frozenset({"Mul", "Div", "Sigmoid", "Softmax"}),
    2: frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Softmax"}),
}


@dataclass(frozen=True)
class SubgraphOverride:
    """One ``custom_setting`` entry, its names resolved to plugin objects."""

    index: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    precision_level: int | None = None
    algorithm: CalibrationAlgorithm | None = None
    max_percentile: float | None = None
    float_after_calibration: bool = False


@dataclass(frozen=True)
class EnginePlan:
    """Everything the engine needs to know, resolved from the config."""

    algorithm: CalibrationAlgorithm
    context: CalibrationContext
    precision_level: int
    finetune_level: int
    device: str
    overrides: tuple[SubgraphOverride, ...] = ()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def quantize_graph(model, batches: Iterable[dict[str, np.ndarray]], num_batches: int,
                   platform: Any, plan: EnginePlan,
                   progress: Callable[[str, int], Any] | None = None, search: "FloatOpSearch | None" = None):
    """Quantize ``model`` (an ``onnx.ModelProto``) and return the exported ``onnx.ModelProto``.

    With ``search``, return its :class:`SearchResult` (which holds the exported model).
    """
    import_ppq()
    import torch

    torch.manual_seed(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads())
    try:
        return _quantize(model, batches, num_batches, platform, plan, progress, search)
    finally:
        torch.set_num_threads(previous_threads)


def torch_threads() -> int:
    """Threads for torch during calibration: ``XQUANT_NUM_THREADS``, else half the cores.

    torch's OpenMP kernels slow down by 10x or more when their threads compete with
    other processes for every core (measured here on a 2-core machine: a 1x1 conv took
    30 ms with 2 threads beside one busy process, 0.2 ms with 1 thread), so by default
    we leave half of the cores free.
    """
    configured = os.environ.get("XQUANT_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2)


def _quantize(model, batches, num_batches, platform, plan, progress, search=None):
    import torch
    from ppq import TargetPlatform, TorchExecutor

    graph = _load_graph(model)
    _check_executable(graph)
    quantizer = platform.create_quantizer(graph)
    regions = resolve_overrides(graph, plan.overrides)
    _dispatch(graph, quantizer.quant_operation_types, plan, regions)

    def feeds() -> Iterable[dict[str, Any]]:
        for batch in batches:
            yield {name: torch.from_numpy(array).to(plan.device) for name, array in batch.items()}

    executor = TorchExecutor(graph=graph, device=plan.device)
    first = next(iter(feeds()))
    executor.tracing_operation_meta(inputs=first)

    def apply(ppq_pass, data=None) -> None:
        data = _Batches(feeds, num_batches) if data is None else data
        with _ppq_output_to_log():
            ppq_pass.optimize(graph=graph, dataloader=data, executor=executor,
                              calib_steps=len(data), collate_fn=None)

    if plan.finetune_level >= 1:
        from ppq.quantization.optim import LayerwiseEqualizationPass

        apply(LayerwiseEqualizationPass(iterations=10, weight_threshold=0.5, including_bias=False,
                                        including_act=False, optimize_level=2))

    for name, operation in list(graph.operations.items()):
        if operation.platform == TargetPlatform.UNSPECIFIED:
            operation.platform = (quantizer.target_platform if operation.type in quantizer.quant_operation_types
                                  else TargetPlatform.FP32)
        if operation.platform not in {TargetPlatform.FP32, TargetPlatform.SOI}:
            quantizer.quantize_operation(name)
    executor.load_graph(graph)

    from ppq.quantization.optim import (ParameterQuantizePass, PassiveParameterQuantizePass,
                                        QuantizeFusionPass, QuantizeSimplifyPass)

    apply(QuantizeFusionPass(activation_type=quantizer.activation_fusion_types, fuse_activation=True,
                             fuse_passive_op=False))
    apply(QuantizeSimplifyPass())
    platform.share_quantization(graph)
    apply(ParameterQuantizePass())
    ActivationCalibration(plan, regions).run(graph, executor, feeds, num_batches, progress)
    align_concat_inputs_to_output(graph)
    apply(PassiveParameterQuantizePass())
    if plan.finetune_level >= 2:
        fine_tune_worst_layers(graph, executor, feeds, plan, apply)
    if plan.finetune_level >= 1:
        correct_bias(graph, executor, feeds, progress=progress)
    keep_float(graph, {name for override, ops in regions
                       if override.precision_level == 3 and override.float_after_calibration for name in ops})
    platform.finalize(graph)
    if search is not None:
        return search.run(graph, executor, plan.device, export=lambda: platform.export(graph))
    return platform.export(graph)


def keep_float(graph, names) -> Callable[[], None]:
    """Run the named ops in float in an already quantized graph; return an undo function.

    ``precision_level: 3`` with ``float_after_calibration`` (what the auto-precision search
    measures and emits): their weights go back to float and their outputs are not
    quantized; their inputs stay as the int8 graph quantized them; ops outside that read
    their outputs keep quantizing them with the parameters calibrated so far.
    """
    from ppq import QuantableOperation, QuantizationStates

    names = set(names)
    # ops already float stay out: undo must not quantize what an earlier call kept float
    ops = [graph.operations[name] for name in names
           if isinstance(graph.operations[name], QuantableOperation) and not graph.operations[name]._dequantized]
    own = {id(config) for op in ops
           for config in op.config.input_quantization_config + op.config.output_quantization_config}
    detached = []
    for other in graph.operations.values():
        if not isinstance(other, QuantableOperation) or other.name in names:
            continue
        for config, var in other.config_with_variable:
            root = config.dominated_by
            if root is config or id(root) not in own or var.is_parameter or root._scale is None:
                continue
            detached.append((config, config._dominator, config._scale, config._offset, config.state))
            config._dominator = config
            config._scale, config._offset = root._scale.clone(), root._offset.clone()
            config.state = QuantizationStates.ACTIVATED
    for op in ops:
        op.dequantize()

    def undo() -> None:
        for op in ops:
            op.restore_quantize_state()
        for config, dominator, scale, offset, state in detached:
            config._dominator, config._scale, config._offset, config.state = dominator, scale, offset, state

    return undo


@contextlib.contextmanager
def _float_graph(graph):
    """Run the graph in float for the ``with`` block; ops already kept float stay float after."""
    from ppq import QuantableOperation

    switched = [op for op in graph.operations.values() if isinstance(op, QuantableOperation) and not op._dequantized]
    for op in switched:
        op.dequantize()
    try:
        yield
    finally:
        for op in switched:
            op.restore_quantize_state()


class _Batches:
    """A re-iterable, sized view of the calibration batches for PPQ passes.

    Reads lazily on every pass (the dataset keeps a bounded cache), so memory does not
    grow with the number of calibration samples.
    """

    def __init__(self, feeds, count: int):
        self.feeds, self.count = feeds, count

    def __iter__(self):
        return iter(self.feeds())

    def __len__(self) -> int:
        return self.count


@contextlib.contextmanager
def _ppq_output_to_log():
    """PPQ passes report with print(): keep that out of the user's terminal (debug log)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        text = captured.getvalue().strip()
        if text:
            log.debug("%s", text)


def align_concat_inputs_to_output(graph) -> None:
    """Concat inputs share the output's quantization (the runtime concatenates int8 as is).

    PPQ's alignment pass does the same but also ties inputs to an output that is not
    quantized (a model output stays float), leaving them without parameters: those
    inputs keep their own quantization here.
    """
    from ppq import QuantableOperation, QuantizationStates

    for operation in graph.operations.values():
        if not isinstance(operation, QuantableOperation) or operation.type != "Concat":
            continue
        master = operation.config.output_quantization_config[0]
        if master.dominated_by.scale is None:
            continue
        for config in operation.config.input_quantization_config:
            if config.state not in {QuantizationStates.FP32, QuantizationStates.SOI}:
                config.master_by = master
        # the producers write their outputs with the concat's parameters: no requantization
        for producer in graph.get_upstream_operations(operation):
            if isinstance(producer, QuantableOperation):
                for config, var in producer.config_with_variable:
                    if operation in var.dest_ops:
                        config.dominated_by = master


def _check_executable(graph) -> None:
    """Calibration runs the graph in PPQ: name the first op it cannot run, and the way around it."""
    from ppq import TargetPlatform
    from ppq.executor.base import OPERATION_FORWARD_TABLE

    known = OPERATION_FORWARD_TABLE[TargetPlatform.FP32]
    for operation in graph.topological_sort():
        if operation.type not in known:
            inputs = [var.name for var in operation.inputs if not var.is_parameter]
            raise QuantizationError(
                f"op {operation.name} ({operation.type}) cannot be executed by PPQ. Cut the graph above it with "
                f"quantization_parameters.truncate_var_names (e.g. {json.dumps(inputs)}): the part below the cut "
                "is re-attached in float")


def _load_graph(model):
    """Parse an ``onnx.ModelProto`` into PPQ's IR and format it."""
    import onnx
    from ppq.api.interface import format_graph
    from ppq.parser.onnx_parser import OnnxParser

    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="xquant-")
    os.close(handle)
    try:
        onnx.save(model, path)
        graph = OnnxParser().build(path)
    finally:
        os.unlink(path)
    return format_graph(graph)


def resolve_overrides(graph, overrides) -> list[tuple[SubgraphOverride, set[str]]]:
    """The ops of each ``custom_setting`` subgraph: the ops on the way up from its outputs that do not
    cross its inputs, and are downstream of them."""
    regions = []
    for override in overrides:
        where = f"$.quantization_parameters.custom_setting[{override.index}]"
        if not override.input_names or not override.output_names:
            raise ModelError(f"{where}: input_names and output_names should be set.")
        for field, names in (("input_names", override.input_names), ("output_names", override.output_names)):
            for name in names:
                if name not in graph.variables:
                    raise ModelError(f"{where}.{field}: var name {name} not in the graph. (Names are those of the "
                                     "model after onnxsim; set skip_onnxsim to keep every original name.)")
        downstream = _reachable({op for name in override.input_names for op in graph.variables[name].dest_ops},
                                lambda op: [d for out in op.outputs for d in out.dest_ops])
        boundary = set(override.input_names)  # walking up from the outputs stops at the inputs
        upstream = _reachable({graph.variables[name].source_op for name in override.output_names
                               if graph.variables[name].source_op is not None and name not in boundary},
                              lambda op: [v.source_op for v in op.inputs
                                          if v.source_op is not None and v.name not in boundary])
        ops = {op.name for op in downstream & upstream}
        if not ops:
            raise ModelError(f"{where}: no op lies between input_names {list(override.input_names)} and "
                             f"output_names {list(override.output_names)}")
        regions.append((override, ops))
    return regions


def _reachable(start: set, neighbours) -> set:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in neighbours(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _dispatch(graph, quant_types: set, plan: EnginePlan, regions) -> None:
    """Send each op to INT8 (decided by the quantizer) or FP32, honouring precision levels."""
    from ppq import TargetPlatform
    from ppq.scheduler import DISPATCHER_TABLE

    dispatcher = DISPATCHER_TABLE["conservative"](graph)
    table = dispatcher.dispatch(graph=graph, quant_types=quant_types,
                                quant_platform=TargetPlatform.UNSPECIFIED,
                                fp32_platform=TargetPlatform.FP32, SOI_platform=TargetPlatform.SOI)
    levels = {name: plan.precision_level for name in graph.operations}
    for override, ops in regions:
        if override.precision_level == 3 and override.float_after_calibration:
            continue  # quantized now, put back to float after calibration (keep_float)
        if override.precision_level is not None:
            for name in ops:
                levels[name] = override.precision_level
    for operation in graph.operations.values():
        operation.platform = table[operation.name]
        level = levels[operation.name]
        if level >= 3 or (operation.type in FLOAT_OPS_BY_LEVEL[level] and not operation.parameters):
            operation.platform = TargetPlatform.FP32


#: finetune_level -> (layers fine-tuned, optimization steps per layer)
FINETUNE_SCHEDULE = {2: (4, 300), 3: (12, 800)}
LSQ_LEARNING_RATE = 1e-5
RANKING_BATCHES = 8
#: every n-th calibration batch is held back to validate fine-tuning
HOLD_BACK_EVERY = 4
COMPUTING_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
#: the auto-precision search tries at most this many candidates per allowed float op
SEARCH_CANDIDATES_PER_OP = 3


def fine_tune_worst_layers(graph, executor, feeds, plan: EnginePlan, apply) -> None:
    """finetune_level 2/3: learned step size fine-tuning of the layers adding the most error.

    LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) trains the weights
    and quantization scales of each chosen layer to match its float output, using PPQ's
    block-wise pass. Calibration sets are small (often < 100 samples), so training can
    overfit: one sample in four is held back, and the result is kept only if the model
    outputs' error on those held-back samples goes down; otherwise the layers are
    restored.
    """
    from ppq.quantization.optim import LearnedStepSizePass, PassiveParameterQuantizePass

    layers, steps = FINETUNE_SCHEDULE[plan.finetune_level]
    batches = list(feeds())
    held_back = batches[::HOLD_BACK_EVERY]
    training = [batch for index, batch in enumerate(batches) if index % HOLD_BACK_EVERY]
    if not held_back or not training:
        log.warning("finetune_level %d needs at least %d calibration samples; skipped", plan.finetune_level,
                    HOLD_BACK_EVERY)
        return
    ranking = rank_layers_by_error(graph, executor, lambda: iter(training), RANKING_BATCHES)
    worst = [name for name, _ in ranking[:layers]]
    before = output_error(graph, executor, held_back)
    saved = _snapshot(graph, worst)
    apply(LearnedStepSizePass(interested_layers=worst, steps=steps, lr=LSQ_LEARNING_RATE, block_size=1,
                              is_scale_trainable=True, collecting_device=plan.device), training)
    apply(PassiveParameterQuantizePass())
    after = output_error(graph, executor, held_back)
    if after < before:
        log.info("fine-tuned %d layers (%s): held-back output error %.5f -> %.5f", len(worst), ", ".join(worst),
                 before, after)
    else:
        _restore(graph, saved)
        apply(PassiveParameterQuantizePass())
        log.info("fine-tuning did not lower the held-back output error (%.5f -> %.5f): kept the layers as "
                 "they were", before, after)


def _snapshot(graph, op_names) -> list:
    """Weights and quantization parameters of the given ops, to undo fine-tuning."""
    saved = []
    for name in op_names:
        operation = graph.operations[name]
        for config, var in operation.config_with_variable:
            value = var.value.clone() if var.is_parameter and var.value is not None else None
            root = config.dominated_by
            scale = root._scale.clone() if root._scale is not None else None
            offset = root._offset.clone() if root._offset is not None else None
            saved.append((var, value, root, scale, offset, root.state))
    return saved


def _restore(graph, saved) -> None:
    for var, value, root, scale, offset, state in saved:
        if value is not None:
            var.value = value
        root._scale, root._offset, root.state = scale, offset, state


def output_error(graph, executor, batches) -> float:
    """Noise-to-signal power of the model outputs, quantized vs float, on ``batches``."""
    import torch

    noise = signal = 0.0
    with torch.no_grad():
        for batch in batches:
            with _float_graph(graph):
                reference = executor.forward(inputs=batch)
            quantized = executor.forward(inputs=batch)
            for ref, out in zip(reference, quantized):
                ref, out = ref.float(), out.float()
                noise += float(((out - ref) ** 2).sum())
                signal += float((ref ** 2).sum())
    return noise / signal if signal > 0 else 0.0


def rank_layers_by_error(graph, executor, feeds, max_batches: int,
                         op_types: set | None = COMPUTING_OPS) -> list[tuple[str, float]]:
    """Quantized ops (of ``op_types``; all when None) sorted by the error they add, worst first.

    For each op, the noise-to-signal ratio of its output (quantized graph vs float graph,
    cumulative) minus the largest of its inputs': the error the op itself adds. Runs the
    float and the quantized graph on up to ``max_batches`` batches.
    """
    import torch
    from ppq import QuantableOperation
    from ppq.executor import QuantOPRuntimeHook

    quantable = [op for op in graph.operations.values() if isinstance(op, QuantableOperation)]
    layers = [op for op in quantable if op_types is None or op.type in op_types]
    reference: dict[tuple, torch.Tensor] = {}
    power: dict[tuple, list[float]] = {}  # key -> [noise, signal]
    mode = {"float": True}

    def record(key, value) -> None:
        value = value.detach().float()
        if mode["float"]:
            reference[key] = value
        elif key in reference and reference[key].shape == value.shape:
            noise, signal = power.get(key, [0.0, 0.0])
            power[key] = [noise + float(((value - reference[key]) ** 2).sum()),
                          signal + float((reference[key] ** 2).sum())]

    class ErrorHook(QuantOPRuntimeHook):
        def pre_forward_hook(self, inputs, quant_inputs, quant_configs):
            for index, (var, value) in enumerate(zip(self._hook_to.inputs, quant_inputs)):
                if not var.is_parameter and isinstance(value, torch.Tensor) and value.is_floating_point():
                    record((self._hook_to.name, "in", index), value)
            return quant_inputs

        def post_forward_hook(self, outputs, quant_outputs, quant_configs):
            if isinstance(outputs[0], torch.Tensor) and outputs[0].is_floating_point():
                record((self._hook_to.name, "out", 0), outputs[0])
            return quant_outputs

    hooks = {op.name: ErrorHook(op) for op in layers}
    with torch.no_grad():
        for index, feed in enumerate(feeds()):
            if index >= max_batches:
                break
            mode["float"] = True
            with _float_graph(graph):
                executor.forward(inputs=feed, hooks=hooks)
            mode["float"] = False
            executor.forward(inputs=feed, hooks=hooks)
            reference.clear()

    def snr(key) -> float:
        noise, signal = power.get(key, (0.0, 0.0))
        return noise / signal if signal > 0 else 0.0

    growth = []
    for op in layers:
        inputs = [snr(key) for key in power if key[0] == op.name and key[1] == "in"]
        growth.append((op.name, snr((op.name, "out", 0)) - max(inputs, default=0.0)))
    return sorted(growth, key=lambda item: item[1], reverse=True)


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


class FloatOpSearch:
    """Automatic mixed precision: the fewest ops in float that meet a metric target.

    Ops are ranked by the error they add (:func:`rank_layers_by_error` over all
    quantized ops: one float and one quantized pass over the held-back feeds).
    Greedily, in that order, an op (alone, then with its quantized neighbours) is
    switched to float, the graph is exported and the metric is measured with
    onnxruntime on the held-back feeds, the way the final model will be measured; it
    stays float only if the metric improves, until the target is met or
    ``max_float_ops`` ops are float. A candidate costs one export and one onnxruntime
    pass over the held-back feeds (about 1 s for MobileNetV2), not a quantization.

    ``measure(model)`` scores an exported ``onnx.ModelProto`` against the float model;
    ``already_float`` are ops the plan keeps float already (they count against the budget).
    """

    def __init__(self, measure: Callable[[Any], float], metric, target: float, max_float_ops: int,
                 held_back: list[dict[str, np.ndarray]], already_float: Iterable[str] = ()):
        self.measure_model, self.metric = measure, metric
        self.target, self.max_float_ops = target, max_float_ops
        self.held_back, self.already_float = held_back, set(already_float)

    def run(self, graph, executor, device: str, export: Callable[[], Any]) -> SearchResult:
        import torch

        def measure() -> float:
            return float(self.measure_model(export()))

        started = time.perf_counter()
        before = best = measure()
        chosen: list[FloatOp] = []
        kept: set[str] = set(self.already_float)
        tried = 0
        if self.metric.meets(best, self.target) or len(kept) >= self.max_float_ops:
            return SearchResult((), before, best, tried, export(), time.perf_counter() - started)
        feeds = lambda: iter({name: torch.from_numpy(np.ascontiguousarray(array)).to(device)  # noqa: E731
                              for name, array in feed.items()} for feed in self.held_back)
        ranking = [item for item in rank_layers_by_error(graph, executor, feeds, len(self.held_back), op_types=None)
                   if item[0] not in kept]
        growth = dict(ranking)
        for name, _ in ranking[: SEARCH_CANDIDATES_PER_OP * self.max_float_ops]:
            if len(kept) >= self.max_float_ops or self.metric.meets(best, self.target):
                break
            if name in kept:
                continue
            # the op alone, and with its quantized neighbours: a float chain needs no int8 in between
            operation = graph.operations[name]
            neighbours = {op.name for op in graph.get_upstream_operations(operation)
                          + graph.get_downstream_operations(operation) if op.name in growth}
            best_set, best_value = None, best
            for candidate in ({name}, {name} | neighbours):
                candidate = candidate - kept
                if not candidate or len(kept | candidate) > self.max_float_ops:
                    continue
                undo = keep_float(graph, kept | candidate)
                value = measure()
                undo()
                tried += 1
                if self.metric.better(value, best_value):
                    best_set, best_value = candidate, value
            if best_set is None:
                continue
            kept |= best_set
            best = best_value
            for member in sorted(best_set, key=lambda op_name: -growth[op_name]):
                op = graph.operations[member]
                chosen.append(FloatOp(member, op.type, growth[member],
                                      tuple(var.name for var in op.inputs if not var.is_parameter),
                                      tuple(var.name for var in op.outputs)))
            log.info("auto_precision: %d op(s) in float: %s %.6g", len(kept), type(self.metric).__name__, best)
        keep_float(graph, kept - self.already_float)
        return SearchResult(tuple(chosen), before, best, tried, export(), time.perf_counter() - started)


def correct_bias(graph, executor, feeds, progress=None) -> None:
    """Per-channel bias correction of the error that weight quantization adds.

    Rounding weights shifts the mean of each output channel: ``E[(W_q - W) x] != 0``.
    In one pass over the calibration data we run each Conv/ConvTranspose/Gemm twice on
    the same (quantized) input, once with quantized and once with float weights, and
    fold the per-channel difference of the output means into the bias (Nagel et al.,
    "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
    2019, empirical variant). Measuring each layer on its own input keeps upstream
    corrections from being counted twice, which correcting all layers from one
    float-vs-quantized comparison of the whole network would do. Cost: one pass.
    """
    import torch
    from ppq import QuantableOperation
    from ppq.executor import QuantOPRuntimeHook
    from ppq.executor.base import OPERATION_FORWARD_TABLE

    layers = [operation for operation in graph.operations.values()
              if isinstance(operation, QuantableOperation) and operation.type in {"Conv", "ConvTranspose", "Gemm"}
              and operation.num_of_input == 3 and operation.inputs[2].value is not None]
    if not layers:
        return
    shifts: dict[str, torch.Tensor] = {}
    context = executor._executing_context

    class ShiftHook(QuantOPRuntimeHook):
        """Accumulates mean(output with float weights) - mean(output with quantized weights)."""

        def pre_forward_hook(self, inputs, quant_inputs, quant_configs):
            operation = self._hook_to
            forward = OPERATION_FORWARD_TABLE[operation.platform][operation.type]
            float_weights = [quant_inputs[0], inputs[1], quant_inputs[2]]
            self._float_weight_output = forward(operation, float_weights, context)
            return quant_inputs

        def post_forward_hook(self, outputs, quant_outputs, quant_configs):
            operation = self._hook_to
            difference = (self._float_weight_output - outputs[0]).float()
            channel = difference.ndim - 1 if operation.type == "Gemm" else 1
            mean = difference.mean(dim=[d for d in range(difference.ndim) if d != channel])
            shifts[operation.name] = shifts[operation.name] + mean if operation.name in shifts else mean
            self._float_weight_output = None
            return quant_outputs

    hooks = {operation.name: ShiftHook(operation) for operation in layers}
    count = 0
    bar = progress("bias correction", None) if progress else None
    with torch.no_grad():
        for feed in feeds():
            executor.forward(inputs=feed, hooks=hooks)
            count += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for operation in layers:
        bias = operation.inputs[2].value
        shift = (shifts[operation.name] / max(count, 1)).to(bias.device, bias.dtype)
        if shift.shape == bias.shape:
            operation.inputs[2].value = bias + shift


class _TensorObserver:
    """Collects min/max, then optionally a histogram, of one activation tensor."""

    def __init__(self, name: str, configs: list, consumers: tuple[str, ...], is_output: bool,
                 algorithm: CalibrationAlgorithm, context: CalibrationContext):
        self.name, self.configs, self.consumers, self.is_output = name, configs, consumers, is_output
        self.algorithm, self.context = algorithm, context
        self.phase = "minmax"
        self.low, self.high = float("inf"), float("-inf")
        self.histogram = None
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
            counts = torch.histc(value, bins=HISTOGRAM_BINS, min=self.low, max=self.high)
            counts = counts.cpu().numpy().astype(np.float64)
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
        self.ranges = (candidates(self.statistics(), self.context) if candidates is not None
                       else [self.algorithm.compute_range(self.statistics(), self.context)])
        return len(self.ranges)

    def render(self, strategy: int = 0) -> None:
        """Write the range of ``strategy`` (the last one when there are fewer) into the configs."""
        import torch
        from ppq import QuantizationProperty, QuantizationStates

        low, high = self.ranges[min(strategy, len(self.ranges) - 1)]
        for config in self.configs:
            scale, offset = range_to_scale_offset(
                low, high, config.quant_min, config.quant_max,
                symmetric=config.policy.has_property(QuantizationProperty.SYMMETRICAL))
            config.scale = torch.tensor(scale, dtype=torch.float32)
            config.offset = torch.tensor(offset, dtype=torch.float32)
            config.state = QuantizationStates.ACTIVATED


def range_to_scale_offset(low: float, high: float, quant_min: int, quant_max: int,
                          symmetric: bool = False) -> tuple[float, float]:
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
                        var.name, [], consumers, var.name in graph.outputs, algorithm, context)
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
            self._forward_all(executor, feeds, hooks, observers, steps, num_batches, progress,
                              f"calibration ({phase})")
        strategies = max(observer.compute() for observer in observers.values())
        for observer in observers.values():
            observer.render()
        if strategies > 1:
            self._choose_strategy(graph, executor, feeds, observers, strategies)

    def _choose_strategy(self, graph, executor, feeds, observers, strategies: int) -> None:
        """Keep the strategy whose quantized model output is closest to the float one.

        Measured on every ``HOLD_BACK_EVERY``-th calibration batch (at most
        ``RANKING_BATCHES``), biases still float: one quantized pass over those batches
        per strategy.
        """
        import torch

        batches = list(itertools.islice(itertools.islice(feeds(), 0, None, HOLD_BACK_EVERY), RANKING_BATCHES))
        outputs = list(graph.outputs)
        with torch.no_grad():
            with _float_graph(graph):
                expected = [[value.float() for value in executor.forward(inputs=feed, output_names=outputs)]
                            for feed in batches]
            errors = []
            for strategy in range(strategies):
                for observer in observers.values():
                    observer.render(strategy)
                noise = signal = 0.0
                for feed, reference in zip(batches, expected):
                    for value, ref in zip(executor.forward(inputs=feed, output_names=outputs), reference):
                        noise += float(((value.float() - ref) ** 2).sum())
                        signal += float((ref ** 2).sum())
                errors.append(noise / signal if signal > 0 else 0.0)
        best = int(np.argmin(errors))
        names = next((tuple(getattr(observer.algorithm, "strategies", ())) for observer in observers.values()
                      if len(getattr(observer.algorithm, "strategies", ())) == strategies), ())
        label = lambda index: names[index] if index < len(names) else f"strategy {index}"  # noqa: E731
        log.info("calibration: output SNR on %d calibration batch(es): %s; keeping %s", len(batches),
                 ", ".join(f"{label(index)} {error:.5g}" for index, error in enumerate(errors)), label(best))
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
