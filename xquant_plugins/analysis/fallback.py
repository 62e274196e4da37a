"""Float-fallback candidates for the report's "Next step", each measured end to end.

A per-tensor error says where the error is, not what keeping an op in float would buy: the
error is cumulative, and the tensor where it is largest mostly carries what earlier ops
added. So the report proposes a few subgraphs and measures each one: the quantized graph is
exported again with the subgraph in float (``custom_setting`` with ``precision_level: 3`` and
``float_after_calibration: true``, the same calibration: see
:class:`xquant_core.engine.FloatTrial`), run with onnxruntime on the report's batches and
compared with the float model's outputs. The proposals:

- the subgraphs where the per-tensor error grows most (:func:`xquant_plugins.analysis.suggest`);
- the stem: the model's inputs up to the first 1/8 and 1/4 of its Conv/MatMul/Gemm ops. Early
  layers see the raw input's range and, in compact backbones, their int8 rounding shifts the
  per-channel means that every later layer inherits (PP-OCRv4's recogniser).

Pure ONNX and onnxruntime; the trial object does the PPQ side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from xquant_core.control_flow import COMPUTE_OPS
from xquant_core.runtime import outputs_on
from xquant_core.snr import PowerSums

log = logging.getLogger("xquant.analysis")

#: the stem candidates end after these fractions of the model's compute ops
STEM_FRACTIONS = (1 / 8, 1 / 4)


class Trial(Protocol):
    """What the engine offers to measure a subgraph in float (:class:`xquant_core.engine.FloatTrial`)."""

    def ops_between(self, input_names: Iterable[str], output_names: Iterable[str]) -> set[str]: ...

    def exported_with_float(self, input_names: Iterable[str], output_names: Iterable[str]) -> onnx.ModelProto: ...


@dataclass(frozen=True)
class Proposal:
    """A subgraph to try in float and why it is proposed."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Candidate:
    """A proposal measured: the output error with its subgraph in float."""

    proposal: Proposal
    ops: int  #: ops in float
    compute_ops: int  #: of them Conv/MatMul/Gemm
    error: float  #: mean output SNR with the subgraph in float
    output_errors: dict[str, float]
    batches: int  #: how many batches it was measured on
    op_names: frozenset[str] = frozenset()  #: the ops kept in float

    def custom_setting(self) -> dict[str, Any]:
        return {
            "input_names": list(self.proposal.input_names),
            "output_names": list(self.proposal.output_names),
            "precision_level": 3,
            "float_after_calibration": True,
        }


def stem_proposals(float_model: onnx.ModelProto) -> list[Proposal]:
    """From the model's inputs to the input of the compute op that ends each :data:`STEM_FRACTIONS`."""
    graph = float_model.graph
    constants = {init.name for init in graph.initializer}
    inputs = tuple(value.name for value in graph.input if value.name not in constants)
    produced = {name for node in graph.node for name in node.output}
    compute = [node for node in graph.node if node.op_type in COMPUTE_OPS]
    proposals, seen = [], set()
    for fraction in STEM_FRACTIONS:
        count = math.ceil(fraction * len(compute))
        if count >= len(compute) or count < 1:
            continue
        site = compute[count].input[0]  # what the next compute op reads: the stem's output
        if site in produced and site not in seen:
            seen.add(site)
            proposals.append(
                Proposal(inputs, (site,), f"the stem: the first {count} of {len(compute)} Conv/MatMul/Gemm ops")
            )
    return proposals


def model_outputs(model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs ``{name: array}`` on each batch (onnxruntime, exact int8 arithmetic);
    with a second core, half of the batches run on it."""
    names = [value.name for value in model.graph.output]
    return [dict(zip(names, values)) for values in outputs_on(model, batches, names, halves=True)]


def output_errors(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], reference: Sequence[dict[str, np.ndarray]]
) -> dict[str, float]:
    """SNR ``sum((q - f)^2) / sum(f^2)`` of each output of ``model`` over the batches."""
    return errors_between(model_outputs(model, batches), reference)


def errors_between(
    outputs: Sequence[dict[str, np.ndarray]], reference: Sequence[dict[str, np.ndarray]]
) -> dict[str, float]:
    """SNR of each output over the batches, from outputs already run (``{name: array}`` per batch)."""
    names = list(reference[0])
    sums = {name: PowerSums() for name in names}
    for got, expected in zip(outputs, reference):
        for name in names:
            sums[name].add(got[name], expected[name])
    return {name: sums[name].snr for name in names}


def measure_candidates(
    float_model: onnx.ModelProto,
    proposals: Sequence[Proposal],
    trial: Trial,
    batches: Sequence[dict[str, np.ndarray]],
    reference: Sequence[dict[str, np.ndarray]] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[Candidate]:
    """Each proposal measured with its subgraph in float, the lowest output error first. A
    proposal the engine cannot keep float (no op between its boundaries) is left out."""
    reference = reference if reference is not None else model_outputs(float_model, batches)
    compute = {node.name for node in float_model.graph.node if node.op_type in COMPUTE_OPS}
    measured, seen = [], set()
    for proposal in proposals:
        try:
            ops = trial.ops_between(proposal.input_names, proposal.output_names)
            if not ops or frozenset(ops) in seen:
                continue
            seen.add(frozenset(ops))
            errors = output_errors(
                trial.exported_with_float(proposal.input_names, proposal.output_names), batches, reference
            )
        except Exception as exc:  # advice: a candidate that cannot be measured is not offered
            log.debug(
                "float-fallback candidate %s -> %s not measured: %s", proposal.input_names, proposal.output_names, exc
            )
            continue
        finally:
            if progress is not None:
                progress()
        measured.append(
            Candidate(
                proposal,
                len(ops),
                len(ops & compute),
                float(np.mean(list(errors.values()))),
                errors,
                len(batches),
                frozenset(ops),
            )
        )
    return sorted(measured, key=lambda candidate: (candidate.error, candidate.ops))
