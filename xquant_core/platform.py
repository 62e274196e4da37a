"""Target platforms: the quantization policy of a chip and how its models are exported.

A platform plugin registers an object implementing :class:`Platform`. The engine
(:mod:`xquant_core.engine`) drives the work: it dispatches ops, lets the platform's
quantizer create the tensor quantization configs, calibrates, runs the fine-tuning
passes, then asks the platform to export. Platform plugins may use PPQ directly; import
it inside the methods, not at module level. The platform owns its policy: which op types each
``precision_level`` keeps float, which ops always stay float, which configs are tied.

Optionally, ``quantize_dynamic(model)`` gives global ``precision_level: 3`` a meaning (SpacemiT's:
dynamic quantization of MatMul/Gemm, no calibration; a platform without it refuses that level),
and ``passes(default)`` returns the pass sequence the engine runs after dispatch: the
names of :data:`xquant_core.engine.core.PASSES` (reordered, some left out) and callables of its
own taking a :class:`xquant_core.engine.core.PassRun` (graph, executor, plan, calibration feeds).
"""

from __future__ import annotations

from typing import Any, Protocol


class Platform(Protocol):
    """What a platform plugin provides."""

    #: one line for `xquant plugins`
    description: str

    def create_quantizer(self, graph: Any) -> Any:
        """Return a PPQ ``BaseQuantizer`` for the graph (defines op types and policies)."""

    def float_ops(self, graph: Any) -> set[str]:
        """Names of the ops kept float whatever the precision level (e.g. a float post-processing tail)."""

    def float_op_types(self, level: int) -> frozenset[str]:
        """The parameter-free op types ``precision_level`` 1 and 2 keep in float (level 3: every op)."""

    def share_quantization(self, graph: Any) -> None:
        """Tie quantization configs that the runtime requires to be equal (shape ops)."""

    def after_calibration(self, graph: Any) -> None:
        """Policy on calibrated parameters (e.g. Concat inputs sharing the output's scale)."""

    def finalize(self, graph: Any) -> None:
        """Last policy fixes after calibration (e.g. float bias where int32 would overflow)."""

    def export(self, graph: Any) -> Any:
        """Return the quantized graph as an ``onnx.ModelProto``."""
