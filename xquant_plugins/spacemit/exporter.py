"""QDQ export for the SpacemiT runtime (stock onnxruntime loads the same model).

PPQ's onnxruntime exporter does the graph work (QuantizeLinear/DequantizeLinear pairs
on activations, int8 weight initializers with DequantizeLinear, Relu/Clip removal where
the int8 range already clips). Two things differ for SpacemiT and are handled here:

- activations are *signed* int8 with a zero point; PPQ's exporter only accepts
  asymmetric configs in [0, 255] (uint8), so its exportability check and its choice of
  integer type are replaced while exporting;
- PPQ writes the default opset under the domain name 'ai.onnx', which onnx.checker
  rejects: we write it as '' with opset >= 13, and record the xquant version.
"""

from __future__ import annotations

from xquant_core.engine.backend.compat import import_ppq

import_ppq()  # before any ppq import: makes PPQ importable on current protobuf/onnx

import itertools
import os
import re
import tempfile
from contextlib import contextmanager

import onnx
import torch
from ppq.core import GRAPH_OPSET_ATTRIB, QuantizationProperty, QuantizationVisibility
from ppq.parser import onnxruntime_exporter
from ppq.parser.onnxruntime_exporter import ONNXRUNTIMExporter

import xquant_core

MIN_OPSET = 13
GENERATED_NAME = re.compile(r"PPQ_Variable_\d+")


def _exportable(TQC, bounded_var) -> bool:
    if not TQC.can_export() or TQC.visibility == QuantizationVisibility.INTERNAL:
        return False
    if TQC.num_of_bits == 8:
        return TQC.quant_min >= -128 and TQC.quant_max <= 127
    return TQC.num_of_bits == 32


class SpacemitExporter(ONNXRUNTIMExporter):
    def remove_activation_ops(self, graph):
        """Remove Relu/Clip only where their int8 output range does the clipping.

        PPQ decides by the calibrated range alone; a Relu/Clip that runs in float (kept
        float after calibration, or a model output) must stay, whatever its stale range says.
        """
        from ppq import QuantableOperation, QuantizationStates

        for operation in graph.operations.values():
            if isinstance(operation, QuantableOperation) and operation.type in {"Relu", "Clip"}:
                for config in operation.config.output_quantization_config:
                    if config.state == QuantizationStates.FP32:
                        config._scale = None  # PPQ skips configs without a scale
        return super().remove_activation_ops(graph)

    def infer_qtype(self, config):
        if config.num_of_bits > 8:
            return torch.int32, torch.int32
        if config.policy.has_property(QuantizationProperty.ASYMMETRICAL) and config.quant_min >= 0:
            return torch.uint8, torch.uint8
        return torch.int8, torch.int8


@contextmanager
def _signed_asymmetric_allowed():
    helper = onnxruntime_exporter.QDQHelper
    original = helper.__dict__["TQC_Exportable_Check"]
    helper.TQC_Exportable_Check = staticmethod(_exportable)
    try:
        yield
    finally:
        helper.TQC_Exportable_Check = original


def export_qdq(graph) -> onnx.ModelProto:
    """Export a quantized PPQ graph to an ONNX QDQ ``ModelProto``."""
    original_opset = max(
        (
            opset["version"]
            for opset in graph._detail.get(GRAPH_OPSET_ATTRIB, [])
            if opset.get("domain", "") in ("", "ai.onnx")
        ),
        default=MIN_OPSET,
    )
    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="xquant-export-")
    os.close(handle)
    try:
        with _signed_asymmetric_allowed():
            SpacemitExporter().export(file_path=path, graph=graph.copy(), quantized_param=True, remove_activation=True)
        model = onnx.load(path)
    finally:
        os.unlink(path)

    _name_generated_tensors(model)
    _order_tensors(model)
    opsets: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain in ("", "ai.onnx") else opset.domain
        opsets[domain] = max(opsets.get(domain, 0), opset.version)
    opsets[""] = max(opsets.get("", 0), original_opset, MIN_OPSET)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    model.producer_name = "xquant"
    model.producer_version = xquant_core.__version__
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"xquant_version": xquant_core.__version__, "xquant_platform": "spacemit"})
    return model


def _name_generated_tensors(model: onnx.ModelProto) -> None:
    """Number the tensors PPQ generates (``PPQ_Variable_<n>``) in node order.

    PPQ numbers them by creation, which depends on the order ops were switched to float
    before export: the auto-precision search (ops switched one by one) and the
    custom_setting it emits (all at once) gave the same graph under different names.
    """
    interface = {value.name for value in list(model.graph.input) + list(model.graph.output)}  # kept as is
    names = [name for node in model.graph.node for name in list(node.input) + list(node.output)]
    names += [item.name for field in (model.graph.initializer, model.graph.value_info) for item in field]
    generated = [name for name in dict.fromkeys(names) if GENERATED_NAME.fullmatch(name) and name not in interface]
    fresh = (f"PPQ_Variable_{index}" for index in itertools.count())
    order = {name: next(new for new in fresh if new not in interface) for name in generated}
    for node in model.graph.node:
        node.input[:] = [order.get(name, name) for name in node.input]
        node.output[:] = [order.get(name, name) for name in node.output]
    for field in (model.graph.initializer, model.graph.value_info):
        for item in field:
            item.name = order.get(item.name, item.name)


def _order_tensors(model: onnx.ModelProto) -> None:
    """Write initializers and value_info in node order.

    PPQ lists them in the iteration order of a set of names, which changes with
    PYTHONHASHSEED; ordering them by first use makes the output bytes reproducible.
    """
    position: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in list(node.input) + list(node.output):
            position.setdefault(name, index)
    for field in (model.graph.initializer, model.graph.value_info):
        items = sorted(field, key=lambda item: (position.get(item.name, len(position)), item.name))
        del field[:]
        field.extend(items)
