"""Grouped bar charts drawn with OpenCV (no matplotlib): one panel per metric, one group per model."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

# BGR colours, one per method, in the order the methods are listed
PALETTE = [(180, 119, 31), (232, 199, 174), (14, 127, 255), (120, 187, 255), (44, 160, 44),
           (40, 39, 214), (189, 103, 148), (75, 86, 140)]
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img, text, org, scale=0.45, color=(30, 30, 30), thickness=1):
    cv2.putText(img, text, org, FONT, scale, color, thickness, cv2.LINE_AA)


def _panel(title: str, groups: Sequence[str], methods: Sequence[str],
           values: Dict[Tuple[str, str], float], fmt: str, size=(560, 330)) -> np.ndarray:
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    _text(img, title, (10, 22), 0.55, thickness=1)
    left, right, top, bottom = 50, w - 10, 40, h - 40
    finite = [v for v in values.values() if v is not None and np.isfinite(v)]
    vmax = max(finite) if finite else 1.0
    vmax = vmax * 1.15 if vmax > 0 else 1.0
    cv2.line(img, (left, bottom), (right, bottom), (0, 0, 0), 1)
    for k in range(5):  # light grid and axis labels
        y = int(bottom - (bottom - top) * k / 4)
        cv2.line(img, (left, y), (right, y), (225, 225, 225), 1)
        tick = vmax * k / 4
        _text(img, f"{tick:.0f}" if vmax >= 20 else f"{tick:.3g}", (4, y + 4), 0.35, (90, 90, 90))
    group_w = (right - left) / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(methods))
    for gi, group in enumerate(groups):
        x0 = left + gi * group_w + group_w * 0.1
        for mi, method in enumerate(methods):
            v = values.get((group, method))
            x = int(x0 + mi * bar_w)
            if v is None or not np.isfinite(v):
                _text(img, "n/a", (x, bottom - 4), 0.3, (0, 0, 200))
                continue
            y = int(bottom - (bottom - top) * v / vmax)
            cv2.rectangle(img, (x, y), (int(x + bar_w) - 2, bottom), PALETTE[mi % len(PALETTE)], -1)
            label = fmt.format(v)
            _text(img, label, (x, y - 3), 0.28, (40, 40, 40))
        _text(img, group, (int(x0), bottom + 18), 0.45)
    return img


def draw(path: Path, groups: Sequence[str], methods: Sequence[str],
         metrics: List[Tuple[str, str, Dict[Tuple[str, str], float]]], footer: str = "") -> None:
    """Write a PNG: ``metrics`` is a list of (title, value format, {(group, method): value})."""
    panels = [_panel(title, groups, methods, values, fmt) for title, fmt, values in metrics]
    if len(panels) % 2:
        panels.append(np.full_like(panels[0], 255))
    rows = [np.hstack(panels[i:i + 2]) for i in range(0, len(panels), 2)]
    body = np.vstack(rows)
    legend_h = 30 + 22 * ((len(methods) + 2) // 3)
    legend = np.full((legend_h, body.shape[1], 3), 255, np.uint8)
    for mi, method in enumerate(methods):
        x, y = 12 + (mi % 3) * (body.shape[1] // 3), 20 + 22 * (mi // 3)
        cv2.rectangle(legend, (x, y - 11), (x + 16, y + 3), PALETTE[mi % len(PALETTE)], -1)
        _text(legend, method, (x + 22, y), 0.45)
    if footer:
        _text(legend, footer, (12, legend_h - 8), 0.38, (90, 90, 90))
    cv2.imwrite(str(path), np.vstack([body, legend]))
