"""xquant core: config, plugin host, calibration data and the quantization pipeline.

Importing this package is cheap: it pulls in neither torch nor PPQ. The heavy
modules (:mod:`xquant_core.engine`, the platform plugins) are imported only when a
model is actually quantized.
"""

import os as _os

# onnxruntime, when imported, writes a device id and a telemetry database under
# ~/.cache/Microsoft and a ".ses" file in the temp folder unless this is set first
if not _os.environ.get("ORT_DISABLE_TELEMETRY"):
    _os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from ._version import __version__
from .hookspecs import hookimpl

__all__ = ["__version__", "hookimpl", "quantize_onnx_model"]


def quantize_onnx_model(config_or_path, model=None, output=None):
    """Quantize an ONNX model as described by an xquant/XQuant JSON config.

    See :func:`xquant_core.pipeline.quantize_onnx_model`.
    """
    from .pipeline import quantize_onnx_model as _quantize

    return _quantize(config_or_path, model=model, output=output)
