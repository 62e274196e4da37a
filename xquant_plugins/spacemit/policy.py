"""What the SpacemiT runtime runs in int8: the op sets and limits the quantizer and the platform share."""

from __future__ import annotations

#: ops whose output shares the input's quantization (layout/shape ops)
SHARED_QUANT_OPS = frozenset(
    {
        "Reshape",
        "Flatten",
        "Transpose",
        "Slice",
        "Split",
        "Squeeze",
        "Unsqueeze",
        "Gather",
        "MaxPool",
        "GlobalMaxPool",
        "Pad",
        "Resize",
        "Identity",
        "Dropout",
    }
)

#: ops the runtime accelerates most; the post-processing tail after the last of them stays float
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: op types the SpacemiT runtime runs in int8
QUANTIZED_OPS = (
    frozenset(
        {
            "Conv",
            "ConvTranspose",
            "Gemm",
            "MatMul",
            "Relu",
            "PRelu",
            "LeakyRelu",
            "Sigmoid",
            "HardSwish",
            "HardSigmoid",
            "Gelu",
            "Clip",
            "AveragePool",
            "GlobalAveragePool",
            "MaxPool",
            "GlobalMaxPool",
            "ReduceMean",
            "Add",
            "Sub",
            "Mul",
            "Concat",
        }
    )
    | SHARED_QUANT_OPS
)

#: keep bias in float when any quantized |bias| would exceed this
BIAS_INT_LIMIT = 2**20
