"""The precision-search interface: what ``auto_precision`` in a config runs.

The built-in search (``xquant_plugins.auto_precision``) is registered as :data:`SEARCHER`; a
plugin may replace it with ``override=True``. Its metrics are plugins of their own
(:class:`xquant_core.metrics.Metric`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

#: the registered search that a config's ``auto_precision`` runs
SEARCHER = "auto_precision"


class PrecisionSearch(ABC):
    """Base class of precision-search plugins (``auto_precision``)."""

    @abstractmethod
    def quantize(self, cfg: Any, model: Any, dataset: Any, platform: Any, plan: Any, progress: Any) -> tuple[Any, Any]:
        """Quantize ``model`` (an ``onnx.ModelProto``) with the engine (:func:`xquant_core.engine.quantize_graph`)
        for ``cfg.auto_precision``: ``(the final quantized model, what the search found)``."""

    @abstractmethod
    def explain(self, cfg: Any, found: Any, out_path: Path) -> tuple[tuple[str, ...], tuple[str, ...], Any]:
        """``(report section lines, console summary lines, (path, bytes) of a file to write with the
        model, or None)``; warns when the target was missed."""
