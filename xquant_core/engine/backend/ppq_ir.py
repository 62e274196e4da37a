"""PPQ's graph for the engine: parse, dispatch, executor, passes, hooks, ranges, ops kept float.

Everything the engine does to PPQ's IR that needs PPQ's classes or private attributes is here;
the algorithms work with what these functions return. PPQ is imported in each function (through
:func:`.compat.import_ppq`, which the engine calls first), not at module level.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable

from .. import forms


def load_graph(model):
    """Parse an ``onnx.ModelProto`` into PPQ's IR (in the forms PPQ runs right) and format it."""
    import onnx
    from ppq.api.interface import format_graph
    from ppq.parser.onnx_parser import OnnxParser

    from . import ops

    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="xquant-")
    os.close(handle)
    try:
        onnx.save(forms.for_ppq(model, ops.runnable_types()), path)
        graph = OnnxParser().build(path)
    finally:
        os.unlink(path)
    return format_graph(graph)


def dispatch(graph, quant_types: set, precision_level: int, levels: dict[str, int], platform) -> None:
    """Send each op to INT8 (decided later by the quantizer) or FP32, honouring precision levels
    (``levels``: op name -> level where it is not ``precision_level``; the platform's op types for
    each level) and the ops the platform keeps float."""
    from ppq import TargetPlatform
    from ppq.scheduler import DISPATCHER_TABLE

    dispatcher = DISPATCHER_TABLE["conservative"](graph)
    table = dispatcher.dispatch(
        graph=graph,
        quant_types=quant_types,
        quant_platform=TargetPlatform.UNSPECIFIED,
        fp32_platform=TargetPlatform.FP32,
        SOI_platform=TargetPlatform.SOI,
    )
    for operation in graph.operations.values():
        # PPQ's dispatcher only quantizes what it reaches walking down from a computing op to an
        # end: a Conv whose input comes from a float op (Mish, Tanh) and that writes a model
        # output is not reached, and stayed float
        if operation.is_computing_op and operation.type in quant_types and table[operation.name] == TargetPlatform.FP32:
            table[operation.name] = TargetPlatform.UNSPECIFIED
    platform_float = platform.float_ops(graph)
    for operation in graph.operations.values():
        operation.platform = table[operation.name]
        level = levels.get(operation.name, precision_level)
        if (
            level >= 3
            or (operation.type in platform.float_op_types(level) and not operation.parameters)
            or operation.name in platform_float
        ):
            operation.platform = TargetPlatform.FP32


def executor_for(graph, quantizer, device: str, first: dict):
    """PPQ's executor on the dispatched graph, every op not yet placed given to the quantizer's
    platform (INT8, configs created) or to FP32. ``first``: a calibration batch, what the executor
    traces and what PPQ's passes run instead of zeros."""
    from ppq import TargetPlatform, TorchExecutor

    executor = TorchExecutor(graph=graph, device=device)
    executor.tracing_operation_meta(inputs=first)
    # PPQ's ParameterQuantizePass runs the graph on zeros: an If on an input's value (Silero
    # VAD's sample rate) would take a branch the data never takes, and fail there
    executor.dummy_forward = lambda hooks=None: executor.forward(inputs=first, hooks=hooks)
    for name, operation in list(graph.operations.items()):
        if operation.platform == TargetPlatform.UNSPECIFIED:
            operation.platform = (
                quantizer.target_platform if operation.type in quantizer.quant_operation_types else TargetPlatform.FP32
            )
        if operation.platform not in {TargetPlatform.FP32, TargetPlatform.SOI}:
            quantizer.quantize_operation(name)
    executor.load_graph(graph)
    return executor


def ppq_pass(name: str, **options):
    """One of PPQ's optimization passes (``ppq.quantization.optim``), by class name."""
    from ppq.quantization import optim

    return getattr(optim, name)(**options)


def quantized_ops(graph, order: bool = False) -> list:
    """The ops PPQ quantizes (its ``QuantableOperation``), in graph order or (``order``) topologically."""
    from ppq import QuantableOperation

    operations = graph.topological_sort() if order else graph.operations.values()
    return [op for op in operations if isinstance(op, QuantableOperation)]


def awaits_calibration(config) -> bool:
    """A tensor quantization config whose range calibration is to set."""
    from ppq import QuantizationStates

    return config.state == QuantizationStates.INITIAL


def set_range(config, scale, offset) -> None:
    """Give a tensor quantization config its scale and offset (torch scalars) and activate it."""
    from ppq import QuantizationStates

    config.scale, config.offset = scale, offset
    config.state = QuantizationStates.ACTIVATED


def is_symmetric(config) -> bool:
    from ppq import QuantizationProperty

    return config.policy.has_property(QuantizationProperty.SYMMETRICAL)


def op_context(executor):
    """What the executor hands each op's forward function (its device)."""
    return executor._executing_context


def run_op(operation, inputs: list, context):
    """``operation``'s forward function (PPQ's, or :mod:`.ops`'s) on ``inputs``."""
    from ppq.executor.base import OPERATION_FORWARD_TABLE

    return OPERATION_FORWARD_TABLE[operation.platform][operation.type](operation, inputs, context)


def runtime_hook(operation, before: Callable | None = None, after: Callable | None = None):
    """A PPQ runtime hook on a quantized op: ``before(inputs, quant_inputs)`` sees its inputs (float
    and as quantized) before it runs, ``after(outputs)`` its outputs."""
    from ppq.executor import QuantOPRuntimeHook

    class Hook(QuantOPRuntimeHook):
        def pre_forward_hook(self, inputs, quant_inputs, quant_configs):
            if before is not None:
                before(inputs, quant_inputs)
            return quant_inputs

        def post_forward_hook(self, outputs, quant_outputs, quant_configs):
            if after is not None:
                after(outputs)
            return quant_outputs

    return Hook(operation)


def calibration_hook(operation, table: dict, before: Callable | None = None):
    """PPQ's calibration hook for one op (``table``: config -> observer, each observed with the
    float tensor), with ``before(inputs, quant_inputs)`` called first; it renders nothing itself."""
    from ppq.quantization.observer import CalibrationHook

    class Hook(CalibrationHook):
        def pre_forward_hook(self, inputs, quant_inputs, quant_configs):
            if before is not None:
                before(inputs, quant_inputs)
            return super().pre_forward_hook(inputs, quant_inputs, quant_configs)

        def render_quantization_config(self):  # rendering happens once, in ActivationCalibration
            return None

    return Hook(operation=operation, observer_table=table)


def snapshot_params(graph, op_names) -> list:
    """Weights and quantization parameters of the given ops, for :func:`restore_params`."""
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


def restore_params(saved) -> None:
    for var, value, root, scale, offset, state in saved:
        if value is not None:
            var.value = value
        root._scale, root._offset, root.state = scale, offset, state


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
    ops = [
        graph.operations[name]
        for name in names
        if isinstance(graph.operations[name], QuantableOperation) and not graph.operations[name]._dequantized
    ]
    own = {
        id(config)
        for op in ops
        for config in op.config.input_quantization_config + op.config.output_quantization_config
    }
    detached = []
    for other in graph.operations.values():
        # an op kept float by an earlier call reads float: detaching its input config would
        # quantize that input again (a two-step search and its one-step custom_setting differed)
        if not isinstance(other, QuantableOperation) or other.name in names or other._dequantized:
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
def float_graph(graph):
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


@contextlib.contextmanager
def fast_fake_quant(graph, executor):
    """Cheaper fake quantization, the same numbers, for the inference-only passes in the block.

    PPQ's executor quantizes every weight again on every forward pass (per channel: a quarter
    of a MobileNetV2 calibration pass) and fake-quantizes activations through autograd
    functions. Inside the block each weight is quantized once (again only if it gets a new
    value or scale) and per-tensor activations take PPQ's own expression, ``(clamp(round(x /
    scale) + offset) - offset) * scale`` with round half to even, written in place on one new
    tensor: the same arithmetic, the same results. Not for passes that need gradients.
    """
    from ppq import QuantableOperation, QuantizationProperty, QuantizationStates, RoundingPolicy

    registered = []
    for operation in graph.operations.values():
        if not isinstance(operation, QuantableOperation):
            continue
        for config, var in operation.config_with_variable:
            if config in executor._delegates:
                continue
            if var.is_parameter and config.state == QuantizationStates.ACTIVATED:
                executor.register_quantize_delegate(config, _quantized_once(executor._default_quant_fn))
            elif (
                not var.is_parameter
                and config.policy.has_property(QuantizationProperty.PER_TENSOR)
                and config.policy.has_property(QuantizationProperty.LINEAR)
                and not config.policy.has_property(QuantizationProperty.DYNAMIC)
                and config.rounding == RoundingPolicy.ROUND_HALF_EVEN
            ):
                executor.register_quantize_delegate(config, _per_tensor())
            else:
                continue
            registered.append(config)
    try:
        yield
    finally:
        for config in registered:
            executor.remove_quantize_delegate(config)


def _quantized_once(quantize):
    """A PPQ quantize delegate returning its last result while the tensor and the config's scale
    and offset are the same objects."""
    from ppq.executor.torch import TorchQuantizeDelegator

    class QuantizedOnce(TorchQuantizeDelegator):
        key: tuple = (None, None, None)
        result: Any = None

        def __call__(self, tensor, config):
            key = (tensor, config.scale, config.offset)
            if any(new is not old for new, old in zip(key, self.key)):
                self.key, self.result = key, quantize(tensor, config)
            return self.result

    return QuantizedOnce()


def _per_tensor():
    """A PPQ quantize delegate: TensorwiseLinearQuantImpl's forward, in place on its one result."""
    from ppq.executor.torch import TorchQuantizeDelegator

    class PerTensor(TorchQuantizeDelegator):
        def __call__(self, tensor, config):
            scale, offset = config.scale.to(tensor.device), config.offset.to(tensor.device)
            result = tensor / scale
            result.round_().add_(offset).clamp_(config.quant_min, config.quant_max)
            return result.sub_(offset).mul_(scale)

    return PerTensor()
