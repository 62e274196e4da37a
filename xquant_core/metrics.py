"""Metrics for automatic mixed precision (``auto_precision``).

A metric compares the quantized model with the float model. It gets two callables
that run a model on one feed (``{input name: np.ndarray}`` -> ``{output name:
np.ndarray}``), the float one and the candidate quantized one, and the held-back
calibration feeds; it may ignore those and use its own labelled data instead (e.g. task
accuracy). The search keeps ops in float until ``target`` is reached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Callable

import numpy as np

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], dict[str, np.ndarray]]


class Metric(ABC):
    """Base class of metric plugins (``auto_precision.target.metric``)."""

    #: True when larger values are better (cosine, accuracy), False for errors (SNR)
    higher_is_better: bool = False

    @abstractmethod
    def measure(self, quantized: Runner, reference: Runner, feeds: Sequence[Feed]) -> float:
        """The metric of the quantized model."""

    def meets(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than


def output_pairs(quantized: Runner, reference: Runner, feeds: Sequence[Feed]):
    """(quantized, float) arrays of every model output on every feed."""
    for feed in feeds:
        expected, actual = reference(feed), quantized(feed)
        for name, value in expected.items():
            yield actual[name].astype(np.float64), value.astype(np.float64)
