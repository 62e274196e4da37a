"""Built-in calibration algorithms.

- ``minmax``: the observed range.
- ``percentile``: clips ``1 - max_percentile`` of the values on each side.
"""

from __future__ import annotations

from xquant_core import hookimpl
from xquant_core.calibration import (CalibrationAlgorithm, CalibrationContext,
                                     TensorStatistics, percentile_range)


class MinMax(CalibrationAlgorithm):
    """The full observed range: no clipping, largest rounding error."""

    needs_histogram = False

    def compute_range(self, stats: TensorStatistics, ctx: CalibrationContext) -> tuple[float, float]:
        return stats.min, stats.max


class Percentile(CalibrationAlgorithm):
    """Clip to the ``max_percentile`` quantiles of the calibration histogram."""

    def compute_range(self, stats: TensorStatistics, ctx: CalibrationContext) -> tuple[float, float]:
        return percentile_range(stats, ctx.max_percentile)


@hookimpl
def xquant_register_calibration_algorithms(register):
    register("minmax", MinMax())
    register("percentile", Percentile())
