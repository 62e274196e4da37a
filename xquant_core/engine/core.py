"""Quantize one graph: parse, dispatch, calibrate, fine-tune, export.

``quantize_graph`` takes a float ONNX model, calibration batches and a platform and
returns the quantized ``onnx.ModelProto``. The steps:

1. parse the model into PPQ's IR (in the forms of :mod:`.forms`) and format it (constants
   folded into parameters, BatchNorm merged into Conv);
2. dispatch: ops the platform quantizes go to INT8, the rest (and what
   ``precision_level`` or the platform keeps in float) to FP32;
3. the platform's quantizer creates the tensor quantization configs;
4. the pass sequence, :data:`PASSES` (data: a platform may return its own from a ``passes``
   method): activation fusion, the platform tying the configs of shape ops to their inputs,
   weights by min/max, activations by the configured calibration algorithm (:mod:`.calibrate`),
   the platform's policy on calibrated ranges, biases, optional fine-tuning and bias correction
   (:mod:`.finetune`), the platform's last fixes;
5. ops kept float after calibration, then export (or the auto-precision search of
   :mod:`.search`), back in the model's own forms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from ..errors import ModelError
from . import forms
from .backend import ppq_ir, tensors
from .backend.compat import import_ppq
from .calibrate import ActivationCalibration
from .common import Batches
from .equalize import equalize_depthwise_pairs
from .finetune import correct_bias, fine_tune_worst_layers
from .plan import EnginePlan, SubgraphOverride
from .search import FloatOpSearch

log = logging.getLogger("xquant.engine")


class FloatTrial:
    """A quantized graph kept after its export, to export it again with one subgraph in float.

    What the report's "Next step" measures: the subgraph as a ``custom_setting`` with
    ``precision_level: 3`` and ``float_after_calibration: true`` would give (the same
    calibration, those ops' weights and outputs float), at the cost of an export.
    """

    def __init__(self, graph, export: Callable[[], Any]):
        self._graph, self._export = graph, export

    def ops_between(self, input_names: Iterable[str], output_names: Iterable[str]) -> set[str]:
        """The ops a ``custom_setting`` with these boundaries covers (names of the float model's nodes)."""
        override = SubgraphOverride(index=-1, input_names=tuple(input_names), output_names=tuple(output_names))
        return resolve_overrides(self._graph, [override])[0][1]

    def exported_with_float(self, input_names: Iterable[str], output_names: Iterable[str]):
        """The exported ``onnx.ModelProto`` with the ops between these tensors in float."""
        undo = ppq_ir.keep_float(self._graph, self.ops_between(input_names, output_names))
        try:
            return self._export()
        finally:
            undo()


def quantize_graph(
    model,
    batches: Iterable[dict[str, np.ndarray]],
    num_batches: int,
    platform: Any,
    plan: EnginePlan,
    progress: Callable[[str, int], Any] | None = None,
    search: FloatOpSearch | None = None,
    keep_graph: bool = False,
):
    """Quantize ``model`` (an ``onnx.ModelProto``) and return the exported ``onnx.ModelProto``.

    With ``search``, return its :class:`SearchResult` (which holds the exported model); with
    ``keep_graph``, ``(exported model, FloatTrial)``.
    """
    import_ppq()
    with tensors.seeded_fixed_threads(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ppq\.")  # torch's notes on PPQ's indexing
        return _quantize(model, batches, num_batches, platform, plan, progress, search, keep_graph)


def _quantize(model, batches, num_batches, platform, plan, progress, search=None, keep_graph=False):
    def feeds_of(data):
        def feeds() -> Iterable[dict[str, Any]]:
            for batch in data:
                yield {name: tensors.to_tensor(array, plan.device) for name, array in batch.items()}

        return feeds

    feeds = feeds_of(batches)
    run = _prepared(model, feeds, num_batches, platform, plan, progress)
    for step in _passes(platform):
        (step if callable(step) else PASS_STEPS[step])(run)
    graph, executor, regions = run.graph, run.executor, run.regions
    # the all-INT8 model, for a search that starts with ops already in float to compare against
    plain = forms.restore(platform.export(graph), model) if search is not None and search.already_float else None
    ppq_ir.keep_float(
        graph,
        {
            name
            for override, ops in regions
            if override.precision_level == 3 and override.float_after_calibration
            for name in ops
        },
    )

    def export():
        return forms.restore(platform.export(graph), model)

    if search is not None:
        return search.run(graph, executor, plan.device, export=export, plain=plain, progress=progress)
    return (export(), FloatTrial(graph, export)) if keep_graph else export()


@dataclasses.dataclass
class PassRun:
    """What every pass works on: the dispatched graph, its executor and the run's settings. A
    platform's own pass (:func:`_passes`) gets it too."""

    model: Any  #: the float ``onnx.ModelProto``
    graph: Any  #: PPQ's graph, dispatched, its ops' quantization configs created
    executor: Any  #: PPQ's ``TorchExecutor`` on the graph
    quantizer: Any  #: the platform's PPQ quantizer
    platform: Any
    plan: EnginePlan
    regions: list  #: the custom_setting regions (:func:`resolve_overrides`)
    feeds: Callable[[], Iterable[dict[str, Any]]]  #: the calibration batches as torch tensors, again each call
    num_batches: int
    progress: Callable[[str, int | None], Any] | None

    def apply(self, ppq_pass, data=None) -> None:
        """Run a PPQ optimization pass on the calibration batches (its prints to the debug log)."""
        data = Batches(self.feeds, self.num_batches) if data is None else data
        with _ppq_output_to_log():
            ppq_pass.optimize(
                graph=self.graph, dataloader=data, executor=self.executor, calib_steps=len(data), collate_fn=None
            )


def _prepared(model, feeds, num_batches, platform, plan, progress) -> PassRun:
    """Parse, equalize, dispatch and give the platform's quantizer each INT8 op.

    No general cross-layer equalization (only between a depthwise Conv and the Conv that alone
    reads it, :mod:`.equalize`): it balances weight ranges across channels, which per-channel
    weights do not need, and moves range into the activations. On held-out inputs it hurt the
    MobileNetV2 sample (logits SNR 0.0111 without, 0.0127 with), EfficientNet-Lite0 (0.0049 /
    0.0075), MTCNN O-net (box SNR 0.0014 / 0.0043) and PP-OCRv4's recogniser (68 / 62 % of
    strings read alike), made no difference on YOLOv8n and the ddddocr detector, and helped
    BlazeFace only (its outputs 0.0023 / 0.055 / 0.0043 / 0.0175 without, 0.0020 / 0.042 /
    0.0038 / 0.0047 with).
    """
    graph = ppq_ir.load_graph(model)
    if plan.finetune_level >= 1:
        equalize_depthwise_pairs(graph)
    quantizer = platform.create_quantizer(graph)
    regions = resolve_overrides(graph, plan.overrides)
    ppq_ir.dispatch(
        graph, quantizer.quant_operation_types, plan.precision_level, _levels(regions), platform
    )  # fmt: skip
    executor = ppq_ir.executor_for(graph, quantizer, plan.device, next(iter(feeds())))
    return PassRun(model, graph, executor, quantizer, platform, plan, regions, feeds, num_batches, progress)


def _fuse_activations(run: PassRun) -> None:
    fusion = ppq_ir.ppq_pass(
        "QuantizeFusionPass", activation_type=run.quantizer.activation_fusion_types, fuse_activation=True,
        fuse_passive_op=False,
    )  # fmt: skip
    run.apply(fusion)


def _calibrate(run: PassRun) -> None:
    """Activation ranges through the calibration plugin; at finetune_level 1 the bias correction
    is measured in the same pass."""
    plan = run.plan
    with ppq_ir.fast_fake_quant(run.graph, run.executor):
        ActivationCalibration(
            plan, run.regions, correct_bias=plan.finetune_level == 1, float_model=run.model,
            export=lambda: forms.restore(run.platform.export(run.graph), run.model),
        ).run(run.graph, run.executor, run.feeds, run.num_batches, run.progress)  # fmt: skip


def _fine_tune(run: PassRun) -> None:
    if run.plan.finetune_level >= 2:
        bar = run.progress("fine-tuning", None) if run.progress else None
        fine_tune_worst_layers(run.graph, run.executor, run.feeds, run.plan, run.apply)
        if bar is not None:
            bar.close()


def _correct_bias(run: PassRun) -> None:
    if run.plan.finetune_level >= 2:  # fine-tuning moved the weights: measure their bias shifts again
        with ppq_ir.fast_fake_quant(run.graph, run.executor):
            correct_bias(run.graph, run.executor, run.feeds, progress=run.progress)


#: the passes over the dispatched graph, by name, in the order :data:`PASSES` runs them
PASS_STEPS: dict[str, Callable[[PassRun], None]] = {
    "fuse activations": _fuse_activations,
    "simplify quantization": lambda run: run.apply(ppq_ir.ppq_pass("QuantizeSimplifyPass")),
    "share quantization": lambda run: run.platform.share_quantization(run.graph),
    "quantize weights": lambda run: run.apply(ppq_ir.ppq_pass("ParameterQuantizePass")),
    "calibrate activations": _calibrate,
    "after calibration": lambda run: run.platform.after_calibration(run.graph),
    "quantize biases": lambda run: run.apply(ppq_ir.ppq_pass("PassiveParameterQuantizePass")),
    "fine-tune": _fine_tune,
    "correct bias": _correct_bias,
    "finalize": lambda run: run.platform.finalize(run.graph),
}

#: the pass sequence; a platform with a ``passes(default)`` method returns its own (names of
#: :data:`PASS_STEPS` and callables taking a :class:`PassRun`, in order)
PASSES: tuple[str, ...] = tuple(PASS_STEPS)


def _passes(platform) -> list:
    custom = getattr(platform, "passes", None)
    steps = list(custom(PASSES)) if callable(custom) else list(PASSES)
    unknown = [step for step in steps if not callable(step) and step not in PASS_STEPS]
    if unknown:
        raise ValueError(f"platform {type(platform).__name__}: unknown passes {unknown}; known: {list(PASS_STEPS)}")
    return steps


@contextlib.contextmanager
def _ppq_output_to_log():
    """PPQ passes report with print(): keep that out of the user's terminal (debug log)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        text = captured.getvalue().strip()
        if text:
            log.debug("%s", text)


def resolve_overrides(graph, overrides) -> list[tuple[SubgraphOverride, set[str]]]:
    """The ops of each ``custom_setting`` subgraph: the ops on the way up from its outputs that do not
    cross its inputs, and are downstream of them."""
    regions = []
    for override in overrides:
        where = f"$.quantization_parameters.custom_setting[{override.index}]"
        if not override.input_names or not override.output_names:
            raise ModelError(f"{where}: input_names and output_names should be set.")
        for field, names in (("input_names", override.input_names), ("output_names", override.output_names)):
            for name in names:
                if name not in graph.variables:
                    raise ModelError(
                        f"{where}.{field}: var name {name} not in the graph. (Names are those of the "
                        "model after onnxsim; set skip_onnxsim to keep every original name.)"
                    )
        downstream = _reachable(
            {op for name in override.input_names for op in graph.variables[name].dest_ops},
            lambda op: [d for out in op.outputs for d in out.dest_ops],
        )
        boundary = set(override.input_names)  # walking up from the outputs stops at the inputs
        upstream = _reachable(
            {
                graph.variables[name].source_op
                for name in override.output_names
                if graph.variables[name].source_op is not None and name not in boundary
            },
            lambda op, boundary=boundary: [
                v.source_op for v in op.inputs if v.source_op is not None and v.name not in boundary
            ],
        )
        ops = {op.name for op in downstream & upstream}
        if not ops:
            raise ModelError(
                f"{where}: no op lies between input_names {list(override.input_names)} and "
                f"output_names {list(override.output_names)}"
            )
        regions.append((override, ops))
    return regions


def _reachable(start: set, neighbours) -> set:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in neighbours(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _levels(regions) -> dict[str, int]:
    """The precision level of each op a ``custom_setting`` gives one (the last entry wins); a
    subgraph kept float after calibration is quantized now (:func:`.backend.ppq_ir.keep_float` later)."""
    levels: dict[str, int] = {}
    for override, ops in regions:
        if override.precision_level == 3 and override.float_after_calibration:
            continue
        if override.precision_level is not None:
            for name in ops:
                levels[name] = override.precision_level
    return levels
