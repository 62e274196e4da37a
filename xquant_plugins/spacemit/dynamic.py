"""SpacemiT's ``precision_level: 3`` globally: dynamic quantization, no calibration.

MatMul and Gemm weights are stored as int8 (symmetric, per output channel); their
activations are quantized at run time per batch (``DynamicQuantizeLinear`` +
``MatMulInteger``), which stock onnxruntime executes. Everything else stays float.
This suits transformer/speech models whose activation ranges vary too much from input
to input for static calibration. The vendor tool (from 1.2) gives global level 3 the
same meaning; inside ``custom_setting``, level 3 keeps a subgraph in float instead.
"""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from xquant_core import __version__

log = logging.getLogger("xquant.dynamic")

DYNAMIC_OPS = ["MatMul", "Gemm"]


def quantize_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` with dynamically quantized MatMul/Gemm weights."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    weighted = [node.name or node.output[0] for node in model.graph.node if node.op_type in DYNAMIC_OPS]
    if not weighted:
        log.warning("precision_level 3 (dynamic quantization) found no MatMul/Gemm: the model stays float")
    with tempfile.TemporaryDirectory(prefix="xquant-dynamic-") as folder:
        source, target = os.path.join(folder, "float.onnx"), os.path.join(folder, "dynamic.onnx")
        onnx.save(model, source)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice on the root logger
        try:
            ort_quantize_dynamic(
                source, target, op_types_to_quantize=DYNAMIC_OPS, per_channel=True, weight_type=QuantType.QInt8
            )
        finally:
            root.setLevel(level)
        quantized = onnx.load(target)
    quantized.producer_name = "xquant"
    quantized.producer_version = __version__
    onnx.helper.set_model_props(quantized, {"xquant_version": __version__, "xquant_mode": "dynamic"})
    return quantized
