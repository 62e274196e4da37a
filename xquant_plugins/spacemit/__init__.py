"""The SpacemiT K1/K3 platform: quantization policy and QDQ export.

This module stays light (no torch/PPQ import): the op sets are in :mod:`.policy`, the
quantizer in :mod:`.quantizer` and the exporter in :mod:`.exporter`, imported on first use.
"""

from __future__ import annotations

from xquant_core import hookimpl

from .policy import BIAS_INT_LIMIT, COMPUTE_OPS, FLOAT_OPS_BY_LEVEL, SHARED_QUANT_OPS


class SpacemitPlatform:
    """int8 asymmetric per-tensor activations, symmetric per-channel weights, int32 bias."""

    description = "SpacemiT K1/K3 (onnxruntime + SpaceMIT EP): int8 QDQ"

    def create_quantizer(self, graph):
        from .quantizer import SpacemitQuantizer

        return SpacemitQuantizer(graph, COMPUTE_OPS)

    def float_ops(self, graph) -> set:
        """Ops kept float whatever the precision level: normalizations exported as arithmetic
        and the post-processing tail (dispatched to float: quantized with float configs, a
        Clip there failed PPQ's clip-value pass, which wants its input quantized)."""
        from .quantizer import decomposed_layernorms, float_tail

        return decomposed_layernorms(graph) | float_tail(graph, COMPUTE_OPS)[0]

    def share_quantization(self, graph) -> None:
        from .quantizer import fuse_elementwise_activation, share_shape_op_quantization

        fuse_elementwise_activation(graph, {"Add", "Sub"}, {"Relu", "Clip"})
        share_shape_op_quantization(graph, SHARED_QUANT_OPS)

    def float_op_types(self, level: int) -> frozenset:
        return FLOAT_OPS_BY_LEVEL.get(level, frozenset())

    def after_calibration(self, graph) -> None:
        from .quantizer import align_concat_inputs_to_output

        align_concat_inputs_to_output(graph)

    def finalize(self, graph) -> None:
        from .quantizer import keep_overflowing_bias_float

        keep_overflowing_bias_float(graph, BIAS_INT_LIMIT)

    def export(self, graph):
        from .exporter import export_qdq

        return export_qdq(graph)

    def quantize_dynamic(self, model):
        """Global ``precision_level: 3``: MatMul/Gemm weights int8, activations at run time."""
        from .dynamic import quantize_dynamic

        return quantize_dynamic(model)


@hookimpl
def xquant_register_platforms(register):
    register("spacemit", SpacemitPlatform())
