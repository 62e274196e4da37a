"""The error figure xquant reports: noise-to-signal power ``sum((q - f)^2) / sum(f^2)``, lower is better.

Not decibels. Summed over every element: a sample of a softmax misses its few peaks (PP-OCRv4's
recogniser output read 0.00029 on a sample, 0.052 over every element of the same batches).
"""

from __future__ import annotations

import math

import numpy as np


def flat32(array: np.ndarray) -> np.ndarray:
    """``array`` as a contiguous 1-D float32 array (a view when it is one already)."""
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


class PowerSums:
    """Running ``sum((q - f)^2)`` and ``sum(f^2)`` of quantized ``q`` against float ``f``.

    float32 BLAS dots: 13x faster than float64 copies on MobileNetV2's tensors and exact to about
    1e-6 relative, far below the four digits any figure is shown with.
    """

    def __init__(self) -> None:
        self.noise = 0.0
        self.signal = 0.0

    def add(self, q: np.ndarray, f: np.ndarray) -> None:
        q, f = flat32(q), flat32(f)
        diff = q - f
        self.noise += float(np.dot(diff, diff))
        self.signal += float(np.dot(f, f))

    @property
    def snr(self) -> float:
        """The ratio; 0 for two all-zero tensors, infinite for noise on a zero signal."""
        if self.signal > 0:
            return self.noise / self.signal
        return 0.0 if self.noise == 0 else math.inf


def snr(pairs) -> float:
    """The SNR over ``(q, f)`` pairs of arrays."""
    sums = PowerSums()
    for q, f in pairs:
        sums.add(q, f)
    return sums.snr
