"""What each kind of plugin component must provide, checked when a plugin registers it.

The interfaces themselves, with their documentation, are
:class:`xquant_core.calibration.CalibrationAlgorithm` (``calibration_type``),
:class:`xquant_core.data.Reader` (``file_type``), :class:`xquant_core.data.Preprocessor`
(``preprocess_file``), :class:`xquant_core.platform.Platform` (``platform``),
:class:`xquant_core.metrics.Metric` (``auto_precision.target.metric``),
:class:`xquant_core.reporting.Reporter` (``analysis_enable``),
:class:`xquant_core.searching.PrecisionSearch` (``auto_precision``) and
:class:`xquant_core.commands.Command` (``xquant NAME``). This module names
only their methods, so the plugin host can check a component without importing any of them.
"""

from __future__ import annotations

from typing import Any

#: registry kind -> (the interface, the methods a component of that kind must have)
INTERFACES: dict[str, tuple[str, tuple[str, ...]]] = {
    "calibration": ("xquant_core.calibration.CalibrationAlgorithm", ("compute_range",)),
    "reader": ("xquant_core.data.Reader", ("read",)),
    "preprocessor": ("xquant_core.data.Preprocessor", ("__call__",)),
    "platform": (
        "xquant_core.platform.Platform",
        (
            "create_quantizer",
            "float_ops",
            "float_op_types",
            "share_quantization",
            "after_calibration",
            "finalize",
            "export",
        ),
    ),
    "metric": ("xquant_core.metrics.Metric", ("measure", "meets", "better")),
    "reporter": ("xquant_core.reporting.Reporter", ("write",)),
    "searcher": ("xquant_core.searching.PrecisionSearch", ("quantize", "explain")),
    "command": ("xquant_core.commands.Command", ("add_arguments", "run")),
}


def missing_methods(kind: str, component: Any) -> list[str]:
    """The methods of ``kind``'s interface that ``component`` lacks (not callable)."""
    return [name for name in INTERFACES[kind][1] if not callable(getattr(component, name, None))]
