"""Quantize a graph: the algorithms, and the backend, the only part of the core that imports PPQ and torch.

- :mod:`.plan`: ``EnginePlan`` and ``SubgraphOverride`` (the config resolved for the engine);
- :mod:`.core`: ``quantize_graph`` (the pass sequence as data, custom_setting regions, export);
- :mod:`.calibrate`: activation calibration driven by the calibration plugins;
- :mod:`.finetune`: bias correction, learned step size, ranking layers by error;
- :mod:`.search`: the auto-precision search;
- :mod:`.equalize`: depthwise cross-layer equalization;
- :mod:`.forms`: the ONNX forms PPQ parses and runs right, and the model's own forms restored;
- :mod:`.common`: constants and batch views the algorithms share;
- :mod:`.backend`: the core's only importer of PPQ and torch (PPQ's IR, op table, compatibility, tensors).
"""

from .backend.ppq_ir import keep_float
from .backend.tensors import cuda_available
from .common import HOLD_BACK_EVERY
from .core import FloatTrial, quantize_graph
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
