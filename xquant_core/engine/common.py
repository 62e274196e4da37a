"""Helpers the engine's modules share: switching ops to float, batch views, constants."""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Callable

log = logging.getLogger("xquant.engine")

#: batches used to rank layers by the error they add, and to choose a calibration strategy
RANKING_BATCHES = 8
#: the calibration strategy is chosen on every CHOICE_EVERY-th batch, at most CHOICE_BATCHES: a
#: detector's rare objects must be among them (8 batches of YOLOv8n's calibration photos held
#: too few faces, and the choice fell on windows that clipped them: 83.5 % of the FP32 boxes
#: recalled against 90-91 % for the two wider strategies)
CHOICE_EVERY = 2
CHOICE_BATCHES = 24
#: every n-th calibration batch is held back to validate fine-tuning and the auto-precision search
HOLD_BACK_EVERY = 4
#: a decision between two measured errors (strategy choice, fine-tune acceptance) changes the
#: default only when the other is lower by more than this fraction: a closer call is rounding noise
#: (another CPU's float kernels), not a better model
DECISION_MARGIN = 0.02


def run_now(function, *args) -> None:
    """Run ``function`` here: where calibration's observers and bias shifts send their work when no
    second core takes it."""
    function(*args)


def choice_batches(feeds) -> list:
    """The calibration batches the strategy choice measures on: every ``CHOICE_EVERY``-th, at most
    ``CHOICE_BATCHES``."""
    return list(itertools.islice(itertools.islice(feeds(), 0, None, CHOICE_EVERY), CHOICE_BATCHES))


def onnxruntime_outputs(model, batches, names: list[str]):
    """``model``'s outputs ``names`` on each batch (dicts of torch tensors) as torch tensors, run
    by onnxruntime on one thread (a second core, beside PPQ); None when it cannot (an output name
    the model lacks, an op onnxruntime does not run)."""
    import torch

    from ..runtime import outputs_on

    if not set(names) <= {value.name for value in model.graph.output}:
        return None
    arrays = [{name: value.cpu().numpy() for name, value in batch.items()} for batch in batches]
    try:
        return [[torch.from_numpy(value) for value in values] for values in outputs_on(model, arrays, names, 1)]
    except Exception as exc:  # PPQ running the graph is the fallback
        log.debug("onnxruntime could not run the model (%s): PPQ runs it", exc)
        return None


def clearly_lower(candidate: float, incumbent: float) -> bool:
    return candidate < incumbent * (1.0 - DECISION_MARGIN)


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
        result = None

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


class Batches:
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
