"""Op implementations PPQ 0.6.6 gets wrong, and onnxruntime for the ops it cannot run.

Installed into PPQ's forward table (every platform) by :func:`install`; each one is checked
against onnxruntime by ``tests/engine/test_backend_ops.py``. What PPQ 0.6.6 does instead:

- PRelu: ``torch.prelu`` takes the slope as per-channel, so the [C,1,1] / [1,C,1,1] slopes
  ``torch.onnx.export`` writes for ``nn.PReLU(C)`` fail, and ONNX's other broadcastable
  shapes ([W], [H,W], ...) would mean the wrong axis;
- AveragePool: always counts the padding (ONNX's default ``count_include_pad=0`` does not)
  and mixes up asymmetric pads;
- ConvTranspose: crops asymmetric pads on the wrong axes;
- Gelu: ignores ``approximate="tanh"``;
- Pad: reflect/edge padding fails unless it is torch's own case (the last 1-3 axes of a
  tensor with a batch axis in front), e.g. Silero VAD's reflect pad of a [1, 576] signal;
- Resize: fails on ``sizes``, and maps every coordinate mode onto ``torch.interpolate``'s
  two; here nearest and linear follow the ONNX formulas for every coordinate mode;
- Clip: right, but ``torch.clamp`` with its bounds as tensors is 4x slower than with numbers
  (a tenth of a MobileNetV2 calibration pass): bounds of one element are passed as numbers;
- :data:`.forms.OPAQUE` nodes (ops PPQ does not know, If/Loop/Scan, later-opset features)
  run in float through onnxruntime, one small session per node.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from ..forms import OPAQUE, has_subgraph, opaque_inputs, opaque_original

_installed = False


def install() -> None:
    """Put the implementations below into PPQ's forward table for every platform (once)."""
    global _installed
    if _installed:
        return
    from ppq.executor.base import OPERATION_FORWARD_TABLE

    implementations = {
        "PRelu": prelu,
        "Clip": clip,
        "AveragePool": average_pool,
        "ConvTranspose": conv_transpose,
        "Gelu": gelu,
        "Pad": pad,
        "Resize": resize,
        OPAQUE: onnxruntime_node,
    }
    for table in OPERATION_FORWARD_TABLE.values():
        table.update(implementations)
    _installed = True


def runnable_types() -> set[str]:
    """Op types PPQ can run once :func:`install` has run."""
    from ppq import TargetPlatform
    from ppq.executor.base import OPERATION_FORWARD_TABLE

    install()
    return set(OPERATION_FORWARD_TABLE[TargetPlatform.FP32]) - {OPAQUE}


def _ints(op, name: str, default):
    value = op.attributes.get(name, default)
    return list(value) if isinstance(value, (list, tuple)) else value


def clip(op, values, ctx=None, **kwargs):
    x, bounds = values[0], values[1:]
    if (
        len(values) == 3
        and x.is_floating_point()
        and all(isinstance(b, torch.Tensor) and b.numel() == 1 for b in bounds)
    ):
        return torch.clamp(x, bounds[0].item(), bounds[1].item())
    from ppq.executor.op.torch.default import Clip_forward  # PPQ's own, for the other cases

    return Clip_forward(op, values, ctx, **kwargs)


def prelu(op, values, ctx=None, **kwargs):
    x, slope = values
    return torch.where(x >= 0, x, x * slope.to(x.device))


def average_pool(op, values, ctx=None, **kwargs):
    [x] = values
    rank = x.ndim - 2
    kernel = _ints(op, "kernel_shape", None)
    strides = _ints(op, "strides", None) or [1] * rank
    pads = _ints(op, "pads", None) or [0] * (2 * rank)
    ceil_mode = bool(op.attributes.get("ceil_mode", 0))
    include_pad = bool(op.attributes.get("count_include_pad", 0))
    torch_pads = [p for axis in reversed(range(rank)) for p in (pads[axis], pads[rank + axis])]
    # sums over each window, and how many elements each window counts, with the same padding
    padded = F.pad(x, torch_pads)
    mask = F.pad(
        torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), torch_pads, value=1.0 if include_pad else 0.0
    )
    sums, counts = (_sum_pool(tensor, kernel, strides, ceil_mode) for tensor in (padded, mask))
    return sums / counts


def _sum_pool(x, kernel, strides, ceil_mode):
    if x.ndim == 3:
        return _sum_pool(x.unsqueeze(2), [1, *kernel], [1, *strides], ceil_mode).squeeze(2)
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return pool(
        x,
        kernel_size=kernel,
        stride=strides,
        padding=0,
        ceil_mode=ceil_mode,
        count_include_pad=True,
        divisor_override=1,
    )


def conv_transpose(op, values, ctx=None, **kwargs):
    x, w = values[:2]
    bias = values[2] if len(values) > 2 else None
    rank = x.ndim - 2
    pads = _ints(op, "pads", None) or [0] * (2 * rank)
    function = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    output = function(
        x,
        w,
        bias,
        stride=_ints(op, "strides", None) or 1,
        padding=0,
        output_padding=_ints(op, "output_padding", None) or 0,
        groups=op.attributes.get("group", 1),
        dilation=_ints(op, "dilations", None) or 1,
    )
    crop = [slice(None), slice(None)] + [
        slice(pads[axis], output.shape[2 + axis] - pads[rank + axis]) for axis in range(rank)
    ]
    return output[tuple(crop)]


def gelu(op, values, ctx=None, **kwargs):
    approximate = op.attributes.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(values[0], approximate="tanh" if approximate == "tanh" else "none")


def pad(op, values, ctx=None, **kwargs):
    """ONNX Pad (opset 13 form: data, pads, constant_value) on any rank; negative pads crop."""
    x = values[0]
    pads = [int(value) for value in values[1].reshape(-1).tolist()]
    rank = x.ndim
    mode = _text(op, "mode", "constant")
    if mode == "constant":
        fill = values[2] if len(values) > 2 and values[2] is not None and values[2].numel() else None
        torch_pads = [p for axis in reversed(range(rank)) for p in (pads[axis], pads[rank + axis])]
        return F.pad(x, torch_pads, value=float(fill.reshape(-1)[0]) if fill is not None else 0.0)
    for axis in range(rank):
        before, after = pads[axis], pads[rank + axis]
        if before == 0 and after == 0:
            continue
        size = x.shape[axis]
        index = torch.arange(-before, size + after)
        if mode == "reflect":
            period = max(2 * (size - 1), 1)
            index = index.remainder(period)
            index = torch.where(index >= size, period - index, index)
        elif mode == "edge":
            index = index.clamp(0, size - 1)
        else:  # wrap
            index = index.remainder(size)
        x = x.index_select(axis, index.to(x.device))
    return x


# --------------------------------------------------------------------------- Resize
def _text(op, name: str, default: str) -> str:
    value = op.attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def resize(op, values, ctx=None, **kwargs):
    """ONNX Resize (opset 13 form: X, roi, scales, sizes), nearest and linear, axis by axis.

    Source coordinates are computed in float32, as onnxruntime does: in float64, a nearest
    neighbour that falls on a rounding tie can pick the other pixel.
    """
    x = values[0]
    scales = values[2] if len(values) > 2 and values[2] is not None and values[2].numel() else None
    sizes = values[3] if len(values) > 3 and values[3] is not None and values[3].numel() else None
    mode = _text(op, "mode", "nearest")
    if mode == "cubic":
        return _torch_cubic(x, scales, sizes, _text(op, "coordinate_transformation_mode", "half_pixel"))
    transform = _text(op, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = _text(op, "nearest_mode", "round_prefer_floor")
    for axis in range(x.ndim):
        size = x.shape[axis]
        if sizes is not None:
            out = int(sizes[axis])
            scale = out / size
        else:
            scale = float(scales[axis])
            out = math.floor(size * scale)
        if out == size and scale == 1.0:
            continue
        coords = _source_coordinates(torch.arange(out, dtype=torch.float32), scale, size, out, transform)
        if mode == "nearest":
            index = _nearest(coords, nearest_mode).clamp(0, size - 1).to(x.device)
            x = _repeated(x, axis, index, size, out)
        else:
            low = torch.floor(coords)
            weight = (coords - low).to(x.dtype).to(x.device)
            low = low.long()
            shape = [1] * x.ndim
            shape[axis] = out
            weight = weight.reshape(shape)
            first = x.index_select(axis, low.clamp(0, size - 1).to(x.device))
            second = x.index_select(axis, (low + 1).clamp(0, size - 1).to(x.device))
            x = first + (second - first) * weight
    return x


def _repeated(x, axis: int, index, size: int, out: int):
    """``x.index_select(axis, index)``; as ``repeat_interleave`` when the index repeats every
    source position k times in order (an integer upsampling), which is 5x faster on CPU (the
    PP-OCRv4 detector's calibration spent 1.1 s in this op) and copies the same values."""
    repeats = out // size
    if repeats > 1 and out == size * repeats and torch.equal(index.cpu(), torch.arange(out) // repeats):
        return x.repeat_interleave(repeats, dim=axis)
    return x.index_select(axis, index)


def _source_coordinates(x, scale: float, size: int, out: int, transform: str):
    if transform == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros_like(x)
    if transform == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if transform == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(x)
    if transform == "asymmetric":
        return x / scale
    raise NotImplementedError(f"Resize coordinate_transformation_mode {transform}")


def _nearest(coords, mode: str):
    if mode == "round_prefer_floor":
        return torch.ceil(coords - 0.5).long()
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5).long()
    if mode == "floor":
        return torch.floor(coords).long()
    return torch.ceil(coords).long()


def _torch_cubic(x, scales, sizes, transform: str):
    """Cubic 2-d resize: torch's bicubic is ONNX's with cubic_coeff_a -0.75 (the other cases are opaque)."""
    size = [int(value) for value in sizes[2:]] if sizes is not None else None
    factor = [float(value) for value in scales[2:]] if sizes is None else None
    return F.interpolate(x, size=size, scale_factor=factor, mode="bicubic", align_corners=transform == "align_corners")


# --------------------------------------------------------------------------- onnxruntime
def onnxruntime_node(op, values, ctx=None, **kwargs):
    """Run the original ONNX node of an opaque op with onnxruntime (float, on the CPU)."""
    arrays = [
        value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value) for value in values
    ]
    constant = [var.is_parameter for var in op.inputs]
    signature = tuple((array.dtype.str, array.shape) for array, fixed in zip(arrays, constant) if not fixed)
    cached = getattr(op, "_xquant_session", None)
    if cached is None or cached[0] != signature:
        cached = (signature, *_session(op, arrays, constant))
        op._xquant_session = cached
    _, session, feeds = cached
    outputs = session.run(None, {name: arrays[index] for index, name in feeds})
    device = values[0].device if values and isinstance(values[0], torch.Tensor) else "cpu"
    tensors = [torch.from_numpy(np.ascontiguousarray(array)).to(device) for array in outputs]
    return tensors[0] if len(tensors) == 1 else tensors


def _session(op, arrays, constant):
    """A one-node model of the original node: its constant inputs as initializers, the rest as inputs."""
    from ...runtime import onnxruntime_session

    node, opsets = opaque_original(op.attributes)
    symbolic = has_subgraph(node)
    inputs, initializers, feeds = [], [], []
    for index, (name, array, fixed) in enumerate(zip(opaque_inputs(node), arrays, constant)):
        if fixed:
            initializers.append(numpy_helper.from_array(array, name))
            continue
        # symbolic dims under a subgraph: with fixed ones onnxruntime infers shapes in untaken
        # If branches too, and a branch written for another rank (Silero VAD's) fails to load
        dims = [f"d{axis}" for axis in range(array.ndim)] if symbolic else list(array.shape)
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), dims))
        feeds.append((index, name))
    outputs = [onnx.ValueInfoProto(name=name) for name in node.output if name]
    graph = helper.make_graph([node], "xquant_opaque", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)
    return onnxruntime_session(model, threads=1), feeds
