"""The QDQ model indexed: its quantized ops and, for each, the tensors to compare with the float model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from .limits import QDQ_TYPES


@dataclass(frozen=True)
class Probe:
    """One tensor to compare: its name in the QDQ model and in the float model."""

    quant: str
    var: str


@dataclass(frozen=True)
class QuantizedOp:
    """A quantized op of the QDQ model with the probes of its activation inputs/outputs."""

    index: int  # position among the QDQ model's nodes (graph order)
    name: str
    op_type: str
    inputs: tuple[Probe, ...]
    outputs: tuple[Probe, ...]
    raw_outputs: tuple[Probe, ...]  # outputs before their own Q/DQ (only those that have one)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.op_type}]"


def folded_activations(quant_model: onnx.ModelProto, float_model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor -> the float model's Relu/Clip that reads it where the exported model has the tensor
    but not the activation's output: the exporter removed the op because the int8 range of the
    Q after it clips as it did (PPQ's ``remove_activation_ops``)."""
    graph = quant_model.graph
    names = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    names |= {name for node in graph.node for name in node.output}
    return {
        node.input[0]: node
        for node in float_model.graph.node
        if node.op_type in {"Relu", "Clip"} and node.output[0] not in names and node.input[0] in names
    }


class _QdqGraph:
    """Producer/consumer index of the QDQ model and the tensor-name mapping to the float model."""

    def __init__(self, quant_model: onnx.ModelProto, float_model: onnx.ModelProto):
        graph = quant_model.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.constants = {init.name for init in graph.initializer}
        self.constants |= {out for node in self.nodes if node.op_type == "Constant" for out in node.output}
        self.graph_inputs = {value.name for value in graph.input} - self.constants
        self.graph_outputs = {value.name for value in graph.output}
        fgraph = float_model.graph
        float_constants = {init.name for init in fgraph.initializer}
        float_constants |= {out for node in fgraph.node if node.op_type == "Constant" for out in node.output}
        self.float_constants = float_constants
        self.float_names = {value.name for value in fgraph.input} | {
            out for node in fgraph.node for out in node.output if out
        }
        self.float_names -= float_constants
        #: QDQ tensor -> the float model's Relu/Clip on it that the exporter folded into its Q
        self.folded = {name: node.output[0] for name, node in folded_activations(quant_model, float_model).items()}

    def _node(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def backward_chain(self, name: str) -> list[str]:
        """``name`` and the tensors behind it through DQ / Q nodes: DQ output -> Q output -> original."""
        chain = [name]
        node = self._node(name)
        while node is not None and node.op_type in QDQ_TYPES and len(chain) < 8:
            chain.append(node.input[0])
            node = self._node(node.input[0])
        return chain

    def forward_dq(self, name: str) -> str | None:
        """The DQ output after ``name``'s Q -> DQ pair, if the tensor has one."""
        for q_index in self.consumers.get(name, []):
            q_node = self.nodes[q_index]
            if q_node.op_type != "QuantizeLinear":
                continue
            for dq_index in self.consumers.get(q_node.output[0], []):
                if self.nodes[dq_index].op_type == "DequantizeLinear":
                    return self.nodes[dq_index].output[0]
        return None

    def is_constant(self, name: str) -> bool:
        return any(item in self.constants or item in self.float_constants for item in self.backward_chain(name))

    def is_dq_output(self, name: str) -> bool:
        node = self._node(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def float_name(self, name: str) -> str | None:
        """The float model's name of a QDQ-model tensor (None when it has none)."""
        candidates = self.backward_chain(name)
        if len(candidates) > 1 and candidates[-1] in self.folded:  # the Q clamps as the activation did
            return self.folded[candidates[-1]]
        forward = self.forward_dq(name)
        if forward is not None:
            candidates.append(forward)
        return next((item for item in candidates if item in self.float_names), None)

    def consumer_nodes(self, name: str) -> list[int]:
        """The non-Q/DQ nodes that read ``name``, directly or through its Q -> DQ chain."""
        out, frontier, seen = [], [name], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for index in self.consumers.get(tensor, []):
                node = self.nodes[index]
                if node.op_type in QDQ_TYPES:
                    frontier.append(node.output[0])
                elif index not in out:
                    out.append(index)
        return out

    def has_qdq(self, name: str) -> bool:
        return self.forward_dq(name) is not None or self.is_dq_output(name)

    def subgraph(self, seeds: Iterable[int]) -> tuple[list[int], list[str], list[str]]:
        """Close a node set over float links (a tensor without Q/DQ, e.g. Conv -> Clip fused) and
        return (nodes, float-model input names, float-model output names) bounding it."""
        members = set(seeds)
        for _ in range(2):
            grown = set(members)
            for index in members:
                node = self.nodes[index]
                for name in node.output:
                    if name and not self.has_qdq(name):
                        grown.update(self.consumer_nodes(name))
                for name in node.input:
                    if name and not self.is_constant(name) and not self.has_qdq(name):
                        origin = self.origin_node(name)
                        if origin is not None:
                            grown.add(origin)
            if grown == members:
                break
            members = grown
        inputs, outputs = [], []
        for index in sorted(members):
            node = self.nodes[index]
            for name in node.input:
                if not name or self.is_constant(name) or self.origin_node(name) in members:
                    continue
                var = self.float_name(name)
                if var is not None and var not in inputs:
                    inputs.append(var)
            for name in node.output:
                if not name:
                    continue
                leaves = (
                    name in self.graph_outputs
                    or self.forward_dq(name) in self.graph_outputs
                    or any(c not in members for c in self.consumer_nodes(name))
                )
                var = self.float_name(name)
                if leaves and var is not None and var not in outputs:
                    outputs.append(var)
        return sorted(members), inputs, outputs

    def origin_node(self, name: str) -> int | None:
        """The non-Q/DQ node that produces ``name`` (through its Q/DQ chain)."""
        chain = self.backward_chain(name)
        index = self.producer.get(chain[-1])
        if index is None or self.nodes[index].op_type in QDQ_TYPES:
            return None
        return index


def quantized_ops(
    quant_model: onnx.ModelProto, float_model: onnx.ModelProto, index: _QdqGraph | None = None
) -> list[QuantizedOp]:
    """The quantized ops of ``quant_model`` in graph order, with their probes."""
    index = index or _QdqGraph(quant_model, float_model)
    ops = []
    for position, node in enumerate(index.nodes):
        if node.op_type in QDQ_TYPES or not any(index.is_dq_output(name) for name in node.input if name):
            continue
        inputs, outputs, raw_outputs = [], [], []
        for name in node.input:
            if not name or index.is_constant(name):
                continue
            var = index.float_name(name)
            if var is not None:
                inputs.append(Probe(name, var))
        for name in node.output:
            if not name:
                continue
            var = index.float_name(name)
            if var is None:
                continue
            after = index.forward_dq(name)
            outputs.append(Probe(after, index.float_name(after) or var) if after else Probe(name, var))
            if after is not None:
                raw_outputs.append(Probe(name, var))
        if inputs or outputs:
            ops.append(
                QuantizedOp(
                    position,
                    node.name or f"node_{position}",
                    node.op_type,
                    tuple(inputs),
                    tuple(outputs),
                    tuple(raw_outputs),
                )
            )
    return ops
