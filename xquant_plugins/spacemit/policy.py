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

#: parameter-free ops (both operands are activations) kept in float, by precision_level.
#: Level 1 keeps the products (gates such as SiLU's Sigmoid x Mul, attention products) in
#: float: rounding errors of both operands multiply there. Residual Add/Sub stay int8.
#: Level 2 also keeps Add/Sub in float. Level 3 keeps every op in float (the engine's rule).
FLOAT_OPS_BY_LEVEL = {
    0: frozenset(),
    1: frozenset({"Mul", "Div", "Sigmoid", "Softmax"}),
    2: frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Softmax"}),
}
