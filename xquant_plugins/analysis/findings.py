"""What the measurement says: rows worst first, per-op error, where the error grows most."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .graph import Probe, QuantizedOp
from .limits import MAX_SUGGESTIONS, SECONDARY_SHARE
from .measure import Measurement, TensorStats


@dataclass(frozen=True)
class Row:
    op: QuantizedOp
    role: str  # "input" / "output"
    probe: Probe
    stats: TensorStats


def rows_worst_first(measurement: Measurement) -> list[Row]:
    """One row per measured input/output of each quantized op, worst (highest SNR) first."""
    rows = []
    for op in measurement.ops:
        for role, probes in (("input", op.inputs), ("output", op.outputs)):
            for probe in probes:
                stats = measurement.stats.get(probe)
                if stats is not None:
                    rows.append(Row(op, role, probe, stats))
    rows.sort(key=lambda row: (-_finite(row.stats.snr), row.stats.cosine, row.op.index, row.role != "output"))
    return rows


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e300


def _op_error(op: QuantizedOp, stats: dict[Probe, TensorStats], probes: Sequence[Probe]) -> float:
    values = [_finite(stats[p].snr) for p in probes if p in stats]
    return max(values) if values else 0.0


def op_snr(op: QuantizedOp, stats: dict[Probe, TensorStats]) -> float:
    """The op's SNR in the chart: its worst output (its worst input when no output was measured)."""
    if any(p in stats for p in op.outputs):
        return _op_error(op, stats, op.outputs)
    return _op_error(op, stats, op.inputs)


def _op_flagged(op: QuantizedOp, stats: dict[Probe, TensorStats]) -> bool:
    return any(stats[p].flagged for p in op.inputs + op.outputs if p in stats)


@dataclass(frozen=True)
class Suggestion:
    """A subgraph to keep in float: where the error grows the most, and why."""

    op: QuantizedOp
    added_snr: float
    cause: str  # "output": quantizing the op's output; "input": the op on its quantized inputs
    op_labels: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    clipped: Probe | None = None  # an output (cause "output") or input whose INT8 range clips the float range

    def custom_setting(self) -> dict[str, Any]:
        return {"input_names": list(self.input_names), "output_names": list(self.output_names), "precision_level": 3}


def _clips(stats: TensorStats, factor: float = 1.5) -> bool:
    """True when the float range exceeds the INT8 range by ``factor`` on either side."""
    return stats.f_max > factor * max(stats.q_max, 0) + 1e-12 or stats.f_min < factor * min(stats.q_min, 0) - 1e-12


def suggest(measurement: Measurement, limit: int = MAX_SUGGESTIONS) -> list[Suggestion]:
    """Subgraphs to keep in float, the largest error growth first.

    Errors are cumulative, so the op to fix is where the error grows, not where it is
    largest: each op is scored by its output SNR minus its worst input SNR. The growth is
    split in two with the op's output before its own Q/DQ: growth before it comes from the
    op computing on its quantized inputs (an input whose rounding step is set by a rare
    outlier hides in its own SNR, since the outlier dominates that tensor's power, and shows
    here), so the subgraph takes in the inputs' producers; growth after it comes from
    quantizing the output (e.g. a range that clips), so the subgraph takes in the output's
    consumers. Either way the tensor in between stays float. Flagged ops come first (a
    further one only when it adds at least :data:`SECONDARY_SHARE` of the first one's
    growth); with nothing flagged, the one op with the largest growth is suggested.
    """
    stats, graph = measurement.stats, measurement.graph
    scored = []
    for op in measurement.ops:
        if not any(p in stats for p in op.outputs):
            continue
        before = _op_error(op, stats, op.inputs)
        after = _op_error(op, stats, op.outputs)
        raw = [p for p in op.raw_outputs if p in stats]
        computed = _op_error(op, stats, raw) if raw else after
        cause = "output" if after - computed > computed - before else "input"
        scored.append((after - before, cause, op))
    scored.sort(key=lambda item: (-item[0], item[2].index))
    flagged = [item for item in scored if item[0] > 0 and _op_flagged(item[2], stats)]
    suggestions: list[Suggestion] = []
    taken: set[int] = set()
    for added, cause, op in flagged or scored[:1]:
        if len(suggestions) >= limit or (suggestions and added < SECONDARY_SHARE * suggestions[0].added_snr):
            break
        node = graph.nodes[op.index]
        seeds = {op.index}
        if cause == "input":
            seeds.update(
                i
                for name in node.input
                if name and not graph.is_constant(name)
                for i in [graph.origin_node(name)]
                if i is not None
            )
        else:
            seeds.update(i for name in node.output if name for i in graph.consumer_nodes(name))
        members, inputs, outputs = graph.subgraph(seeds)
        if taken & set(members) or not outputs:
            continue
        taken.update(members)
        suspects = op.outputs if cause == "output" else op.inputs
        clipped = next((p for p in suspects if p in stats and _clips(stats[p])), None)
        labels = tuple(f"{graph.nodes[i].name or f'node_{i}'}[{graph.nodes[i].op_type}]" for i in members)
        suggestions.append(Suggestion(op, added, cause, labels, tuple(inputs), tuple(outputs), clipped))
    return suggestions
