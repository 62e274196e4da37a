"""What the engine is asked to do: the config resolved to plugin objects (``EnginePlan``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration import CalibrationAlgorithm, CalibrationContext


@dataclass(frozen=True)
class SubgraphOverride:
    """One ``custom_setting`` entry, its names resolved to plugin objects."""

    index: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    precision_level: int | None = None
    algorithm: CalibrationAlgorithm | None = None
    max_percentile: float | None = None
    float_after_calibration: bool = False


@dataclass(frozen=True)
class EnginePlan:
    """Everything the engine needs to know, resolved from the config."""

    algorithm: CalibrationAlgorithm
    context: CalibrationContext
    precision_level: int
    finetune_level: int
    device: str
    overrides: tuple[SubgraphOverride, ...] = ()
