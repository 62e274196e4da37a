"""Calibration algorithms: how an activation's clip range is chosen.

An algorithm never touches PPQ or torch. The engine observes each activation tensor
over the calibration set (min/max in a first pass and, when the algorithm asks for it,
a histogram over [min, max] in a second pass) and hands the algorithm a
:class:`TensorStatistics`; the algorithm returns the clip range ``(low, high)``. The
engine turns that into a scale and zero point for the platform's integer range.

Weights are not calibrated here: platforms quantize them with min/max.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

#: bins of the activation histograms handed to algorithms
HISTOGRAM_BINS = 4096


@dataclass(frozen=True)
class TensorStatistics:
    """What calibration observed of one activation tensor.

    ``histogram`` counts values in ``HISTOGRAM_BINS`` equal bins spanning
    ``[min, max]``; it is ``None`` when the algorithm set ``needs_histogram = False``.
    ``consumers`` are the op types that read the tensor (e.g. ``("Sigmoid",)``);
    ``is_graph_output`` tells whether the model returns it.
    """

    name: str
    min: float
    max: float
    histogram: np.ndarray | None = None
    consumers: tuple[str, ...] = ()
    is_graph_output: bool = False

    def counts(self) -> np.ndarray:
        """The histogram as float64 counts (an algorithm that reads it set ``needs_histogram``)."""
        if self.histogram is None:
            raise ValueError(f"no histogram was collected for {self.name}: set needs_histogram = True")
        return self.histogram.astype(np.float64)

    def bin_edges(self) -> np.ndarray:
        return np.linspace(self.min, self.max, len(self.counts()) + 1)


@dataclass(frozen=True)
class CalibrationContext:
    """Settings that apply to the tensor being calibrated."""

    max_percentile: float = 0.9999
    quant_min: int = -128
    quant_max: int = 127


class CalibrationAlgorithm(ABC):
    """Base class of calibration algorithm plugins (``calibration_type``)."""

    #: whether :meth:`compute_range` needs ``stats.histogram`` (costs a second pass)
    needs_histogram: bool = True

    #: names of the strategies :meth:`candidate_ranges` returns, in order (for the log)
    strategies: tuple[str, ...] = ()

    @abstractmethod
    def compute_range(self, stats: TensorStatistics, ctx: CalibrationContext) -> tuple[float, float]:
        """Return the clip range ``(low, high)`` for the tensor."""

    def candidate_ranges(self, stats: TensorStatistics, ctx: CalibrationContext) -> list[tuple[float, float]]:
        """Clip ranges from several strategies, the first being :meth:`compute_range`'s.

        With more than one, the engine quantizes the whole model with the first range of
        every tensor, then with the second, and so on, and keeps the strategy whose
        model output is closest to the float model's on calibration batches (one
        quantized pass over a few batches per strategy).
        """
        return [self.compute_range(stats, ctx)]


def percentile_range(stats: TensorStatistics, percentile: float) -> tuple[float, float]:
    """Clip range keeping ``percentile`` of the values on each side of the histogram."""
    counts = stats.counts()
    total = counts.sum()
    if total <= 0 or stats.max <= stats.min:
        return stats.min, stats.max
    cdf = np.cumsum(counts) / total
    edges = stats.bin_edges()
    high_index = int(np.searchsorted(cdf, percentile, side="left"))
    low_index = int(np.searchsorted(cdf, 1.0 - percentile, side="right"))
    high = float(edges[min(high_index + 1, len(counts))])
    low = float(edges[min(low_index, len(counts) - 1)])
    return (stats.min if stats.min >= 0 else low), high
