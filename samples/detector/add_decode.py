"""Build a variant of the detector with YOLOX's box decode inside the graph.

ddddocr's ``common_det.onnx`` ends with the raw head (``dx, dy, log w, log h, obj, cls`` per
anchor); ddddocr decodes it in numpy (``demo_postprocess``). Many YOLOX exports instead carry
the decode in the graph (``decode_in_inference=True``). This script appends exactly that decode
as ONNX nodes (opset 11: Slice, Add, Mul, Exp, Concat), so the sample can show what int8 does to
in-graph post-processing and how ``truncate_var_names`` avoids it:

    head_output [1,3549,6] --Slice--> xy, wh, scores
    xy' = (xy + grid) * stride,  wh' = exp(wh) * stride
    output = Concat(xy', wh', scores)   # [1,3549,6]: cx, cy, w, h in input pixels, obj, cls

The original Transpose output is renamed ``head_output``: the tensor where the decode begins.

Usage: ``python samples/detector/add_decode.py [--src ...common_det.onnx] [--dst ...common_det_decode.onnx]``
(checks the result against ``evaluate.decode``'s numpy decode on a random input).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE.parent / "material" / "detector" / "common_det.onnx"
DEFAULT_DST = HERE / "common_det_decode.onnx"
CUT = "head_output"


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("xquant_sample_detector_evaluate", HERE / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_decode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose output ``output`` is decoded; the raw head becomes ``head_output``."""
    grid, stride = _evaluate_module()._grid()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    (output,) = graph.output
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == output.name:
                node.output[index] = CUT
    inits = {
        "decode_grid": grid[None].astype(np.float32), "decode_stride": stride[None].astype(np.float32),
        "decode_s0": np.array([0], np.int64), "decode_s2": np.array([2], np.int64),
        "decode_s4": np.array([4], np.int64), "decode_s6": np.array([6], np.int64),
        "decode_axis": np.array([2], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in inits.items())
    graph.node.extend([
        helper.make_node("Slice", [CUT, "decode_s0", "decode_s2", "decode_axis"], ["decode_xy"], name="decode_slice_xy"),
        helper.make_node("Slice", [CUT, "decode_s2", "decode_s4", "decode_axis"], ["decode_wh"], name="decode_slice_wh"),
        helper.make_node("Slice", [CUT, "decode_s4", "decode_s6", "decode_axis"], ["decode_scores"],
                         name="decode_slice_scores"),
        helper.make_node("Add", ["decode_xy", "decode_grid"], ["decode_xy_cell"], name="decode_add_grid"),
        helper.make_node("Mul", ["decode_xy_cell", "decode_stride"], ["decode_xy_px"], name="decode_mul_stride_xy"),
        helper.make_node("Exp", ["decode_wh"], ["decode_wh_exp"], name="decode_exp"),
        helper.make_node("Mul", ["decode_wh_exp", "decode_stride"], ["decode_wh_px"], name="decode_mul_stride_wh"),
        helper.make_node("Concat", ["decode_xy_px", "decode_wh_px", "decode_scores"], [output.name], axis=2,
                         name="decode_concat"),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, [1, len(grid), 6]))
    onnx.checker.check_model(out)
    return out


def check(src: Path, dst: Path) -> float:
    """Max |difference| between the decoded graph and the numpy decode of the original's output."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    raw = ort.InferenceSession(str(src)).run(None, {"images": x})[0].reshape(-1, 6).astype(np.float64)
    decoded = ort.InferenceSession(str(dst)).run(None, {"images": x})[0].reshape(-1, 6)
    grid, stride = _evaluate_module()._grid()
    expected = np.concatenate([(raw[:, :2] + grid) * stride, np.exp(raw[:, 2:4]) * stride, raw[:, 4:]], 1)
    return float(np.abs(decoded - expected).max() / max(np.abs(expected).max(), 1.0))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--dst", type=Path, default=DEFAULT_DST)
    args = ap.parse_args(argv)
    if not args.src.is_file():
        print(f"{args.src} missing: run python3 samples/fetch_material.py", file=sys.stderr)
        return 1
    onnx.save(add_decode(onnx.load(str(args.src))), str(args.dst))
    error = check(args.src, args.dst)
    print(f"wrote {args.dst} (decode in the graph; cut at '{CUT}'); relative max error vs numpy decode {error:.2e}")
    return 0 if error < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
