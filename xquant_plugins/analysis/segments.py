"""A model run in segments, each fetching a slice of the probed tensors: only that slice is alive at once.

The report compares every probed tensor of the float and the INT8 model. Fetched in one run, all
of them are alive together: PP-OCRv4's detector at 480x640 has about 500 MB of float tensors per
sample and its QDQ model about 1 GB, and the report tripled the run's peak memory (1.2 -> 3.3 GB).
Here the probes are cut into groups of at most :data:`.limits.SEGMENT_BYTES` (estimated by ONNX
shape inference at the batch's input shapes); each model runs as one sub-model per group, which
computes what that group needs and was not computed before, and hands the tensors that later
groups need on to them. Every node runs once per batch, with the same kernels: the values are
the ones the whole model gives. A model whose probes fit in one group runs whole, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from xquant_core.engine.forms import opaque_inputs, with_outputs
from xquant_core.runtime import onnxruntime_session

log = logging.getLogger("xquant.analysis")


def tensor_bytes(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Estimated bytes of each tensor of ``model`` for ``batch`` (shape inference at its input
    shapes); tensors whose shape stays unknown are left out."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        array = batch.get(value.name)
        if array is None or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in np.shape(array):
            shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception:  # a custom op or a malformed shape: no estimate
        return {}
    sizes: dict[str, int] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(dim.HasField("dim_value") for dim in dims):
            elements = int(np.prod([dim.dim_value for dim in dims]))
            sizes[value.name] = elements * max(1, _itemsize(value.type.tensor_type.elem_type))
    return sizes


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:  # bfloat16, float8, strings: 4 is near enough for a memory estimate
        return 4


def groups_within(items: Sequence, sizes: Sequence[int], budget: int) -> list[list]:
    """``items`` in order, cut into consecutive groups whose ``sizes`` add up to at most ``budget``
    (an item larger than the budget is a group of its own)."""
    groups: list[list] = [[]]
    total = 0
    for item, size in zip(items, sizes):
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


class SegmentedModel:
    """``model`` run as consecutive sub-models, sub-model k computing ``fetches[k]``; with one
    group the whole model runs in one session, its fetches added as outputs."""

    def __init__(self, model: onnx.ModelProto, fetches: Sequence[Iterable[str]]):
        self.model = model
        self.fetches = [list(dict.fromkeys(names)) for names in fetches]
        self.segments = _segments(model, self.fetches) if len(self.fetches) > 1 else None
        self._sessions: list = []
        self._whole: Any = None

    def run(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Per group, its fetched tensors (graph inputs included) for ``batch``. A segment that
        onnxruntime cannot build or run (a sequence carried between segments, say) makes the
        model run whole from then on: the same values, all alive at once."""
        inputs = {value.name for value in self.model.graph.input}
        values = {name: array for name, array in batch.items() if name in inputs}
        done = 0
        if self.segments is not None:
            try:
                for part in self._run_segments(dict(values)):
                    yield part
                    done += 1
                return
            except Exception as exc:  # the whole model gives the same values
                log.debug(
                    "running %s in segments failed (%s: %s): whole", self.model.graph.name, type(exc).__name__, exc
                )
                self.segments = None
        whole = self._run_whole(values)
        for names in self.fetches[done:]:
            yield {name: whole[name] for name in names if name in whole}

    def _run_segments(self, values: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        assert self.segments is not None
        for index, segment in enumerate(self.segments):
            if index == len(self._sessions):
                model = segment.model_for(values) if segment.nodes else None
                self._sessions.append(model and onnxruntime_session(model, low_memory=True))
            session = self._sessions[index]
            if session is not None:
                names = [value.name for value in session.get_outputs()]
                values.update(zip(names, session.run(names, {name: values[name] for name in segment.inputs})))
            yield {name: values[name] for name in self.fetches[index] if name in values}
            values = {name: array for name, array in values.items() if name in segment.needed_later}

    def _run_whole(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._whole is None:
            fetched = [name for names in self.fetches for name in names]
            self._whole = onnxruntime_session(with_outputs(self.model, fetched))
        session = self._whole
        wanted = {value.name for value in session.get_inputs()}
        names = [value.name for value in session.get_outputs()]
        result = dict(zip(names, session.run(names, {k: v for k, v in values.items() if k in wanted})))
        result.update(values)
        return result


class _Segment:
    """One sub-model: its nodes, what it reads from earlier segments or the graph inputs, what
    it hands on, and what the later segments still need once it has run."""

    def __init__(
        self,
        model: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        reads: Iterable[str],
        outputs: list[str],
        needed_later: set[str],
    ):
        """``reads``: what the nodes read (:func:`opaque_inputs`: inputs and outer-scope names of their bodies)."""
        self.model, self.nodes, self.outputs, self.needed_later = model, nodes, outputs, needed_later
        constants = {init.name for init in model.graph.initializer}
        produced = {name for node in nodes for name in node.output}
        reads = dict.fromkeys(reads)
        self.initializers = [name for name in reads if name in constants]
        self.inputs = [name for name in reads if name not in constants and name not in produced]

    def model_for(self, values: dict[str, np.ndarray]) -> bytes:
        """The sub-model, its inputs typed like the arrays at hand."""
        graph = self.model.graph
        wanted = set(self.initializers)
        graph_inputs = [
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), None)
            for name in self.inputs
        ]
        sub = onnx.helper.make_graph(
            self.nodes,
            graph.name or "segment",
            graph_inputs,
            [onnx.ValueInfoProto(name=name) for name in self.outputs],
            [init for init in graph.initializer if init.name in wanted],
        )
        model = onnx.helper.make_model(sub, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model.SerializeToString()


def _segments(model: onnx.ModelProto, fetches: list[list[str]]) -> list[_Segment]:
    """Each node goes to the first group that needs it (its fetches' ancestors not yet placed)."""
    nodes = list(model.graph.node)
    reads = [opaque_inputs(node) for node in nodes]  # inputs, and the outer names If/Loop bodies read
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    placed: list[int | None] = [None] * len(nodes)
    for group, names in enumerate(fetches):
        stack = [producer[name] for name in names if name in producer]
        while stack:
            index = stack.pop()
            if placed[index] is not None:
                continue
            placed[index] = group
            stack += [producer[name] for name in reads[index] if name in producer]
    members = [[i for i in range(len(nodes)) if placed[i] == group] for group in range(len(fetches))]
    group_reads = [[name for i in indices for name in reads[i]] for indices in members]
    read_after: list[set[str]] = [set() for _ in fetches]  # read or fetched by the groups after each
    later: set[str] = set()
    for group in reversed(range(len(fetches))):
        read_after[group] = set(later)
        later |= set(group_reads[group]) | set(fetches[group])
    segments = []
    for group, indices in enumerate(members):
        group_nodes = [nodes[i] for i in indices]
        produced = [name for node in group_nodes for name in node.output if name]
        outputs = [name for name in produced if name in read_after[group] or name in fetches[group]]
        segments.append(_Segment(model, group_nodes, group_reads[group], outputs, read_after[group]))
    return segments
