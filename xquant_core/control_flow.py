"""Quantize inside If branches: each branch is lifted out as a model of its own.

PPQ parses one flat graph: in it an ``If`` is an opaque float node (run by onnxruntime,
:mod:`xquant_core.engine.forms`). The ops inside its branches are quantized here, before
the outer graph: for every ``If`` of a graph,

1. the float graph runs on the calibration samples with onnxruntime, exposing the
   condition and the outer tensors the branches read;
2. each branch becomes a standalone model (inputs: the outer tensors it reads, with the
   ranks and dtypes seen; outer constants copied in; outputs: the branch outputs) and gets
   the samples that took it;
3. that model goes through the same steps (its own Ifs first), then the engine, and the
   quantized graph goes back into the ``If`` (names it added get a prefix, so they cannot
   clash with the outer graph or the other branch).

A branch that no calibration sample takes (Silero VAD's 8 kHz branch, calibrated at 16 kHz)
stays float, and the run says so. Loop and Scan bodies stay float (their inputs change from
iteration to iteration; they are reported too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from .engine.forms import free_names, rename_free, with_outputs

log = logging.getLogger("xquant.control_flow")

#: ops whose presence makes a branch worth quantizing on its own
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

Feeds = Sequence[dict[str, np.ndarray]]
Quantize = Callable[[onnx.ModelProto, Feeds], onnx.ModelProto]


@dataclass
class BranchReport:
    """What happened to the subgraphs of a model, for the summary."""

    quantized: list[str] = field(default_factory=list)
    float_no_samples: list[str] = field(default_factory=list)
    float_other: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = []
        if self.quantized:
            lines.append(f"control flow: {len(self.quantized)} If branch(es) quantized: {', '.join(self.quantized)}")
        if self.float_no_samples:
            lines.append(
                f"control flow: no calibration sample takes {', '.join(self.float_no_samples)}: "
                "left in float (calibrate with samples that take it to quantize it)"
            )
        if self.float_other:
            lines.append(
                f"control flow: {', '.join(self.float_other)} left in float (xquant quantizes If "
                "branches; Loop/Scan bodies run in float)"
            )
        return lines


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attribute in node.attribute
    )


def quantize_branches(
    model: onnx.ModelProto, feeds: Feeds, quantize: Quantize, report: BranchReport | None = None, path: str = ""
) -> tuple[onnx.ModelProto, BranchReport]:
    """``model`` with the branches of its Ifs quantized (recursively); the outer graph stays as it is."""
    report = report if report is not None else BranchReport()
    if not has_control_flow(model):
        return model, report
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = _outer_constants(graph)
    ifs = [node for node in graph.node if node.op_type == "If"]
    for node in graph.node:
        if node.op_type != "If" and any(attribute.type == onnx.AttributeProto.GRAPH for attribute in node.attribute):
            report.float_other.append(f"{path}{node.name or node.op_type} ({node.op_type})")
    wanted = list(
        dict.fromkeys(
            [node.input[0] for node in ifs]
            + [
                name
                for node in ifs
                for attribute in node.attribute
                if attribute.type == onnx.AttributeProto.GRAPH
                for name in free_names(attribute.g)
                if name not in constants
            ]
        )
    )
    captured = _capture(model, feeds, wanted)
    for node in ifs:
        for attribute in node.attribute:
            if attribute.type != onnx.AttributeProto.GRAPH:
                continue
            where = f"{path}{node.name or 'If'}/{attribute.name}"
            taken = [
                values
                for values in captured
                if bool(np.asarray(values[node.input[0]]).reshape(-1)[0]) == (attribute.name == "then_branch")
            ]
            if not taken:
                if _worth_quantizing(attribute.g):
                    report.float_no_samples.append(where)
                continue
            branch, branch_feeds = _lift(attribute.g, model, constants, taken)
            branch, _ = quantize_branches(branch, branch_feeds, quantize, report, f"{where}/")
            if _worth_quantizing(branch.graph, own_level=True):
                branch = quantize(branch, branch_feeds)
                report.quantized.append(where)
            attribute.g.CopyFrom(_as_subgraph(branch, attribute.g, prefix=f"{where}/"))
    return result, report


def _worth_quantizing(graph: onnx.GraphProto, own_level: bool = False) -> bool:
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            return True
        if not own_level and any(
            _worth_quantizing(attribute.g)
            for attribute in node.attribute
            if attribute.type == onnx.AttributeProto.GRAPH
        ):
            return True
    return False


def _outer_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attribute.t)
                    tensor.name = node.output[0]
                    constants[node.output[0]] = tensor
    return constants


def _capture(model: onnx.ModelProto, feeds: Feeds, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Run the float model on every feed; return the named tensors (inputs included) per feed."""
    from .runtime import onnxruntime_session

    inputs = {value.name for value in model.graph.input}
    session = onnxruntime_session(with_outputs(model, names), threads=1)  # what calibration sees, on every machine
    fetched = [name for name in names if name not in inputs]
    captured = []
    for feed in feeds:
        values = dict(zip(fetched, session.run(fetched, dict(feed)))) if fetched else {}
        values.update({name: feed[name] for name in names if name in inputs})
        captured.append(values)
    return captured


def _lift(
    branch: onnx.GraphProto,
    outer: onnx.ModelProto,
    constants: dict[str, onnx.TensorProto],
    taken: list[dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """A branch as a model: its outer reads become inputs (symbolic dims) or copied constants."""
    free = free_names(branch)
    inputs = [name for name in free if name not in constants]
    graph = onnx.GraphProto()
    graph.CopyFrom(branch)
    graph.name = f"{branch.name or 'branch'}_lifted"
    del graph.input[:]
    sample = taken[0]
    for name in inputs:
        array = np.asarray(sample[name])
        graph.input.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), [f"{name}_d{axis}" for axis in range(array.ndim)]
            )
        )
    graph.initializer.extend(constants[name] for name in free if name in constants)
    model = helper.make_model(graph, opset_imports=list(outer.opset_import))
    model.ir_version = outer.ir_version
    feeds = [{name: np.asarray(values[name]) for name in inputs} for values in taken]
    return model, feeds


def _as_subgraph(model: onnx.ModelProto, original: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """The quantized branch model as a subgraph again: no inputs (they are outer reads), new names prefixed."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.name = original.name
    outer_reads = {value.name for value in graph.input}
    del graph.input[:]
    kept = {init.name for init in original.initializer} | {name for node in original.node for name in node.output}
    kept |= {value.name for value in original.output}
    renamed = {}
    for name in [init.name for init in graph.initializer] + [name for node in graph.node for name in node.output]:
        if name and name not in kept and name not in outer_reads:
            renamed[name] = f"{prefix}{name}"
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    node_names = {node.name for node in original.node}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
        if node.name and node.name not in node_names:
            node.name = f"{prefix}{node.name}"
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                rename_free(attribute.g, renamed)
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    return graph


def count_quantized_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(ops that read a DequantizeLinear output, ops of COMPUTE_OPS), over all (sub)graphs."""
    reading, compute = 0, 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal reading, compute
        dequantized = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.output}
        for node in graph.node:
            if node.op_type in COMPUTE_OPS:
                compute += 1
                reading += any(name in dequantized for name in node.input)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(model.graph)
    return reading, compute
