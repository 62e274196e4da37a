"""The built-in precision search: ``auto_precision`` keeps the fewest ops in float that meet its target.

This module stays light (the plugin host imports it to register the search); the search itself,
in :mod:`.search`, imports onnx and the engine when a config asks for it.
"""

from __future__ import annotations

from xquant_core import hookimpl
from xquant_core.searching import SEARCHER, PrecisionSearch


class AutoPrecision(PrecisionSearch):
    """Rank ops by the error they add, keep them in float one by one (each candidate exported and
    run by onnxruntime on held-back samples) until the target is met."""

    def quantize(self, cfg, model, dataset, platform, plan, progress):
        from .search import search_precision

        return search_precision(cfg, model, dataset, platform, plan, progress)

    def explain(self, cfg, found, out_path):
        from .search import finish_search

        return finish_search(cfg, found, out_path)


@hookimpl
def xquant_register_searchers(register):
    register(SEARCHER, AutoPrecision())
