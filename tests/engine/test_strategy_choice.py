"""The calibration strategy choice measures each strategy's exported model with onnxruntime, and
falls back to PPQ's simulation when a model cannot be exported or run."""

from __future__ import annotations

import logging

import numpy as np

import xquant_test_models as models


def _quantize():
    from xquant_core.calibration import CalibrationContext
    from xquant_core.engine import EnginePlan, quantize_graph
    from xquant_core.plugins import registry

    rng = np.random.default_rng(1)
    batches = [{"input": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(12)]
    plan = EnginePlan(algorithm=registry("calibration").get("default"), context=CalibrationContext(0.9999),
                      precision_level=0, finetune_level=1, device="cpu")
    return quantize_graph(models.small_cnn(seed=3), batches, len(batches), registry("platform").get("spacemit"), plan)


def _choice_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration: output SNR")]
    assert len(lines) == 1
    return lines[0]


def _errors(line: str) -> list[float]:
    parts = line.split(": ", 1)[1].split("; keeping")[0].split(", ")
    return [float(part.rsplit(" ", 1)[1]) for part in parts]


def test_onnxruntime_and_ppq_choose_the_same_strategy_and_model(caplog, monkeypatch):
    from xquant_core.engine.calibrate import ActivationCalibration

    caplog.set_level(logging.INFO, logger="xquant.engine")
    by_onnxruntime = _quantize()
    exported_line = _choice_line(caplog)
    caplog.clear()
    monkeypatch.setattr(ActivationCalibration, "_errors_as_exported", lambda self, *args: None)
    by_ppq = _quantize()
    simulated_line = _choice_line(caplog)
    assert exported_line.split("; keeping")[1] == simulated_line.split("; keeping")[1]
    assert by_onnxruntime.SerializeToString() == by_ppq.SerializeToString()
    exported, simulated = _errors(exported_line), _errors(simulated_line)
    assert len(exported) == len(simulated) == 3
    # the same models measured two ways: PPQ simulates what onnxruntime computes, to within rounding
    for a, b in zip(exported, simulated):
        assert abs(a - b) <= 0.25 * max(a, b), (exported, simulated)


def test_a_model_that_cannot_be_exported_is_measured_by_ppq(caplog, monkeypatch):
    from xquant_core.engine import forms

    caplog.set_level(logging.DEBUG, logger="xquant.engine")
    plain = _quantize()
    calls = []

    def fails_during_the_choice(model, original):
        calls.append(1)
        if len(calls) == 1:  # the first strategy's export; the final export goes through
            raise RuntimeError("no export here")
        return restore(model, original)

    restore = forms.restore
    monkeypatch.setattr(forms, "restore", fails_during_the_choice)
    caplog.clear()
    fallback = _quantize()
    assert any("strategy choice by onnxruntime failed (RuntimeError: no export here)" in r.getMessage()
               for r in caplog.records)
    assert fallback.SerializeToString() == plain.SerializeToString()


def test_models_run_two_at_a_time_give_what_each_gives_alone():
    """Three models (the strategy choice's, now that the float model runs beside the range work): a
    pair side by side, the third in two halves of its batches; each model's outputs as if it ran alone.
    One batch: the odd one runs whole."""
    import torch

    from xquant_core.engine.calibrate import _outputs_two_at_a_time
    from xquant_core.engine.common import onnxruntime_outputs

    rng = np.random.default_rng(2)
    batches = [{"input": torch.from_numpy(rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32))} for _ in range(5)]
    three = [models.small_cnn(seed=seed) for seed in (4, 5, 6)]
    for used in (batches, batches[:1]):
        together = _outputs_two_at_a_time(three, used, ["logits"])
        alone = [onnxruntime_outputs(model, used, ["logits"]) for model in three]
        assert len(together) == 3 and all(len(outputs) == len(used) for outputs in together)
        for got, expected in zip(together, alone):
            assert all(torch.equal(g[0], e[0]) for g, e in zip(got, expected))
        assert not torch.equal(together[0][0][0], together[2][0][0])  # three different models
    assert _outputs_two_at_a_time(three, batches, ["no such output"]) == [None, None, None]


def test_batches_in_halves_share_one_session_and_give_what_one_run_gives(monkeypatch):
    """``outputs_on(halves=True)``: both halves run on one onnxruntime session (one made, not two:
    40-75 ms each on the zoo's models), each batch's outputs as a single run gives them."""
    from xquant_core import runtime

    made = []
    real = runtime.onnxruntime_session
    monkeypatch.setattr(runtime, "onnxruntime_session", lambda *a, **k: made.append(1) or real(*a, **k))
    rng = np.random.default_rng(3)
    batches = [{"input": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(5)]
    model = models.small_cnn(seed=7)
    halves = runtime.outputs_on(model, batches, ["logits"], 1, halves=True)
    assert len(made) == 1
    whole = runtime.outputs_on(model, batches, ["logits"], 1)
    assert len(halves) == 5 and all(np.array_equal(a[0], b[0]) for a, b in zip(halves, whole))
    assert not np.array_equal(halves[0][0], halves[1][0])
