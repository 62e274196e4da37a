"""torch for the engine's algorithms: tensors from arrays, grad mode, threads, and the few kernels they call.

The algorithms (:mod:`..calibrate`, :mod:`..finetune`, :mod:`..search`, :mod:`..equalize`) take
PPQ's tensors and use their methods (``.double()``, ``.sum()``, ...); every torch *function*
they need is here, so that they never import torch (issue 14). torch is imported in each
function, not at module level: ``import xquant`` and config errors stay quick.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

#: torch threads while a model is quantized: always one, whatever the machine or ``XQUANT_NUM_THREADS``.
#: torch splits its reductions (and some conv kernels) by the thread count, so its float sums
#: differed in the last bits, every scale and rounding after them moved, and the MobileNetV2
#: sample came out as other bytes with another logits SNR at 1, 2 and 8 threads (0.0118 / 0.0131);
#: a second thread saved 10 % of the time there (12.7 -> 11.4 s)
TORCH_THREADS = 1


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def seeded_fixed_threads() -> Iterator[None]:
    """torch seeded and on :data:`TORCH_THREADS` threads for the block; its thread count restored after."""
    import torch

    torch.manual_seed(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def one_thread() -> None:
    """This thread's torch work on one thread (a helper thread's initializer)."""
    import torch

    torch.set_num_threads(1)


def no_grad():
    """torch's ``no_grad`` context (grad mode is per thread)."""
    import torch

    return torch.no_grad()


def to_tensor(array: np.ndarray, device: str = "cpu"):
    """A torch tensor of ``array`` on ``device`` (sharing its memory and strides on the CPU)."""
    import torch

    return torch.from_numpy(array).to(device)


def is_float_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.is_floating_point()


def min_max(value) -> tuple[float, float]:
    """The smallest and the largest element of a tensor."""
    import torch

    low, high = (bound.item() for bound in torch.aminmax(value))
    return low, high


def histogram_counts(value, bins: int, low: float, high: float) -> np.ndarray:
    """Counts of a tensor's elements in ``bins`` equal bins over [low, high] (float64)."""
    import torch

    counts = torch.histc(value, bins=bins, min=low, max=high)
    return counts.cpu().numpy().astype(np.float64)


def scalar(value: float):
    """A float32 scalar tensor (a quantization scale or offset)."""
    import torch

    return torch.tensor(value, dtype=torch.float32)


def tap_means(attributes: dict, x, kernel_shape):
    """For a 2-D Conv with explicit pads (``attributes``: the Conv's): the mean of its input under
    each kernel tap, over the batch and the output positions, [channels, taps], float64."""
    import torch
    import torch.nn.functional as F

    kernel_h, kernel_w = kernel_shape[2:]
    stride_h, stride_w = attributes.get("strides", [1, 1])
    dilation_h, dilation_w = attributes.get("dilations", [1, 1])
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    padded = F.pad(x, (left, right, top, bottom))
    rows = (padded.shape[2] - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    columns = (padded.shape[3] - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    means = [
        padded[
            :,
            :,
            a * dilation_h : a * dilation_h + (rows - 1) * stride_h + 1 : stride_h,
            b * dilation_w : b * dilation_w + (columns - 1) * stride_w + 1 : stride_w,
        ].mean(dim=(0, 2, 3))
        for a in range(kernel_h)
        for b in range(kernel_w)
    ]
    return torch.stack(means, dim=1).double()


def grouped_weights_times_taps(weights, taps):
    """``sum over p, k of weights[g, o, p, k] * taps[g, p, k]`` -> [g, o]."""
    import torch

    return torch.einsum("gopk,gpk->go", weights, taps)
