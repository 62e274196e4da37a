"""The built-in reporter: ``analysis_enable`` writes the analysis report of :mod:`xquant_plugins.analysis`.

This module stays light (the plugin host imports it to register the reporter); the analysis
package, numpy and onnxruntime are imported when a report is written.
"""

from __future__ import annotations

from xquant_core import hookimpl
from xquant_core.reporting import REPORTER, Report, Reporter, ReportRequest


class AnalysisReport(Reporter):
    """Per-tensor error of the exported model against the float one, the measured Next step and
    the chart, on calibration batches spread over the list (and the held-back samples, if any)."""

    def write(self, request: ReportRequest) -> Report:
        from xquant_core.data import Subset

        from .analysis import CANDIDATE_BATCHES, DEFAULT_MAX_BATCHES, HELD_BACK_MAX, spread, write_report

        dataset = request.dataset
        wanted = CANDIDATE_BATCHES if request.trial is not None else DEFAULT_MAX_BATCHES
        batches = [dataset.batch(index) for index in spread(len(dataset), wanted)]
        held_back = Subset(
            dataset.held_back_batch, spread(dataset.held_back_count, HELD_BACK_MAX), dataset.held_back_count
        )
        return write_report(
            request.float_model,
            request.quant_model,
            batches,
            request.report_path,
            request.settings,
            request.quantize_seconds,
            request.sections,
            request.trial,
            request.progress,
            held_back if len(held_back) else None,
        )


@hookimpl
def xquant_register_reporters(register):
    register(REPORTER, AnalysisReport())
