"""The last check before a quantized model is written: it must be a model a user can run; and
the float model run on the calibration samples (what ``xquant check`` and a failed run look at).

A model that fails here is exit 1 naming what is wrong, never a file written with exit 0
(an inf in the calibration data gave a model whose every output was NaN; a graph with
nothing to quantize came out with no nodes, inputs or outputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .engine.forms import subgraphs
from .errors import QuantizationError
from .runtime import onnxruntime_session

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def verify_model(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, feed: Mapping[str, np.ndarray]
) -> str | None:
    """onnx's checker (unless the float model fails it too: a declared output without a shape),
    finite positive scales, the float model's output names and order, and one
    onnxruntime inference on ``feed`` with the float model's output shapes and dtypes, finite
    where the float model's outputs are.

    Returns a warning for the user when this CPU's fused int8 kernels compute the model
    differently from exact int8 arithmetic (:func:`fused_kernel_gap`), else None."""
    _check_scales(quantized.graph)
    want = [value.name for value in float_model.graph.output]
    got = [value.name for value in quantized.graph.output]
    if got != want:
        raise QuantizationError(f"the quantized model's outputs are {got}, the float model's {want}")
    problem = _checker_problem(quantized)
    if problem is not None and _checker_problem(float_model) is None:  # not what the float model had already
        raise QuantizationError(f"the quantized model is not valid ONNX: {problem}")
    reference = _run(float_model, feed, "the float model")
    outputs = _run(quantized, feed, "the quantized model")
    for name, expected, value in zip(want, reference, outputs):
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise QuantizationError(
                f"output {name} of the quantized model is {value.dtype}{list(value.shape)}, "
                f"the float model's {expected.dtype}{list(expected.shape)}"
            )
        if value.dtype.kind == "f" and np.isfinite(expected).all() and not np.isfinite(value).all():
            raise QuantizationError(
                f"output {name} of the quantized model holds NaN or Inf on the first "
                "calibration batch, where the float model's is finite"
            )
    return fused_kernel_gap(quantized, feed, want, reference, outputs)


#: the output error (SNR against FP32) that onnxruntime's fused int8 kernels may add to the
#: exact figure before the user is told: VNNI CPUs and ARM add nothing measurable
FUSED_GAP = 1.5


def fused_kernel_gap(
    quantized: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    names: list[str],
    reference: list[np.ndarray],
    exact: list[np.ndarray],
) -> str | None:
    """A warning when onnxruntime's default session on this CPU (fused int8 kernels) gives a
    clearly larger output error than exact int8 arithmetic (see
    :func:`xquant_core.runtime.onnxruntime_session`): an x86 CPU without VNNI saturates 16-bit
    sums. The model is right (the chip computes exactly); checks on this machine must
    use ``graph_optimization_level=ORT_ENABLE_BASIC`` or ``xquant compare``."""
    try:
        session = onnxruntime_session(quantized, fused=True)
        fused = session.run(None, {value.name: feed[value.name] for value in session.get_inputs()})
    except Exception as exc:  # onnxruntime raises its own exception types
        return (
            "onnxruntime's default session on this CPU cannot run the quantized model (its fused int8 kernels: "
            f"{_first_line(exc)}); it runs exactly with graph_optimization_level=ORT_ENABLE_BASIC, as xquant "
            "measures it. Please report the model to xquant: its export should run everywhere"
        )
    for name, want, good, got in zip(names, reference, exact, fused):
        if want.dtype.kind != "f" or not np.isfinite(got).all():
            continue
        power = float(np.square(want.astype(np.float64)).sum()) or 1.0
        exact_snr = float(np.square(good.astype(np.float64) - want).sum()) / power
        fused_snr = float(np.square(got.astype(np.float64) - want).sum()) / power
        if fused_snr > FUSED_GAP * exact_snr + 1e-4:
            return (
                f"on this CPU onnxruntime's fused int8 kernels compute the model less exactly than the chip: "
                f"output {name} SNR {fused_snr:.4g} with a default onnxruntime session against "
                f"{exact_snr:.4g} in exact int8 arithmetic, on the first calibration batch (x86 CPUs "
                "without VNNI saturate 16-bit sums). The model is not at fault; to check it on this "
                "machine use xquant compare, or a session with graph_optimization_level=ORT_ENABLE_BASIC"
            )
    return None


def _checker_problem(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return _first_line(exc)
    return None


def _check_scales(graph: onnx.GraphProto) -> None:
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type in _QDQ and node.input[1] in initializers:
            scale = numpy_helper.to_array(initializers[node.input[1]])
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                bad = scale[~(np.isfinite(scale) & (scale > 0))].ravel()[:3].tolist()
                raise QuantizationError(
                    f"the quantization scale of {node.input[0]} ({node.op_type} "
                    f"{node.name or node.output[0]}) is {bad}: it must be finite and "
                    "positive (are the calibration values of that tensor finite?)"
                )
        for attribute in node.attribute:
            for sub in subgraphs(attribute):
                _check_scales(sub)


def _run(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:
    try:
        session = onnxruntime_session(model)
        names = [value.name for value in session.get_inputs()]
        return session.run(None, {name: feed[name] for name in names})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QuantizationError(f"onnxruntime cannot run {what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def diagnose_failure(float_model: onnx.ModelProto, dataset, error: BaseException) -> Exception:
    """The error to report when PPQ failed on valid-looking input: when the float model itself
    fails in onnxruntime on a calibration sample (token ids outside the vocabulary, values an
    op refuses), a :class:`DataError` naming the sample's files and onnxruntime's reason;
    otherwise the quantization failure as it is."""
    try:
        problem = float_model_problem(float_model, dataset)
    except QuantizationError:  # onnxruntime cannot load it either: PPQ's message is all there is
        problem = None
    return problem or QuantizationError(f"quantization failed: {type(error).__name__}: {_first_line(error)}")


def float_model_problem(float_model: onnx.ModelProto, dataset, seen=None):
    """A :class:`DataError` naming the first calibration sample the float model fails on in
    onnxruntime (token ids outside the vocabulary, values an op refuses), else None; raises
    :class:`QuantizationError` when onnxruntime cannot load the model. ``seen(batch)``: called with
    each batch read (``xquant check`` takes the value ranges from them: each sample read once)."""
    from .errors import DataError

    try:
        session = onnxruntime_session(float_model)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QuantizationError(f"onnxruntime cannot load the float model: {_first_line(exc)}") from None
    names = [value.name for value in session.get_inputs()]
    for index in range(len(dataset)):
        feed = dataset.batch(index)
        if seen is not None:
            seen(feed)
        try:
            session.run(None, {name: feed[name] for name in names})
        except Exception as exc:  # onnxruntime raises its own exception types
            files = ", ".join(
                str(path)
                for paths in dataset.lists.values()
                for path in paths[index * dataset.batch_size : (index + 1) * dataset.batch_size]
            )
            return DataError(
                f"the float model itself fails on calibration sample {files}: onnxruntime says {_first_line(exc)}"
            )
    return None
