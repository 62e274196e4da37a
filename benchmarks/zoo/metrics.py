"""Scores shared by the zoo's models: output error, boxes, masks, CTC decoding, Q/DQ counting.

SNR here is the noise-to-signal power ratio ``sum((q - f)^2) / sum(f^2)`` (lower is better), as
everywhere in xquant; it is summed over all evaluation samples of an output.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import onnx

# ----------------------------------------------------------------------------------------------
# output error


def snr(fp32: Sequence[np.ndarray], quant: Sequence[np.ndarray]) -> float:
    """``sum((q - f)^2) / sum(f^2)`` over all samples of one output (inf when f is all zero)."""
    noise = sum(float(np.sum((np.asarray(q, np.float64) - np.asarray(f, np.float64)) ** 2))
                for f, q in zip(fp32, quant))
    signal = sum(float(np.sum(np.asarray(f, np.float64) ** 2)) for f in fp32)
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))


def cosine(fp32: Sequence[np.ndarray], quant: Sequence[np.ndarray]) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs; for one value per
    sample (a VAD probability), the cosine of the whole sequence (per sample it is always +-1)."""
    if fp32 and all(np.size(f) == 1 for f in fp32):
        fp32, quant = [np.concatenate([np.ravel(f) for f in fp32])], [np.concatenate([np.ravel(q) for q in quant])]
    values = []
    for f, q in zip(fp32, quant):
        f64, q64 = np.ravel(f).astype(np.float64), np.ravel(q).astype(np.float64)
        denom = np.linalg.norm(f64) * np.linalg.norm(q64)
        values.append(float(f64 @ q64 / denom) if denom > 0 else float(np.array_equal(f64, q64)))
    return float(np.mean(values)) if values else float("nan")


def per_output_error(names: Sequence[str], fp32: List[List[np.ndarray]],
                     quant: List[List[np.ndarray]]) -> Dict[str, Tuple[float, float]]:
    """``{output name: (SNR, cosine)}``; ``fp32``/``quant`` are per-sample lists of outputs."""
    return {name: (snr([s[i] for s in fp32], [s[i] for s in quant]),
                   cosine([s[i] for s in fp32], [s[i] for s in quant]))
            for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# boxes


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (x1, y1, x2, y2)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> List[int]:
    """Greedy non-maximum suppression; indices kept, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        best = order.pop(0)
        keep.append(int(best))
        if order:
            ious = iou_matrix(boxes[best:best + 1], boxes[order])[0]
            order = [i for i, v in zip(order, ious) if v < iou_threshold]
    return keep


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                  iou_threshold: float) -> np.ndarray:
    """Indices kept by NMS run separately for each class."""
    keep: List[int] = []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        keep += [int(idx[i]) for i in nms(boxes[idx], scores[idx], iou_threshold)]
    return np.asarray(sorted(keep), dtype=np.int64)


def match_boxes(ref: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray],
                iou_threshold: float = 0.5) -> List[float]:
    """Greedy one-to-one matching of reference boxes to test boxes of the same class.

    ``ref``/``test`` are (boxes [N, 4], classes [N]); returns the IoU of each matched pair
    (a reference box is recalled when it gets a same-class test box with IoU >= threshold).
    """
    (rb, rc), (tb, tc) = ref, test
    ious = iou_matrix(rb, tb)
    if ious.size:
        ious = np.where(rc[:, None] == tc[None, :], ious, 0.0)
    pairs = sorted(((ious[i, j], i, j) for i, j in zip(*np.nonzero(ious >= iou_threshold))), reverse=True)
    matched, used_ref, used_test = [], set(), set()
    for value, i, j in pairs:
        if i not in used_ref and j not in used_test:
            used_ref.add(i)
            used_test.add(j)
            matched.append(float(value))
    return matched


# ----------------------------------------------------------------------------------------------
# masks and decisions


def mask_iou(a: np.ndarray, b: np.ndarray) -> Tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks."""
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def agreement(a: Iterable[bool], b: Iterable[bool]) -> float:
    """Share of equal decisions."""
    a, b = np.asarray(list(a), bool), np.asarray(list(b), bool)
    return float(np.mean(a == b)) if a.size else float("nan")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


# ----------------------------------------------------------------------------------------------
# CTC


def ctc_characters(model: onnx.ModelProto) -> List[str]:
    """rapidocr's character table: the model's ``character`` metadata, one per line
    (``str.splitlines``, as rapidocr reads it), with "blank" prepended and " " appended."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy(probs: np.ndarray, characters: Sequence[str]) -> str:
    """rapidocr's ``CTCLabelDecode`` for one sample [T, C]: argmax, merge repeats, drop blank 0."""
    idx = probs.argmax(axis=-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(characters[i] for i in idx[keep])


# ----------------------------------------------------------------------------------------------
# the quantized graph


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """The graph and, recursively, every subgraph of its If/Loop/Scan nodes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def qdq_count(model: onnx.ModelProto) -> Tuple[int, int]:
    """(QuantizeLinear, DequantizeLinear) node counts, subgraphs included."""
    q = dq = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            q += node.op_type == "QuantizeLinear"
            dq += node.op_type == "DequantizeLinear"
    return q, dq
