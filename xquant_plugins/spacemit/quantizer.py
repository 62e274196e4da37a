"""SpacemiT quantization policy on PPQ's IR.

- activations: int8 [-128, 127], asymmetric (zero point), per-tensor, round half to even;
- Conv/ConvTranspose weights: int8 symmetric per-channel (axis 0; ConvTranspose axis 1),
  min/max, range [-127, 127];
- Gemm/MatMul constant weights: symmetric per-channel over the output features (a batched,
  rank-3+ MatMul weight per tensor); a
  non-constant MatMul operand is an activation (asymmetric per-tensor);
- bias: int32 with scale = input scale x weight scale, float when it would overflow;
- other constant operands: int8 symmetric per-tensor;
- model outputs are not quantized: the op that produces one reads int8 and writes
  float; so is the post-processing tail after the last compute ops (:func:`float_tail`).
  Rounding logits to int8 makes close classes tie (on the sample MobileNetV2,
  2 of 20 held-out photos flipped on exact int8 ties; with float outputs none did, and
  the logits SNR went from 0.0134 to 0.0130);
- normalization parameters stay float (BatchNorm is merged into Conv by PPQ's
  formatter; LayerNorm/InstanceNorm are not in the quantized op set).
"""

from __future__ import annotations

from xquant_core.engine.backend.compat import import_ppq

import_ppq()  # before any ppq import: makes PPQ importable on current protobuf/onnx

import torch
from ppq.core import (
    OperationQuantizationConfig,
    QuantizationPolicy,
    QuantizationProperty,
    QuantizationStates,
    QuantizationVisibility,
    RoundingPolicy,
    TargetPlatform,
)
from ppq.IR import BaseGraph, Operation, QuantableOperation
from ppq.quantization.quantizer.base import BaseQuantizer

from .policy import QUANTIZED_OPS

ACTIVATION_POLICY = QuantizationPolicy(
    QuantizationProperty.ASYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR
)
WEIGHT_PER_CHANNEL = QuantizationPolicy(
    QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_CHANNEL
)
WEIGHT_PER_TENSOR = QuantizationPolicy(
    QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR
)


def _weight_axis(operation: Operation) -> int | None:
    """Output-channel axis of an op's constant second operand, or None if per-tensor."""
    weight = operation.inputs[1].value if operation.num_of_input > 1 else None
    if weight is None or weight.ndim < 2:
        return None
    if operation.type == "Conv":
        return 0
    if operation.type == "ConvTranspose":
        return 1
    if operation.type == "Gemm":
        return 0 if operation.attributes.get("transB", 0) else 1
    if operation.type == "MatMul" and weight.ndim == 2:
        return 1
    # a batched MatMul weight (rank 3+) per tensor: onnxruntime's int8 MatMul kernels take one
    # scale per output column of a 2-D B only (MatMulIntegerToFloat refused the per-channel one)
    return None


def float_tail(graph: BaseGraph, compute_ops) -> tuple[set[str], set[str]]:
    """The post-processing tail, kept float: (its ops, the tensors that flow into it).

    The tail is every op from which no compute op (Conv, Gemm, MatMul...) can be reached
    going down the graph: decode arithmetic, Sigmoid/Softmax of the scores, the Concat and
    Reshape that assemble the outputs. Its inputs stay float too, so the compute ops that
    feed it read int8 and write float. On the chip the tail is a few elementwise ops on the
    outputs; in int8 it cost YOLOv8n pixels on every box (the decode on a 1.25 px grid) and
    its class scores beside box coordinates in one Concat.
    """
    tail: set[str] = set()
    for operation in reversed(graph.topological_sort()):
        if operation.type in compute_ops:
            continue
        if all(consumer.name in tail for var in operation.outputs for consumer in var.dest_ops):
            tail.add(operation.name)
    bound = set(graph.outputs)
    for var in graph.variables.values():
        if not var.is_parameter and var.dest_ops and all(op.name in tail for op in var.dest_ops):
            bound.add(var.name)
    return tail, bound


def decomposed_layernorms(graph: BaseGraph) -> set[str]:
    """The ops of LayerNorms exported as arithmetic (opset < 17, Paddle's and torch's exporters).

    ``ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div``, then the scale
    ``Mul`` and shift ``Add`` with constants: normalization runs in float on the chip, only its
    input is quantized. In int8, the squared deviations (0 to hundreds, most near 0) lost every
    small variance: on PP-OCRv4's recogniser the SNR after the first such block was 0.54.
    """
    found: set[str] = set()

    def only_reader(var, op_type):
        readers = [op for op in var.dest_ops if op.type == op_type]
        return readers[0] if len(readers) == 1 else None

    for mean in graph.operations.values():
        if mean.type != "ReduceMean" or not mean.outputs:
            continue
        source = mean.inputs[0]
        sub = next((op for op in mean.outputs[0].dest_ops if op.type == "Sub" and op.inputs[0] is source), None)
        if sub is None:
            continue
        deviation = sub.outputs[0]
        square = only_reader(deviation, "Pow")
        divide = only_reader(deviation, "Div")
        if square is None or divide is None:
            continue
        variance = only_reader(square.outputs[0], "ReduceMean")
        add_eps = variance and only_reader(variance.outputs[0], "Add")
        root = add_eps and only_reader(add_eps.outputs[0], "Sqrt")
        if root is None or divide.inputs[1] is not root.outputs[0]:
            continue
        chain = [mean, sub, square, variance, add_eps, root, divide]
        tail = divide
        for op_type in ("Mul", "Add"):  # the affine part, with constant scale and shift
            nxt = only_reader(tail.outputs[0], op_type)
            if nxt is None or len(tail.outputs[0].dest_ops) != 1 or not any(v.is_parameter for v in nxt.inputs):
                break
            chain.append(nxt)
            tail = nxt
        found.update(op.name for op in chain)
    return found


class SpacemitQuantizer(BaseQuantizer):
    def __init__(self, graph: BaseGraph, compute_ops=frozenset()) -> None:
        super().__init__(graph=graph, verbose=False)
        self._float_bound = float_tail(graph, compute_ops)[1]

    @property
    def target_platform(self) -> TargetPlatform:
        return TargetPlatform.INT8

    @property
    def quant_operation_types(self) -> set:
        return set(QUANTIZED_OPS)

    @property
    def activation_fusion_types(self) -> set:
        return {"Relu", "Clip"}

    def init_quantize_config(self, operation: Operation) -> OperationQuantizationConfig:
        config = self.create_default_quant_config(
            op=operation,
            num_of_bits=8,
            quant_min=-128,
            quant_max=127,
            observer_algorithm="minmax",
            policy=ACTIVATION_POLICY,
            rounding=RoundingPolicy.ROUND_HALF_EVEN,
        )
        has_bias = operation.type in {"Conv", "ConvTranspose", "Gemm"} and operation.num_of_input > 2
        for index, (var, tqc) in enumerate(zip(operation.inputs, config.input_quantization_config)):
            if not var.is_parameter or tqc.state != QuantizationStates.INITIAL:
                continue
            if has_bias and index == 2:
                weight_axis = _weight_axis(operation)
                tqc.policy = WEIGHT_PER_CHANNEL if weight_axis is not None else WEIGHT_PER_TENSOR
                tqc.channel_axis = 0
                tqc.num_of_bits = 32
                tqc._quant_min, tqc._quant_max = -(2**31), 2**31 - 1
                tqc.state = QuantizationStates.PASSIVE_INIT
                continue
            axis = _weight_axis(operation) if index == 1 else None
            tqc.policy = WEIGHT_PER_CHANNEL if axis is not None else WEIGHT_PER_TENSOR
            if axis is not None:
                tqc.channel_axis = axis
            tqc._quant_min, tqc._quant_max = -127, 127
            tqc.observer_algorithm = "minmax"
        for var, tqc in zip(operation.outputs, config.output_quantization_config):
            if var.name in self._float_bound:  # read only by the float tail (dispatched float)
                tqc.state = QuantizationStates.FP32
        return config


def share_shape_op_quantization(graph: BaseGraph, op_types) -> None:
    """Make the outputs of shape/layout ops reuse their data input's quantization."""
    for operation in graph.topological_sort():
        if not isinstance(operation, QuantableOperation) or operation.type not in op_types:
            continue
        source = operation.config.input_quantization_config[0]
        if source.state == QuantizationStates.FP32:
            continue
        for output_config in operation.config.output_quantization_config:
            if output_config.state == QuantizationStates.INITIAL:
                output_config.dominated_by = source
                # write Q/DQ after the op too (DQ -> Reshape -> Q -> DQ -> consumer), so the
                # consumers see quantized inputs and the runtime can fuse them
                output_config.visibility = QuantizationVisibility.FORCE_EXPORT


def fuse_elementwise_activation(graph: BaseGraph, op_types, activation_types) -> None:
    """Quantize ``Add -> Relu`` (and Sub, Clip) once, after the activation, as PPQ's fusion does
    for ``Conv -> Relu``: the runtime fuses them, and quantizing the sum too rounded it on a
    grid that spends its negative half on values the Relu drops (BlazeFace's residual sums,
    range [-11, 7], then [0, 7] after the Relu: two roundings, the first 2.5x coarser)."""
    for operation in graph.operations.values():
        if not isinstance(operation, QuantableOperation) or operation.type not in op_types:
            continue
        readers = graph.get_downstream_operations(operation)
        if len(readers) != 1 or readers[0].type not in activation_types:
            continue
        activation = readers[0]
        if not isinstance(activation, QuantableOperation) or len(graph.get_upstream_operations(activation)) != 1:
            continue
        if operation.outputs[0] in graph.outputs.values():
            continue
        source = operation.config.output_quantization_config[0]
        target = activation.config.output_quantization_config[0]
        if QuantizationStates.FP32 in (source.state, target.state):
            continue
        source.dominated_by = target
        activation.config.input_quantization_config[0].dominated_by = target


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
                # a constant input (BlazeFace's zero channel padding) takes the activation range
                # too: with the weights' [-127, 127], its zero point -128 could not be written and
                # the zeros came back as one step (0.027) on every padded channel
                config._quant_min, config._quant_max = master.quant_min, master.quant_max
        # the producers write their outputs with the concat's parameters: no requantization
        for producer in graph.get_upstream_operations(operation):
            if isinstance(producer, QuantableOperation):
                for config, var in producer.config_with_variable:
                    if operation in var.dest_ops:
                        config.dominated_by = master


def keep_overflowing_bias_float(graph: BaseGraph, limit: int) -> None:
    """Leave a bias in float when its int32 value would exceed ``limit`` in magnitude."""
    for operation in graph.operations.values():
        if not isinstance(operation, QuantableOperation) or operation.num_of_input < 3:
            continue
        if operation.type not in {"Conv", "ConvTranspose", "Gemm"}:
            continue
        bias_config = operation.config.input_quantization_config[2]
        bias = operation.inputs[2].value
        if bias_config.state != QuantizationStates.PASSIVE or bias is None:
            continue
        quantized = torch.round(bias.float() / bias_config.scale.float().to(bias.device))
        if quantized.abs().max().item() > limit:
            bias_config.state = QuantizationStates.FP32
