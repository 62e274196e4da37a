"""What the engine's algorithms share: constants, batch views, onnxruntime's outputs as tensors."""

from __future__ import annotations

import itertools
import logging

from .backend import tensors

log = logging.getLogger("xquant.engine")

#: batches used to rank layers by the error they add, and to choose a calibration strategy
RANKING_BATCHES = 8
#: the calibration strategy is chosen on every CHOICE_EVERY-th batch, at most CHOICE_BATCHES: a
#: detector's rare objects must be among them (8 batches of YOLOv8n's calibration photos held
#: too few faces, and the choice fell on windows that clipped them: 83.5 % of the FP32 boxes
#: recalled against 90-91 % for the two wider strategies)
CHOICE_EVERY = 2
CHOICE_BATCHES = 24
#: every n-th calibration batch is held back to validate fine-tuning and the auto-precision search
HOLD_BACK_EVERY = 4
#: a decision between two measured errors (strategy choice, fine-tune acceptance) changes the
#: default only when the other is lower by more than this fraction: a closer call is rounding noise
#: (another CPU's float kernels), not a better model
DECISION_MARGIN = 0.02


def run_now(function, *args) -> None:
    """Run ``function`` here: where calibration's observers and bias shifts send their work when no
    second core takes it."""
    function(*args)


def choice_batches(feeds) -> list:
    """The calibration batches the strategy choice measures on: every ``CHOICE_EVERY``-th, at most
    ``CHOICE_BATCHES``."""
    return list(itertools.islice(itertools.islice(feeds(), 0, None, CHOICE_EVERY), CHOICE_BATCHES))


def onnxruntime_outputs(model, batches, names: list[str], halves: bool = False):
    """``model``'s outputs ``names`` on each batch (dicts of torch tensors) as torch tensors, run
    by onnxruntime on one thread (a second core, beside PPQ; ``halves``: on both cores, see
    :func:`xquant_core.runtime.outputs_on`); None when it cannot (an output name the model lacks,
    an op onnxruntime does not run)."""
    from ..runtime import outputs_on

    if not set(names) <= {value.name for value in model.graph.output}:
        return None
    arrays = [{name: value.cpu().numpy() for name, value in batch.items()} for batch in batches]
    try:
        computed = outputs_on(model, arrays, names, 1, halves=halves)
        return [[tensors.to_tensor(value) for value in values] for values in computed]
    except Exception as exc:  # PPQ running the graph is the fallback
        log.debug("onnxruntime could not run the model (%s): PPQ runs it", exc)
        return None


def clearly_lower(candidate: float, incumbent: float) -> bool:
    return candidate < incumbent * (1.0 - DECISION_MARGIN)


class Batches:
    """A re-iterable, sized view of the calibration batches for PPQ passes.

    Reads lazily on every pass (the dataset keeps a bounded cache), so memory does not
    grow with the number of calibration samples.
    """

    def __init__(self, feeds, count: int):
        self.feeds, self.count = feeds, count

    def __iter__(self):
        return iter(self.feeds())

    def __len__(self) -> int:
        return self.count
