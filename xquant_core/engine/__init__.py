"""The one package that talks to PPQ.

- :mod:`.plan`: ``EnginePlan`` and ``SubgraphOverride`` (the config resolved for the engine);
- :mod:`.core`: ``quantize_graph`` (parse, dispatch, the pass sequence, export);
- :mod:`.calibrate`: activation calibration driven by the calibration plugins;
- :mod:`.finetune`: bias correction, learned step size, ranking layers by error;
- :mod:`.search`: the auto-precision search;
- :mod:`.common`: switching ops to float and constants they share.
"""

from .common import HOLD_BACK_EVERY, keep_float
from .core import FloatTrial, cuda_available, quantize_graph
from .plan import EnginePlan, SubgraphOverride
from .search import FloatOp, FloatOpSearch, SearchResult

__all__ = [
    "HOLD_BACK_EVERY",
    "EnginePlan",
    "FloatOp",
    "FloatOpSearch",
    "FloatTrial",
    "SearchResult",
    "SubgraphOverride",
    "cuda_available",
    "keep_float",
    "quantize_graph",
]
