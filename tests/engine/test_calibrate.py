"""The engine's activation calibration: the one-pass histogram against the two-pass one it replaced."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from xquant_core.calibration import HISTOGRAM_BINS  # noqa: E402
from xquant_core.engine.calibrate import OnePassHistogram  # noqa: E402


def _batches(seed: int) -> list:
    """Activations whose range grows both ways over the batches, with a constant batch first."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(0.5, -2.0), (1.0, 0.0), (3.0, 1.0), (10.0, 5.0), (0.1, -30.0), (2.0, 0.0)]
    batches = [torch.zeros(64)]
    batches += [torch.randn(20000, generator=generator) * spread + centre for spread, centre in shapes]
    return batches


def _one_pass(batches) -> tuple[np.ndarray, float, float]:
    histogram = OnePassHistogram()
    low, high = float("inf"), float("-inf")
    for batch in batches:
        batch_low, batch_high = batch.min().item(), batch.max().item()
        histogram.add(batch, batch_low, batch_high)
        low, high = min(low, batch_low), max(high, batch_high)
    return histogram.spread(low, high, HISTOGRAM_BINS), low, high


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pass_histogram_matches_the_two_pass_one(seed):
    batches = _batches(seed)
    counts, low, high = _one_pass(batches)
    two_pass = sum(
        torch.histc(batch, bins=HISTOGRAM_BINS, min=low, max=high).numpy().astype(np.float64) for batch in batches
    )
    assert counts.shape == (HISTOGRAM_BINS,)
    assert counts.sum() == pytest.approx(sum(batch.numel() for batch in batches), abs=1e-6)  # nothing lost
    assert (counts >= 0).all()
    # the cumulative distributions (what percentile, KL and MSE searches read) agree closely
    difference = np.abs(np.cumsum(counts) - np.cumsum(two_pass)) / counts.sum()
    assert difference.max() < 1e-3
    # and the tail mass beyond any bin, which sets a percentile window, within a grid bin of it
    tail = 1 - np.cumsum(counts) / counts.sum()
    reference_tail = 1 - np.cumsum(two_pass) / two_pass.sum()
    for quantile in (1e-2, 1e-3, 1e-4):
        assert abs(np.searchsorted(-tail, -quantile) - np.searchsorted(-reference_tail, -quantile)) <= 2


def test_grid_stays_within_its_bins_and_twice_the_final_resolution():
    histogram = OnePassHistogram()
    for batch in _batches(0):
        histogram.add(batch, batch.min().item(), batch.max().item())
    span = max(b.max().item() for b in _batches(0)) - min(b.min().item() for b in _batches(0))
    assert len(histogram.counts) <= 4 * HISTOGRAM_BINS
    assert histogram.width <= 2 * span / (4 * HISTOGRAM_BINS)


def test_constant_tensors_count_in_the_first_bin():
    histogram = OnePassHistogram()
    histogram.add(torch.full((10,), 3.0), 3.0, 3.0)
    counts = histogram.spread(3.0, 3.0, HISTOGRAM_BINS)
    assert counts[0] == 10 and counts[1:].sum() == 0


# --------------------------------------------------------------------------- shared side work
def _side_work_run(enabled: bool, watchers: int = 6, batches: int = 5) -> tuple[dict, set]:
    """Each watcher's jobs record (step, thread); some jobs are slow so both threads take some."""
    import threading
    import time

    from xquant_core.engine.calibrate import _SideWork

    seen: dict[int, list[int]] = {w: [] for w in range(watchers)}
    threads: set[int] = set()

    def job(watcher: int, step: int) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.002 * (watcher % 3))
        seen[watcher].append(step)

    with _SideWork(enabled=enabled) as side:
        for step in range(batches):
            for watcher in range(watchers):
                side.collect(job, watcher, step)
            time.sleep(0.001)  # the "forward pass"
            side.finish_previous_and_start_collected()
    return seen, threads


@pytest.mark.parametrize("enabled", [True, False])
def test_side_work_runs_every_job_once_in_batch_order_per_watcher(enabled):
    seen, threads = _side_work_run(enabled)
    assert all(steps == list(range(5)) for steps in seen.values())
    if not enabled:
        import threading

        assert threads == {threading.get_ident()}  # one core: everything where it is collected


def test_a_failing_side_job_fails_the_pass():
    from xquant_core.engine.calibrate import _SideWork

    def broken() -> None:
        raise ValueError("observer failed")

    with pytest.raises(ValueError, match="observer failed"):
        with _SideWork(enabled=True) as side:
            side.collect(broken)
            side.finish_previous_and_start_collected()
            side.finish_previous_and_start_collected()


def _kl_by_masks(p, centers, windows, steps, levels):
    """The KL divergences written with whole-histogram masks: what ``window_errors`` computes on
    each window's run of bins only."""
    kl = []
    for (low, high), level in zip(windows, steps.astype(np.int64)):
        inside = (centers >= low) & (centers <= high)
        if not inside.any():
            kl.append(np.inf)
            continue
        clipped = np.where(inside, p, 0.0)
        clipped[np.argmax(inside)] += p[centers < low].sum()
        clipped[len(inside) - 1 - np.argmax(inside[::-1])] += p[centers > high].sum()
        nonzero = clipped > 0
        mass = np.bincount(level, weights=clipped, minlength=levels + 1)
        occupied = np.bincount(level, weights=nonzero.astype(np.float64), minlength=levels + 1)
        q = np.where(nonzero, mass[level] / np.maximum(occupied[level], 1.0), 0.0)
        kl.append(float(np.sum(clipped[nonzero] * np.log(clipped[nonzero] / np.maximum(q[nonzero], 1e-12)))))
    return np.array(kl)


def test_window_search_kl_is_the_same_number_on_the_windows_bins_alone():
    """The KL+MSE search computes each window's KL on the bins inside it (issue 16: 1.3 s of
    PP-OCRv4 det's calibration); bit for bit what the whole-histogram computation gives, so the
    windows, and the models, do not change."""
    from xquant_core.calibration import CalibrationContext, TensorStatistics
    from xquant_plugins.calibration import candidate_windows, window_errors

    rng = np.random.default_rng(4)
    ctx = CalibrationContext()
    for trial in range(40):
        bins = (16, 256, 4096)[trial % 3]
        counts = rng.integers(0, 50, bins) * (rng.random(bins) < rng.random())
        counts[rng.integers(0, bins)] += 5
        low, high = -rng.random() * 8 * (trial % 4 != 0), 0.1 + rng.random() * 8
        stats = TensorStatistics("t", float(low), float(high), counts.astype(np.int64))
        windows = np.vstack([candidate_windows(stats, ctx), [[low * 3, high * 3], [0.0, 0.0]]])
        _, kl = window_errors(stats, windows, ctx)
        edges = stats.bin_edges()
        centers = (edges[:-1] + edges[1:]) / 2
        levels = ctx.quant_max - ctx.quant_min
        scales = np.maximum((windows[:, 1:] - windows[:, :1]) / levels, 1e-12)
        steps = np.clip(np.round((centers[None, :] - windows[:, :1]) / scales), 0, levels)
        expected = _kl_by_masks(stats.counts() / max(stats.counts().sum(), 1.0), centers, windows, steps, levels)
        assert np.array_equal(kl, expected), trial


class _Answers:
    """A calibration algorithm (as a plugin may write one) that answers ``answer``."""

    needs_histogram = False

    def __init__(self, answer):
        self.answer = answer

    def compute_range(self, stats, context):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer, says", [
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero"),
    (None, "a range must be two numbers (low, high), not None"),
    ((0.0, 1.0, 2.0), "a range must be two numbers (low, high), not (0.0, 1.0, 2.0)"),
    (("a", "b"), "a range must be two numbers (low, high), not ('a', 'b')"),
    ((float("nan"), 1.0), "a range must be finite with low <= high, not (nan, 1)"),
    ((0.0, float("inf")), "a range must be finite with low <= high, not (0, inf)"),
    ((3.0, -3.0), "a range must be finite with low <= high, not (3, -3)"),
])
def test_a_calibration_algorithm_that_fails_or_answers_no_range_is_named(answer, says):
    """A plugin's algorithm raising, or answering None, three numbers, NaN or an inverted range, used
    to be exit 3 (an IndexError in xquant) or exit 1 with PPQ's or numpy's words; or, inverted,
    a silently wrong model."""
    import torch

    from xquant_core.calibration import CalibrationContext
    from xquant_core.engine.calibrate import _TensorObserver
    from xquant_core.errors import PluginError

    observer = _TensorObserver("t", [], (), False, _Answers(answer), CalibrationContext())
    observer.observe(torch.tensor([-1.0, 2.0]))
    with pytest.raises(PluginError) as info:
        observer.compute()
    assert str(info.value).startswith(f"calibration algorithm {__name__}._Answers failed on tensor t: ")
    assert says in str(info.value)
    observer = _TensorObserver("t", [], (), False, _Answers((0.0, 0.0)), CalibrationContext())
    observer.observe(torch.tensor([0.0, 0.0]))
    assert observer.compute() == 1 and observer.ranges == [(0.0, 0.0)]  # a zero-width range is a range


def test_a_tensor_that_overflows_in_the_float_model_is_named_with_its_batch():
    """Finite samples of 3e38 overflow to inf in the first Relu: an OverflowError in the histogram
    was exit 3."""
    import torch

    from xquant_core.calibration import CalibrationContext
    from xquant_core.engine.calibrate import _TensorObserver
    from xquant_core.errors import DataError

    observer = _TensorObserver("relu_out", [], (), False, _Answers((0.0, 1.0)), CalibrationContext())
    observer.step = 3
    with pytest.raises(DataError, match="tensor relu_out of the float model holds inf or NaN on calibration batch 4"):
        observer.observe(torch.tensor([0.0, float("inf")]))
