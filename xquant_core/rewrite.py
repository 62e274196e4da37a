"""Exact float rewrites after onnxsim that leave fewer tensors to quantize: decomposed hard
activations fused, constant scales and shifts folded into the Conv next to them.

Each int8 tensor adds its rounding error, and what an exporter writes as several elementwise
ops is, for the chip, several quantized tensors. The rewrites here compute the same function in
float (up to float32 rounding of the folded weights) and touch only tensors that nothing else
reads: no model output, no tensor a subgraph reads, none the caller names in ``keep`` (the
config's custom_setting boundaries and truncation points). Pure ONNX.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .engine.forms import free_names, graph_constants, subgraphs

log = logging.getLogger("xquant.model")


def _names_read(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and the outer tensors its subgraphs name."""
    return [
        *node.input,
        *(name for attribute in node.attribute for sub in subgraphs(attribute) for name in free_names(sub)),
    ]


class _Index:
    """Who produces and who reads each tensor of a graph, and its constants."""

    def __init__(self, graph: onnx.GraphProto, keep: Iterable[str] = ()):
        self.constants = graph_constants(graph)
        self.producer = {name: node for node in graph.node for name in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in _names_read(node):
                self.readers.setdefault(name, []).append(node)
        self.pinned = {value.name for value in graph.output} | set(keep)

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        users = self.readers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.pinned else None

    def other_input(self, node: onnx.NodeProto, name: str) -> str | None:
        rest = [value for value in node.input if value != name]
        return rest[0] if len(node.input) == 2 and len(rest) == 1 else None

    def is_scalar(self, name: str, value: float) -> bool:
        array = self.constants.get(name)
        return (
            array is not None
            and array.size == 1
            and array.dtype.kind == "f"
            and math.isclose(float(array.reshape(())), value, rel_tol=1e-6)
        )


def _drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the constants in ``candidates`` that no node, subgraph or output reads any more."""
    used = {name for node in graph.node for name in _names_read(node)} | {value.name for value in graph.output}
    unused = candidates - used
    for field, values in (
        ("node", [n for n in graph.node if n.op_type != "Constant" or n.output[0] not in unused]),
        ("initializer", [i for i in graph.initializer if i.name not in unused]),
        ("input", [v for v in graph.input if v.name not in unused]),
    ):
        del getattr(graph, field)[:]
        getattr(graph, field).extend(values)


def fuse_hard_activations(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """HardSigmoid and HardSwish written out as ``clip(x + 3, 0, 6) / 6`` and ``x * clip(x + 3, 0, 6) / 6``
    (paddle2onnx, older exporters) become ``HardSigmoid(x)`` and ``Mul(x, HardSigmoid(x))``.

    The same function, with one tensor to quantize instead of three or four: on PP-OCRv4's
    recogniser (28 HardSwish) the int8 rounding of ``x + 3``, ``x * clip`` and the quotient cost
    more than any other group of tensors. The model is changed in place and returned.
    """
    graph = model.graph
    index = _Index(graph, keep)
    replaced: dict[int, list] = {}  # id of the chain's last node -> the nodes taking its place
    removed: set[int] = set()
    unused: set[str] = set()  # constants only the fused chains read
    for clip in [node for node in graph.node if node.op_type == "Clip" and len(node.input) == 3]:
        found = _hard_chain(index, clip)
        if found is None:
            continue
        chain, fused = found
        removed.update(id(node) for node in chain)
        replaced[id(chain[-1])] = fused
        unused.update(name for node in chain for name in node.input if name in index.constants)
    if not removed:
        return model
    nodes = [new for node in graph.node for new in (replaced.get(id(node), []) if id(node) in removed else [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, unused)
    log.debug("fused %d decomposed HardSigmoid/HardSwish", len(replaced))
    return model


def _sixth(index: _Index, node: onnx.NodeProto, name: str) -> bool:
    """Whether ``node`` computes ``name / 6`` (or ``name * 1/6``)."""
    rest = index.other_input(node, name)
    return rest is not None and (
        (node.op_type == "Div" and node.input[0] == name and index.is_scalar(rest, 6.0))
        or (node.op_type == "Mul" and index.is_scalar(rest, 1 / 6))
    )


def _hard_chain(index: _Index, clip: onnx.NodeProto) -> tuple[list, list] | None:
    """The written-out HardSigmoid/HardSwish around ``clip(x + 3, 0, 6)``: (its nodes, the nodes
    replacing them), or None when ``clip`` is not the middle of one."""
    add = index.producer.get(clip.input[0])
    if (
        not (index.is_scalar(clip.input[1], 0.0) and index.is_scalar(clip.input[2], 6.0))
        or add is None
        or add.op_type != "Add"
        or index.sole_reader(add.output[0]) is not clip
    ):
        return None
    x = next((value for value in add.input if index.is_scalar(index.other_input(add, value) or "", 3.0)), None)
    user = index.sole_reader(clip.output[0])
    if x is None or user is None:
        return None
    hard_sigmoid = helper.make_node(
        "HardSigmoid",
        [x],
        [f"{clip.output[0]}_hardsigmoid"],
        name=f"{clip.name or clip.output[0]}_hardsigmoid",
        alpha=1 / 6,
        beta=0.5,
    )
    if _sixth(index, user, clip.output[0]):  # HardSigmoid
        hard_sigmoid.output[0] = user.output[0]
        return [add, clip, user], [hard_sigmoid]
    if (
        user.op_type == "Mul"
        and index.other_input(user, clip.output[0]) == x
        and (last := index.sole_reader(user.output[0])) is not None
        and _sixth(index, last, user.output[0])
    ):  # HardSwish
        swish = helper.make_node(
            "Mul", [x, hard_sigmoid.output[0]], [last.output[0]], name=f"{last.name or last.output[0]}_hardswish"
        )
        return [add, clip, user, last], [hard_sigmoid, swish]
    return None


# --------------------------------------------------------------------------- affine folding
_SCALE_OPS, _SHIFT_OPS = ("Mul", "Div"), ("Add", "Sub")


def fold_affine_into_conv(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """Fold per-channel constant scales and shifts into the Conv they feed or follow.

    - ``Conv -> Add/Sub/Mul/Div c``: into the Conv's weights and bias;
    - ``Mul/Div c -> Conv``: into the weights (exact with padding too: the padded zeros stay zero);
    - ``Add/Sub c -> Conv`` without padding: into the bias.

    Not ``Mul s -> Add b -> padded Conv`` (PP-LCNetV3's learnable affine after each activation),
    though ``Add b/s -> Conv(W * s)`` is the same function: the int8 tensor ``x + b/s`` then
    spans ``b/s`` of its smallest ``s``, and on PP-OCRv4's recogniser the fold bought nothing
    (75 of 91 strings as FP32 without it, 74 with).

    ``c`` is a scalar or one value per channel (``[C]`` never: it broadcasts on the last axis;
    ``[C,1,1]``, ``[1,C,1,1]``); the Conv's weights and bias must be constants only it reads.
    On PP-OCRv4's recogniser: 261 -> 209 QuantizeLinear in the exported model. In place; returns the model.
    """
    graph = model.graph
    constants = set(graph_constants(graph))
    folded: Counter[str] = Counter()
    while True:  # one pass folds each Conv once; the next pass sees the graph it left
        index = _Index(graph, keep)
        touched: set[int] = set()
        gone: set[int] = set()  # the elementwise nodes a fold absorbed
        for node in list(graph.node):
            if id(node) not in touched and node.op_type in (*_SCALE_OPS, *_SHIFT_OPS) and len(node.input) == 2:
                rule = _fold_one(graph, index, node, touched, gone)
                if rule:
                    folded[rule] += 1
        if not gone:
            break
        nodes = [node for node in graph.node if id(node) not in gone]
        del graph.node[:]
        graph.node.extend(nodes)
    if folded:
        _drop_unused(graph, constants)
        log.debug("folded constant scales/shifts into Conv: %s", dict(folded))
    return model


def _fold_one(
    graph: onnx.GraphProto, index: _Index, node: onnx.NodeProto, touched: set[int], gone: set[int]
) -> str | None:
    """Apply the first rule that fits ``node`` (an elementwise op with one constant input): the
    nodes it changed go into ``touched``, those it absorbed into ``gone``; returns the rule's name."""
    x, constant = _split_constant(index, node)
    if x is None:
        return None
    conv = index.producer.get(x)
    if conv is not None and conv.op_type == "Conv" and index.sole_reader(x) is node and id(conv) not in touched:
        params = _conv_params(index, conv)
        vector = None if params is None else _per_channel(constant, params[0].shape[0], params[0].ndim)
        if params is not None and vector is not None and (node.op_type != "Div" or np.all(vector != 0)):
            weight, bias = params
            if node.op_type in _SHIFT_OPS:
                bias = bias + vector if node.op_type == "Add" else bias - vector
            else:
                factor = vector if node.op_type == "Mul" else 1 / vector
                weight, bias = weight * factor.reshape(-1, *[1] * (weight.ndim - 1)), bias * factor
            _set_conv_params(graph, index, conv, weight, bias)
            conv.output[0] = node.output[0]
            touched.update((id(conv), id(node)))
            gone.add(id(node))
            return "conv then " + node.op_type
    user = index.sole_reader(node.output[0])
    if user is None or id(user) in touched:
        return None
    if user.op_type != "Conv" or user.input[0] != node.output[0] or (params := _conv_params(index, user)) is None:
        return None
    weight, bias = params
    vector = _per_channel(constant, _in_channels(user, weight), weight.ndim)
    if vector is None or (node.op_type == "Div" and not np.all(vector != 0)):
        return None
    if node.op_type in _SCALE_OPS:
        weight = weight * _by_input_channel(user, weight, vector if node.op_type == "Mul" else 1 / vector)
    elif _has_padding(user):
        return None
    else:
        shift = vector if node.op_type == "Add" else -vector
        bias = bias + (weight * _by_input_channel(user, weight, shift)).reshape(weight.shape[0], -1).sum(1)
    _set_conv_params(graph, index, user, weight, bias)
    user.input[0] = x
    touched.update((id(user), id(node)))
    gone.add(id(node))
    return node.op_type + " into conv"


def _split_constant(index: _Index, node: onnx.NodeProto) -> tuple[str | None, np.ndarray]:
    """``(x, c)`` for ``x op c`` (``c op x`` too for Add and Mul) with ``c`` a float constant."""
    a, b = node.input
    if b in index.constants and a not in index.constants:
        x, constant = a, index.constants[b]
    elif a in index.constants and b not in index.constants and node.op_type in ("Add", "Mul"):
        x, constant = b, index.constants[a]
    else:
        return None, np.empty(0)
    return (x, constant) if constant.dtype.kind == "f" else (None, constant)


def _per_channel(constant: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """The constant as one float64 value per channel of a rank-``rank`` NC... tensor, or None when it
    broadcasts any other way (or would change the tensor's shape)."""
    if constant.size == 1 and constant.ndim <= rank:
        return np.full(channels, float(constant.reshape(())))
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if constant.ndim > rank or shape[1] != channels or any(dim != 1 for i, dim in enumerate(shape) if i != 1):
        return None
    return constant.astype(np.float64).reshape(channels)


def _conv_params(index: _Index, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """Float64 weight and bias of a Conv whose weight (and bias) are constants only it reads."""
    if len(conv.input) < 2 or conv.input[1] not in index.constants or index.sole_reader(conv.input[1]) is not conv:
        return None
    weight = index.constants[conv.input[1]]
    if weight.dtype != np.float32 or weight.ndim < 3:
        return None
    if len(conv.input) < 3 or not conv.input[2]:
        return weight.astype(np.float64), np.zeros(weight.shape[0])
    if conv.input[2] not in index.constants or index.sole_reader(conv.input[2]) is not conv:
        return None
    return weight.astype(np.float64), index.constants[conv.input[2]].astype(np.float64)


def _set_conv_params(
    graph: onnx.GraphProto, index: _Index, conv: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray
) -> None:
    """Store the new weight and bias in the Conv's constants (a new bias initializer if it had none)."""
    _set_constant(graph, conv.input[1], weight.astype(np.float32))
    if len(conv.input) > 2 and conv.input[2]:
        _set_constant(graph, conv.input[2], bias.astype(np.float32))
        return
    name = _fresh_name(index, f"{conv.input[1]}_bias")
    graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
    index.constants[name] = bias
    if len(conv.input) == 2:
        conv.input.append(name)
    else:
        conv.input[2] = name


def _set_constant(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(array, name))
            return
    for node in graph.node:  # weights stored as Constant nodes (paddle2onnx)
        if node.op_type == "Constant" and node.output[0] == name:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array, name)))
            return
    raise KeyError(name)


def _fresh_name(index: _Index, base: str) -> str:
    name, number = base, 1
    while name in index.constants or name in index.producer or name in index.readers:
        name, number = f"{base}_{number}", number + 1
    return name


def _in_channels(conv: onnx.NodeProto, weight: np.ndarray) -> int:
    return weight.shape[1] * _group(conv)


def _group(conv: onnx.NodeProto) -> int:
    return next((attribute.i for attribute in conv.attribute if attribute.name == "group"), 1)


def _by_input_channel(conv: onnx.NodeProto, weight: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``vector`` (one value per input channel) laid out like the weight ``[Cout, Cin/group, k...]``."""
    out_channels, per_group = weight.shape[:2]
    outputs_per_group = out_channels // _group(conv)
    channel = (np.arange(out_channels)[:, None] // outputs_per_group) * per_group + np.arange(per_group)[None, :]
    return vector[channel].reshape(out_channels, per_group, *[1] * (weight.ndim - 2))


def _has_padding(conv: onnx.NodeProto) -> bool:
    attributes = {attribute.name: attribute for attribute in conv.attribute}
    auto_pad = attributes["auto_pad"].s if "auto_pad" in attributes else b"NOTSET"
    return auto_pad not in (b"NOTSET", b"VALID") or ("pads" in attributes and any(attributes["pads"].ints))
