"""Fine-tuning after calibration: bias correction, learned step size, error ranking."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .backend import ppq_ir, tensors
from .common import HOLD_BACK_EVERY, RANKING_BATCHES, clearly_lower, run_now
from .plan import EnginePlan

log = logging.getLogger("xquant.engine")

#: finetune_level -> (layers fine-tuned, optimization steps per layer)
FINETUNE_SCHEDULE = {2: (4, 300), 3: (12, 800)}
LSQ_LEARNING_RATE = 1e-5
COMPUTING_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def fine_tune_worst_layers(graph, executor, feeds, plan: EnginePlan, apply) -> None:
    """finetune_level 2/3: learned step size fine-tuning of the layers adding the most error.

    LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) trains the weights
    and quantization scales of each chosen layer to match its float output, using PPQ's
    block-wise pass. Calibration sets are small (often < 100 samples), so training can
    overfit: one sample in four is held back, and the result is kept only if the model
    outputs' error on those held-back samples goes down; otherwise the layers are
    restored.
    """
    layers, steps = FINETUNE_SCHEDULE[plan.finetune_level]
    batches = list(feeds())
    held_back = batches[::HOLD_BACK_EVERY]
    training = [batch for index, batch in enumerate(batches) if index % HOLD_BACK_EVERY]
    if not held_back or not training:
        log.warning(
            "finetune_level %d needs at least %d calibration samples; skipped", plan.finetune_level, HOLD_BACK_EVERY
        )
        return
    ranking = rank_layers_by_error(graph, executor, lambda: iter(training), RANKING_BATCHES)
    worst = [name for name, _ in ranking[:layers]]
    before = output_error(graph, executor, held_back)
    saved = ppq_ir.snapshot_params(graph, worst)
    apply(
        ppq_ir.ppq_pass(
            "LearnedStepSizePass",
            interested_layers=worst,
            steps=steps,
            lr=LSQ_LEARNING_RATE,
            block_size=1,
            is_scale_trainable=True,
            collecting_device=plan.device,
        ),
        training,
    )
    apply(ppq_ir.ppq_pass("PassiveParameterQuantizePass"))
    after = output_error(graph, executor, held_back)
    if clearly_lower(after, before):
        log.info(
            "fine-tuned %d layers (%s): held-back output error %.5g -> %.5g",
            len(worst),
            ", ".join(worst),
            before,
            after,
        )
    else:
        ppq_ir.restore_params(saved)
        apply(ppq_ir.ppq_pass("PassiveParameterQuantizePass"))
        log.info(
            "fine-tuning did not lower the held-back output error (%.5g -> %.5g): kept the layers as they were",
            before,
            after,
        )


def output_error(graph, executor, batches, references=None) -> float:
    """Noise-to-signal power of the model outputs, quantized vs float, on ``batches``: the mean over outputs.

    Each output counts alike (a face detector's score output beside its box output). An
    output of rank >= 3 whose channels (its shortest non-batch axis) fall in two magnitude
    groups, the largest gap between their RMS values above :data:`MAGNITUDE_GAP`, counts as
    two outputs: YOLOv8's [1, 22, anchors] holds 4 box coordinates in pixels and 18 class
    scores in [0, 1], and summed together the pixels drowned every score error.
    ``references``: the float outputs of each batch, when already known.
    """
    with tensors.no_grad():
        if references is None:
            with ppq_ir.float_graph(graph):
                references = [executor.forward(inputs=batch) for batch in batches]
        outputs = [executor.forward(inputs=batch) for batch in batches]
    return error_between(references, outputs)


def error_between(references, outputs) -> float:
    """:func:`output_error` of outputs already run: per batch, the float and the quantized outputs."""
    noise: list = []
    signal: list = []
    for reference, quantized in zip(references, outputs):
        for position, (ref, out) in enumerate(zip(reference, quantized)):
            ref, out = ref.double(), out.double()
            dims = list(range(ref.ndim))
            if ref.ndim >= 3:
                axis = min(range(1, ref.ndim), key=lambda dim: ref.shape[dim])
                dims.remove(axis)
            power = ((out - ref) ** 2).sum(dim=dims).reshape(-1), (ref**2).sum(dim=dims).reshape(-1)
            if position == len(noise):
                noise.append(power[0])
                signal.append(power[1])
            else:
                noise[position] = noise[position] + power[0]
                signal[position] = signal[position] + power[1]
    ratios = []
    for channel_noise, channel_signal in zip(noise, signal):
        for group in _magnitude_groups(channel_signal):
            total = float(channel_signal[group].sum())
            if total > 0:
                ratios.append(float(channel_noise[group].sum()) / total)
    return float(np.mean(ratios)) if ratios else 0.0


#: channel power ratio (RMS ratio squared) that separates two magnitude groups of one output
MAGNITUDE_GAP = 100.0


def _magnitude_groups(power) -> list:
    """Channel indices of an output, split in two at the largest power gap when it exceeds the limit."""
    power = power.cpu().numpy()
    order = np.argsort(power)
    if len(power) < 2:
        return [order]
    logs = np.log10(np.maximum(power[order], 1e-30))
    gaps = np.diff(logs)
    cut = int(np.argmax(gaps))
    if gaps[cut] < np.log10(MAGNITUDE_GAP):
        return [order]
    return [order[: cut + 1], order[cut + 1 :]]


def rank_layers_by_error(
    graph, executor, feeds, max_batches: int, op_types: set | None = COMPUTING_OPS
) -> list[tuple[str, float]]:
    """Quantized ops (of ``op_types``; all when None) sorted by the error they add, worst first.

    For each op, the noise-to-signal ratio of its output (quantized graph vs float graph,
    cumulative) minus the largest of its inputs': the error the op itself adds. Runs the
    float and the quantized graph on up to ``max_batches`` batches.
    """
    quantable = ppq_ir.quantized_ops(graph)
    layers = [op for op in quantable if op_types is None or op.type in op_types]
    power = _ErrorPower()
    hooks = {op.name: power.hook(op) for op in layers}
    with tensors.no_grad():
        for index, feed in enumerate(feeds()):
            if index >= max_batches:
                break
            power.float_pass = True
            with ppq_ir.float_graph(graph):
                executor.forward(inputs=feed, hooks=hooks)
            power.float_pass = False
            executor.forward(inputs=feed, hooks=hooks)
            power.reference.clear()
    growth = []
    for op in layers:
        inputs = [power.snr(key) for key in power.sums if key[0] == op.name and key[1] == "in"]
        growth.append((op.name, power.snr((op.name, "out", 0)) - max(inputs, default=0.0)))
    return sorted(growth, key=lambda item: item[1], reverse=True)


class _ErrorPower:
    """Noise and signal power of ops' float input and output tensors, quantized pass against float
    pass (``float_pass`` says which one the hooks are seeing)."""

    def __init__(self):
        self.reference: dict[tuple, Any] = {}
        self.sums: dict[tuple, list[float]] = {}  # key -> [noise, signal]
        self.float_pass = True

    def record(self, key: tuple, value) -> None:
        value = value.detach().float()
        if self.float_pass:
            self.reference[key] = value
        elif key in self.reference and self.reference[key].shape == value.shape:
            noise, signal = self.sums.get(key, [0.0, 0.0])
            self.sums[key] = [
                noise + float(((value - self.reference[key]) ** 2).sum()),
                signal + float((self.reference[key] ** 2).sum()),
            ]

    def snr(self, key: tuple) -> float:
        noise, signal = self.sums.get(key, (0.0, 0.0))
        return noise / signal if signal > 0 else 0.0

    def hook(self, operation):
        """A runtime hook recording ``operation``'s float inputs and first output."""

        def before(inputs, quant_inputs) -> None:
            for index, (var, value) in enumerate(zip(operation.inputs, quant_inputs)):
                if not var.is_parameter and tensors.is_float_tensor(value):
                    self.record((operation.name, "in", index), value)

        def after(outputs) -> None:
            if tensors.is_float_tensor(outputs[0]):
                self.record((operation.name, "out", 0), outputs[0])

        return ppq_ir.runtime_hook(operation, before, after)


class BiasShift:
    """What rounding the weights does to the mean of each output channel of one Conv/ConvTranspose/
    Gemm: ``E[op(x, W) - op(x, W_q)] = E[op(x, W - W_q)]`` over the batches it observes, folded
    into the bias by :meth:`apply` (Nagel et al., "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019, empirical variant).

    ``x`` is the op's input as the pass computes it: in the calibration pass (finetune_level 1)
    float activations of the graph whose weights are already quantized, so each layer is
    measured on what its own upstream weights make of the data and all layers are corrected at
    once. A convolution's shift is linear in its input, so ``submit`` only adds each batch's mean
    input to a running sum (on the second core there) and :meth:`apply` runs the op on the weight
    difference once; a Gemm (small) runs it per batch.
    """

    def __init__(self, operation, context):
        self.operation, self.context = operation, context
        self.delta = None
        self.total = None  # sum over batches of the per-channel mean difference (the general path)
        self.inputs: dict[tuple, Any] = {}  # 2-D convs: input shape -> sum over batches of the batch-mean input
        self.count = 0
        self.submit: Callable = run_now

    def observe(self, inputs, quant_inputs) -> None:
        if self.delta is None:
            self.delta = (inputs[1] - quant_inputs[1]).detach()
        self.submit(self._add, quant_inputs[0].detach())

    def _add(self, x) -> None:
        self.count += 1
        if self.operation.type != "Gemm":
            # a convolution's shift is linear in its input: a running sum of the batch means now,
            # the op (or, for a 2-D Conv with explicit pads, its tap means) once in apply()
            key, mean = tuple(x.shape[1:]), x.mean(dim=0)
            self.inputs[key] = mean if key not in self.inputs else self.inputs[key].add_(mean)
            return
        difference = ppq_ir.run_op(self.operation, [x, self.delta], self.context).double()
        mean = difference.mean(dim=list(range(difference.ndim - 1)))
        self.total = mean if self.total is None else self.total + mean

    def apply(self) -> None:
        bias = self.operation.inputs[2].value
        total = self.total
        for summed in self.inputs.values():
            if _plain_conv2d(self.operation, summed[None]):
                taps = _tap_means(self.operation, summed[None].double(), self.delta.shape)
                part = _conv_of_tap_means(self.operation, self.delta, taps)
            else:
                difference = ppq_ir.run_op(self.operation, [summed[None], self.delta], self.context).double()
                part = difference.mean(dim=[d for d in range(difference.ndim) if d != 1])
            total = part if total is None else total + part
        if total is None:
            return
        shift = (total / self.count).to(bias.device, bias.dtype)
        if shift.shape == bias.shape:
            self.operation.inputs[2].value = bias + shift


def _plain_conv2d(operation, x) -> bool:
    """A 2-D Conv with explicit pads (what :func:`_tap_means` handles)."""
    return operation.type == "Conv" and x.ndim == 4 and operation.attributes.get("auto_pad", "NOTSET") == "NOTSET"


def _tap_means(operation, x, kernel_shape):
    """For a 2-D Conv with explicit pads: the mean of its input under each kernel tap, over the
    batch and the output positions, [channels, taps]; None for other ops. The shift is linear in
    them, so the op need not run on the weight difference for every batch: the inputs are summed
    and their tap means taken once."""
    if not _plain_conv2d(operation, x):
        return None
    return tensors.tap_means(operation.attributes, x, kernel_shape)


def _conv_of_tap_means(operation, delta, means):
    """The per-output-channel shift, sum over taps and input channels of (W - W_q) x tap mean."""
    out_channels, per_group = delta.shape[:2]
    groups = int(operation.attributes.get("group", 1))
    taps = means.reshape(groups, per_group, -1)
    weights = delta.double().reshape(groups, out_channels // groups, per_group, -1)
    return tensors.grouped_weights_times_taps(weights, taps).reshape(out_channels)


def bias_layers(graph) -> list:
    """The ops whose bias correction folds in: Conv/ConvTranspose/Gemm with a constant bias."""
    return [
        operation
        for operation in ppq_ir.quantized_ops(graph)
        if operation.type in {"Conv", "ConvTranspose", "Gemm"}
        and operation.num_of_input == 3
        and operation.inputs[2].value is not None
    ]


def correct_bias(graph, executor, feeds, progress=None) -> None:
    """Bias correction in a pass of its own, after fine-tuning moved the weights (finetune_level 2
    and up; at level 1 the calibration pass measures it): each :class:`BiasShift` on the op's
    quantized input in the quantized graph. All layers are measured in one pass, then corrected."""
    shifts = [BiasShift(operation, ppq_ir.op_context(executor)) for operation in bias_layers(graph)]
    if not shifts:
        return
    hooks = {shift.operation.name: ppq_ir.runtime_hook(shift.operation, shift.observe) for shift in shifts}
    bar = progress("bias correction", None) if progress else None
    with tensors.no_grad():
        for feed in feeds():
            executor.forward(inputs=feed, hooks=hooks)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for shift in shifts:
        shift.apply()
