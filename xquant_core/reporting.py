"""The report interface: what the pipeline hands a reporter plugin after quantizing, and gets back.

``analysis_enable: true`` asks the reporter registered as :data:`REPORTER` (the built-in one is
``xquant_plugins.analysis``: per-tensor error, the measured Next step, the chart) for a report. A
plugin may register its own under that name with ``override=True``; to add a section to the
built-in report, implement :func:`xquant_core.hookspecs.xquant_report_sections` instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the registered reporter that ``analysis_enable`` runs
REPORTER = "analysis"


@dataclass(frozen=True)
class ReportRequest:
    """What a reporter gets (read only: neither model may be changed)."""

    float_model: Any  #: the ``onnx.ModelProto`` that was quantized (after onnxsim)
    quant_model: Any  #: the exported QDQ ``onnx.ModelProto``
    dataset: Any  #: the :class:`xquant_core.data.CalibrationDataset` (``batch(i)``, ``held_back_batch(i)``)
    report_path: Path  #: the Markdown file to write (atomically), ``<output_prefix>_report.md``
    settings: dict[str, Any]  #: the quantization settings as the report's table shows them
    quantize_seconds: float  #: how long quantization took, for the report's time budget
    sections: tuple[str, ...] = ()  #: Markdown lines to include after the settings (auto_precision's)
    trial: Any = None  #: the engine's :class:`xquant_core.engine.FloatTrial`, to measure float fallbacks
    progress: Any = None  #: the progress reporter factory, or None


@dataclass(frozen=True)
class Report:
    """What a reporter gives back: the console lines and the summary's figures (for the API)."""

    lines: list[str]
    figures: dict[str, Any]


class Reporter(ABC):
    """Base class of reporter plugins (``analysis_enable``)."""

    @abstractmethod
    def write(self, request: ReportRequest) -> Report:
        """Write the report at ``request.report_path``; raise on failure (the pipeline warns and
        keeps the quantized model)."""
