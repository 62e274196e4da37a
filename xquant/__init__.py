"""``import xquant``: a thin facade over :mod:`xquant_core`.

import xquant
model = xquant.quantize_onnx_model("cfg.json")            # writes the .q.onnx too
model = xquant.quantize_onnx_model("cfg.json", model="m.onnx", output="m.q.onnx")
"""

from xquant_core import __version__, hookimpl, quantize_onnx_model
from xquant_core.errors import ConfigError, DataError, ModelError, PluginError, QuantizationError, XQuantError

__all__ = [
    "ConfigError",
    "DataError",
    "ModelError",
    "PluginError",
    "QuantizationError",
    "XQuantError",
    "__version__",
    "hookimpl",
    "quantize_onnx_model",
]
