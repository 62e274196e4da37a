"""Fine-tuning after calibration: bias correction, learned step size, error ranking."""

from __future__ import annotations

import logging

import numpy as np

from .common import HOLD_BACK_EVERY, RANKING_BATCHES, clearly_lower, float_graph
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
    from ppq.quantization.optim import LearnedStepSizePass, PassiveParameterQuantizePass

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
    saved = _snapshot(graph, worst)
    apply(
        LearnedStepSizePass(
            interested_layers=worst,
            steps=steps,
            lr=LSQ_LEARNING_RATE,
            block_size=1,
            is_scale_trainable=True,
            collecting_device=plan.device,
        ),
        training,
    )
    apply(PassiveParameterQuantizePass())
    after = output_error(graph, executor, held_back)
    if clearly_lower(after, before):
        log.info(
            "fine-tuned %d layers (%s): held-back output error %.5f -> %.5f",
            len(worst),
            ", ".join(worst),
            before,
            after,
        )
    else:
        _restore(graph, saved)
        apply(PassiveParameterQuantizePass())
        log.info(
            "fine-tuning did not lower the held-back output error (%.5f -> %.5f): kept the layers as they were",
            before,
            after,
        )


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


def output_error(graph, executor, batches, references=None) -> float:
    """Noise-to-signal power of the model outputs, quantized vs float, on ``batches``: the mean over outputs.

    Each output counts alike (a face detector's score output beside its box output). An
    output of rank >= 3 whose channels (its shortest non-batch axis) fall in two magnitude
    groups, the largest gap between their RMS values above :data:`MAGNITUDE_GAP`, counts as
    two outputs: YOLOv8's [1, 22, anchors] holds 4 box coordinates in pixels and 18 class
    scores in [0, 1], and summed together the pixels drowned every score error.
    ``references``: the float outputs of each batch, when already known.
    """
    import torch

    noise: list = []
    signal: list = []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if references is None:
                with float_graph(graph):
                    reference = executor.forward(inputs=batch)
            else:
                reference = references[index]
            quantized = executor.forward(inputs=batch)
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
            power[key] = [
                noise + float(((value - reference[key]) ** 2).sum()),
                signal + float((reference[key] ** 2).sum()),
            ]

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
            with float_graph(graph):
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

    layers = [
        operation
        for operation in graph.operations.values()
        if isinstance(operation, QuantableOperation)
        and operation.type in {"Conv", "ConvTranspose", "Gemm"}
        and operation.num_of_input == 3
        and operation.inputs[2].value is not None
    ]
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
