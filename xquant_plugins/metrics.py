"""Built-in auto_precision metrics: ``snr`` and ``cosine`` of the model outputs."""

from __future__ import annotations

import numpy as np

from xquant_core import hookimpl
from xquant_core.metrics import Metric, output_pairs
from xquant_core.snr import snr


class OutputSNR(Metric):
    """Noise-to-signal power of the outputs, sum((q - f)^2) / sum(f^2); lower is better."""

    higher_is_better = False

    def measure(self, quantized, reference, feeds) -> float:
        return snr(output_pairs(quantized, reference, feeds))


class OutputCosine(Metric):
    """Mean cosine similarity of the flattened outputs per feed; higher is better."""

    higher_is_better = True

    def measure(self, quantized, reference, feeds) -> float:
        values = []
        for q, f in output_pairs(quantized, reference, feeds):
            q, f = q.ravel(), f.ravel()
            norm = np.linalg.norm(q) * np.linalg.norm(f)
            values.append(float(q @ f / norm) if norm > 0 else 1.0)
        return float(np.mean(values)) if values else 1.0


@hookimpl
def xquant_register_metrics(register):
    register("snr", OutputSNR())
    register("cosine", OutputCosine())
