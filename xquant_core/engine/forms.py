"""The float model in the forms PPQ 0.6.6 runs right, and the exported model back in the model's own.

PPQ 0.6.6 knows ONNX up to opset 13 (its Resize refuses any other opset), reads some
attributes wrongly at every opset, and cannot run ops it does not know or nodes that
hold subgraphs. The model reaches the engine at opset >= 13 (:func:`xquant_core.model.load_model`
converts older ones); :func:`for_ppq` rewrites it into equivalent forms and labels it opset 13,
and :func:`restore` turns the exported QDQ model back into the model's opset. Rewritten:

- ``auto_pad`` (Conv, ConvTranspose, pools) -> explicit ``pads`` from the static input shape
  (PPQ reads a Conv's pads before it works them out, so SAME convs came out too small) and
  ConvTranspose ``output_shape`` -> ``pads`` (PPQ fails on it);
- opset 18: the ``axes`` input of ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare
  -> the opset-13 attribute (put back as an input by :func:`restore`); Split's
  ``num_outputs`` -> an explicit ``split`` input; Pad's ``axes`` -> pads for every axis;
- attributes added after opset 13 that hold their default value are dropped;
- every other node PPQ cannot run as it is (an op PPQ does not know, another domain, a node
  with a subgraph such as If/Loop/Scan, a later-opset feature with no opset-13 form)
  becomes an opaque :data:`OPAQUE` node: PPQ runs it through onnxruntime in float
  (:mod:`.backend.ops`) and :func:`restore` puts the original node back. The outer-scope
  tensors its subgraphs read become explicit inputs, so PPQ feeds them.

Pure ONNX: nothing here imports PPQ or torch.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

PPQ_OPSET = 13
OPAQUE = "XQuantOnnxNode"
_NODE_ATTR, _OPSETS_ATTR = "xquant_node", "xquant_opsets"

#: reduce ops whose ``axes`` moved from an attribute to an input at opset 18
REDUCE_AXES_INPUT_AT_18 = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
_PADDED = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


def default_opset(model: onnx.ModelProto) -> int:
    return max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=1)


def at_least_opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to opset 13 by onnx's version converter when it is older (same model otherwise).

    Opset 13 moved Squeeze/Unsqueeze/Split/ReduceSum arguments to inputs and changed
    Softmax's axis semantics; converting first lets the exported model say opset 13 truthfully.
    """
    if default_opset(model) >= PPQ_OPSET:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, PPQ_OPSET)


class _NoForm(Exception):
    """The node has no opset-13 form PPQ runs: it becomes opaque."""


@dataclass
class _Context:
    opset: int
    shapes: dict[str, tuple]
    constants: dict[str, np.ndarray]
    initializers: list = field(default_factory=list)
    counter: int = 0

    def shape(self, name: str, rank_only: bool = False) -> tuple:
        shape = self.shapes.get(name)
        if shape is None or (not rank_only and any(not isinstance(dim, int) for dim in shape)):
            raise _NoForm(f"the shape of {name} is not known")
        return shape

    def constant(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise _NoForm(f"{name} is not a constant")
        return self.constants[name]

    def add_constant(self, hint: str, value: np.ndarray) -> str:
        self.counter += 1
        name = f"{hint}_xquant_{self.counter}"
        self.initializers.append(numpy_helper.from_array(value, name))
        self.constants[name] = value
        return name


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _drop_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    kept = [attribute for attribute in node.attribute if attribute.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


# --------------------------------------------------------------------------- rewrites
def _explicit_pads(node: onnx.NodeProto, ctx: _Context) -> None:
    """auto_pad / ConvTranspose output_shape -> pads, with the formulas of the ONNX spec."""
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    output_shape = _attr(node, "output_shape") if node.op_type == "ConvTranspose" else None
    if auto_pad == "NOTSET" and output_shape is None:
        return
    spatial = ctx.shape(node.input[0])[2:]
    rank = len(spatial)
    if node.op_type in {"Conv", "ConvTranspose"}:
        kernel = _attr(node, "kernel_shape") or list(ctx.constant(node.input[1]).shape[2:])
    else:
        kernel = _attr(node, "kernel_shape")
    strides = _attr(node, "strides") or [1] * rank
    dilations = _attr(node, "dilations") or [1] * rank
    output_padding = _attr(node, "output_padding") or [0] * rank
    if output_shape is not None:
        output_shape = list(output_shape)[-rank:]
    heads, tails = [], []
    for axis in range(rank):
        size, stride, extent = spatial[axis], strides[axis], (kernel[axis] - 1) * dilations[axis] + 1
        if auto_pad == "VALID" and output_shape is None:
            total = 0
        elif node.op_type == "ConvTranspose":
            out = output_shape[axis] if output_shape is not None else size * stride
            total = stride * (size - 1) + output_padding[axis] + extent - out
        else:
            total = max(0, (math.ceil(size / stride) - 1) * stride + extent - size)
        if total < 0:
            raise _NoForm("negative padding")
        head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        heads.append(head)
        tails.append(total - head)
    _drop_attr(node, "auto_pad")
    _drop_attr(node, "output_shape")
    _set_attr(node, "pads", heads + tails)


def _reduce_axes_attribute(node: onnx.NodeProto, ctx: _Context) -> None:
    """Opset-18 reduce: the constant ``axes`` input becomes the opset-13 attribute."""
    if len(node.input) < 2 or not node.input[1]:
        del node.input[1:]
        return
    if _attr(node, "noop_with_empty_axes", 0):
        raise _NoForm("noop_with_empty_axes")
    _set_attr(node, "axes", [int(axis) for axis in ctx.constant(node.input[1]).reshape(-1)])
    del node.input[1:]


def _split_sizes(node: onnx.NodeProto, ctx: _Context) -> None:
    """Opset-18 Split with ``num_outputs``: explicit sizes (the last chunk may be smaller)."""
    count = _attr(node, "num_outputs")
    if count is None:
        return
    shape = ctx.shape(node.input[0], rank_only=True)
    axis = _attr(node, "axis", 0)
    size = shape[axis]
    if not isinstance(size, int):
        raise _NoForm("split axis size unknown")
    chunk = math.ceil(size / count)
    sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
    _drop_attr(node, "num_outputs")
    del node.input[1:]
    node.input.append(ctx.add_constant(f"{node.name or node.output[0]}_split", np.array(sizes, dtype=np.int64)))


def _pad_all_axes(node: onnx.NodeProto, ctx: _Context) -> None:
    """Opset-18 Pad with ``axes``: pads for every axis (zero where none was given)."""
    if _attr(node, "mode", "constant") not in {"constant", "reflect", "edge"}:
        raise _NoForm("pad mode")
    if len(node.input) < 4 or not node.input[3]:
        del node.input[3:]
        return
    rank = len(ctx.shape(node.input[0], rank_only=True))
    axes = [int(axis) % rank for axis in ctx.constant(node.input[3]).reshape(-1)]
    given = ctx.constant(node.input[1]).reshape(-1)
    pads = np.zeros(2 * rank, dtype=np.int64)
    for index, axis in enumerate(axes):
        pads[axis], pads[rank + axis] = given[index], given[len(axes) + index]
    node.input[1] = ctx.add_constant(f"{node.name or node.output[0]}_pads", pads)
    del node.input[3:]
    while node.input and not node.input[-1]:
        del node.input[-1]


def _resize_supported(node: onnx.NodeProto, ctx: _Context) -> None:
    """Resize modes :func:`.backend.ops.resize` implements; the rest run in onnxruntime."""
    mode = _attr(node, "mode", "nearest")
    transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize" or mode not in {"nearest", "linear", "cubic"}:
        raise _NoForm("Resize mode")
    if mode == "cubic" and (
        transform not in {"half_pixel", "align_corners"}
        or _attr(node, "exclude_outside", 0)
        or abs(_attr(node, "cubic_coeff_a", -0.75) + 0.75) > 1e-6
        or len(ctx.shape(node.input[0], rank_only=True)) != 4
    ):
        raise _NoForm("cubic Resize")


def _constant_value(node: onnx.NodeProto, ctx: _Context) -> None:
    """ConstantOfShape without ``value``: ONNX's default (a float32 0) written out, which PPQ's
    exporter reads (BlazeFace with skip_onnxsim failed on it: ``KeyError: 'value'``)."""
    if _attr(node, "value") is None:
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float32))))


_REWRITES: dict[str, tuple[int, Callable[[onnx.NodeProto, _Context], None]]] = {
    # op type -> (from opset, rewrite)
    **{op: (1, _explicit_pads) for op in _PADDED},
    **{op: (18, _reduce_axes_attribute) for op in REDUCE_AXES_INPUT_AT_18},
    "Split": (18, _split_sizes),
    "Pad": (18, _pad_all_axes),
    "Resize": (1, _resize_supported),
    "ConstantOfShape": (1, _constant_value),
}


def _drop_later_defaults(node: onnx.NodeProto, opset: int) -> None:
    """Attributes and inputs a schema gained after opset 13: dropped at their default, else opaque."""
    try:
        now = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise _NoForm("unknown op") from None
    if now.since_version <= PPQ_OPSET:
        return
    try:
        then = onnx.defs.get_schema(node.op_type, PPQ_OPSET, "")
    except onnx.defs.SchemaError:
        return  # an op newer than opset 13 (LayerNormalization, Gelu...): PPQ knows it or it is opaque
    for attribute in list(node.attribute):
        if attribute.name in then.attributes:
            continue
        default = now.attributes[attribute.name].default_value if attribute.name in now.attributes else None
        if (
            default is None
            or not default.type
            or helper.get_attribute_value(default) != helper.get_attribute_value(attribute)
        ):
            raise _NoForm(f"attribute {attribute.name}")
        _drop_attr(node, attribute.name)
    limit = then.max_input
    while len(node.input) > limit and not node.input[-1]:
        del node.input[-1]
    if len(node.input) > limit:
        raise _NoForm("inputs added after opset 13")


# --------------------------------------------------------------------------- subgraphs
def free_names(graph: onnx.GraphProto) -> list[str]:
    """Outer-scope tensors a (sub)graph reads, in first-use order."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    defined |= {init.values.name for init in graph.sparse_initializer}
    free: dict[str, None] = {}
    for node in graph.node:
        used = list(node.input)
        for attribute in node.attribute:
            for sub in subgraphs(attribute):
                used += free_names(sub)
        for name in used:
            if name and name not in defined:
                free[name] = None
        defined.update(node.output)
    return list(free)


def subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(subgraphs(attribute) for attribute in node.attribute)


def rename_free(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Rename outer-scope references inside ``graph`` (and its subgraphs) in place."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    active = {old: new for old, new in renamed.items() if old not in defined}
    for node in graph.node:
        node.input[:] = [active.get(name, name) for name in node.input]
        for attribute in node.attribute:
            for sub in subgraphs(attribute):
                rename_free(sub, active)
        for name in node.output:
            active.pop(name, None)
    for value in graph.output:
        if value.name in active:
            value.name = active[value.name]


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (graph inputs and outputs already there are left out)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {value.name for value in copy.graph.output} | {value.name for value in copy.graph.input}
    for name in dict.fromkeys(names):
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def opaque_inputs(node: onnx.NodeProto) -> list[str]:
    """The opaque node's inputs: the node's own (distinct, non-empty), then what its subgraphs read."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for sub in subgraphs(attribute):
            names += free_names(sub)
    return list(dict.fromkeys(names))


def _opaque(node: onnx.NodeProto, opsets: str) -> onnx.NodeProto:
    # base64: PPQ's parser decodes string attributes as UTF-8
    return helper.make_node(
        OPAQUE,
        opaque_inputs(node),
        list(node.output),
        name=node.name or None,
        **{_NODE_ATTR: base64.b64encode(node.SerializeToString()).decode(), _OPSETS_ATTR: opsets},
    )


def opaque_original(attributes: dict) -> tuple[onnx.NodeProto, list[onnx.OperatorSetIdProto]]:
    """The original node and the opsets it runs under, from an opaque node's attributes."""
    node = onnx.NodeProto()
    node.ParseFromString(base64.b64decode(attributes[_NODE_ATTR]))
    opsets = attributes[_OPSETS_ATTR]
    opsets = opsets.decode() if isinstance(opsets, bytes) else opsets
    return node, [helper.make_opsetid(domain, version) for domain, version in json.loads(opsets)]


# --------------------------------------------------------------------------- both directions
def for_ppq(model: onnx.ModelProto, runnable: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in forms PPQ runs right, labelled opset 13.

    ``runnable``: the op types PPQ can execute (its forward table).
    """
    runnable = set(runnable)
    model = at_least_opset_13(model)
    opset = default_opset(model)
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    ctx = _Context(opset, _static_shapes(converted), graph_constants(graph))
    opsets = json.dumps([(entry.domain, entry.version) for entry in model.opset_import])
    nodes = []
    for node in graph.node:
        original = onnx.NodeProto()
        original.CopyFrom(node)
        try:
            if node.domain not in ("", "ai.onnx") or node.op_type not in runnable or has_subgraph(node):
                raise _NoForm("not runnable by PPQ")
            since, rewrite = _REWRITES.get(node.op_type, (None, None))
            if rewrite is not None and since is not None and opset >= since:
                rewrite(node, ctx)
            _drop_later_defaults(node, opset)
            nodes.append(node)
        except _NoForm:
            nodes.append(_opaque(original, opsets))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(ctx.initializers)
    # outputs no op makes (a weight, an input passed through): PPQ fails on them; restore() adds them back
    unmade = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    if any(value.name in unmade for value in graph.output):
        kept = [value for value in graph.output if value.name not in unmade]
        del graph.output[:]
        graph.output.extend(kept)
    _relabel(converted, PPQ_OPSET)
    return converted


def restore(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """The exported ``model`` back in the forms of the float model ``reference``.

    Its opset (at least 13), the original opaque nodes, opset-18 reduce ``axes`` inputs, and
    the reference's graph inputs and outputs as declared, in its order (PPQ's export does not
    keep the order, so ``session.run(None, ...)`` unpacked by position got the wrong tensors).
    """
    opset = max(default_opset(reference), PPQ_OPSET)
    nodes, initializers = [], []
    for node in model.graph.node:
        if node.op_type == OPAQUE:
            node = _restore_opaque(node)
        elif node.op_type in REDUCE_AXES_INPUT_AT_18 and opset >= 18 and _attr(node, "axes") is not None:
            name = f"{node.name or node.output[0]}_axes"
            initializers.append(numpy_helper.from_array(np.array(_attr(node, "axes"), dtype=np.int64), name))
            _drop_attr(node, "axes")
            node.input.append(name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    _relabel(model, opset)
    _same_interface(model, reference)
    if any(has_subgraph(node) for node in model.graph.node):
        # shapes PPQ traced on the calibration data would make onnxruntime infer shapes in
        # If branches the data never takes (Silero VAD's fails to load then)
        del model.graph.value_info[:]
    return model


def _same_interface(model: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """The reference's graph inputs and outputs as declared, in its order, repeats included. PPQ's
    export drops an input nothing reads, an output that is an initializer, an Identity of another
    tensor or listed twice: those come back (the initializer copied, an Identity node), so the
    model is called exactly as the float one."""
    graph = model.graph
    available = {name for node in graph.node for name in node.output}
    available |= {value.name for value in graph.input} | {init.name for init in graph.initializer}
    available |= {value.name for value in reference.graph.input}  # all come back as inputs, below
    weights = {init.name: init for init in reference.graph.initializer}
    producer = {name: node for node in reference.graph.node for name in node.output}
    restored: set[str] = set()
    for value in reference.graph.output:
        source = value.name
        while source not in available and source in producer and producer[source].op_type == "Identity":
            source = producer[source].input[0]
        if source in weights and source not in restored:  # the float weight, whatever the export made of it
            _rename_initializer(graph, source, available)
            graph.initializer.append(weights[source])
            available.add(source)
            restored.add(source)
        if source in available and source != value.name:
            graph.node.append(helper.make_node("Identity", [source], [value.name], name=f"{value.name}_identity"))
            available.add(value.name)
    current = {value.name for value in graph.input}
    # weights an old exporter also lists as inputs stay inputs only where the export kept them so
    inputs = [value for value in reference.graph.input if value.name not in weights or value.name in current]
    outputs = [value for value in reference.graph.output if value.name in available]
    names = {value.name for value in inputs}
    inputs += [value for value in graph.input if value.name not in names]  # none expected; never dropped
    for values, declared in ((graph.input, inputs), (graph.output, outputs)):  # outputs: the reference's only
        del values[:]
        values.extend(declared)


def _rename_initializer(graph: onnx.GraphProto, name: str, taken: set[str]) -> None:
    """Give the initializer ``name`` (if any: a weight the export quantized) a fresh name, in the
    nodes that read it too."""
    if not any(init.name == name for init in graph.initializer):
        return
    fresh = next(f"{name}_q{index}" for index in range(len(taken) + 1) if f"{name}_q{index}" not in taken)
    for init in graph.initializer:
        if init.name == name:
            init.name = fresh
    for node in graph.node:
        node.input[:] = [fresh if entry == name else entry for entry in node.input]
    taken.add(fresh)


def _restore_opaque(node: onnx.NodeProto) -> onnx.NodeProto:
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    original, _ = opaque_original(attributes)
    # the exporter may have renamed inputs (a DequantizeLinear in between): follow it
    renamed = {old: new for old, new in zip(opaque_inputs(original), node.input) if old != new}
    original.input[:] = [renamed.get(name, name) for name in original.input]
    for attribute in original.attribute:
        for sub in subgraphs(attribute):
            rename_free(sub, renamed)
    original.output[:] = list(node.output)
    return original


def _relabel(model: onnx.ModelProto, opset: int) -> None:
    others = [entry for entry in model.opset_import if entry.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset), *others])


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    return constants


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here, never a requirement
        inferred = model
    shapes = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes
