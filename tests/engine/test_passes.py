"""The engine's pass sequence is data (issue 14): a platform returns its own from ``passes``."""

from __future__ import annotations

import numpy as np
import pytest

import xquant_test_models as models


def _quantize(platform, finetune_level: int = 0):
    from xquant_core.calibration import CalibrationContext
    from xquant_core.engine import EnginePlan, quantize_graph
    from xquant_core.plugins import registry

    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    plan = EnginePlan(algorithm=registry("calibration").get("minmax"), context=CalibrationContext(0.9999),
                      precision_level=0, finetune_level=finetune_level, device="cpu")
    return quantize_graph(models.small_cnn(), batches, len(batches), platform, plan)


class _Extended:
    """The SpacemiT platform with a sequence of its own: a pass of its own after calibration."""

    def __init__(self, sequence):
        from xquant_core.plugins import registry

        self._base = registry("platform").get("spacemit")
        self._sequence = sequence
        self.seen: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self._base, name)

    def passes(self, default):
        return self._sequence(self, default)


def test_the_default_sequence_names_every_step_once():
    from xquant_core.engine.core import PASS_STEPS, PASSES

    assert list(PASSES) == list(PASS_STEPS)
    assert PASSES.index("quantize weights") < PASSES.index("calibrate activations") < PASSES.index("finalize")


def test_a_platform_adds_a_pass_and_the_model_is_the_same():
    def after_calibration(platform, default):
        def record(run):
            platform.seen.append(("calibrated", len(run.graph.operations)))

        steps = list(default)
        steps.insert(steps.index("calibrate activations") + 1, record)
        return steps

    from xquant_core.plugins import registry

    plain = _quantize(registry("platform").get("spacemit"))
    extended = _Extended(after_calibration)
    model = _quantize(extended)
    assert [what for what, _ in extended.seen] == ["calibrated"] and extended.seen[0][1] > 0
    assert model.SerializeToString() == plain.SerializeToString()


def test_a_platform_that_leaves_out_the_bias_quantization_changes_the_model():
    from xquant_core.plugins import registry

    plain = _quantize(registry("platform").get("spacemit"))
    without = _quantize(_Extended(lambda platform, default: [s for s in default if s != "quantize biases"]))
    assert without.SerializeToString() != plain.SerializeToString()


def test_an_unknown_pass_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown passes \['calibrate twice'\]; known: \['fuse activations'"):
        _quantize(_Extended(lambda platform, default: [*default, "calibrate twice"]))
