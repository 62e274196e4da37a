"""Peak memory of a whole ``xquant`` run against the number of calibration samples.

Runs the CLI (``python -m xquant -c cfg.json``) in a subprocess once per sample count on
the MobileNetV2 sample (3x224x224 input, img reader + PT_IMAGENET), with a list that
cycles through the 40 real calibration photos of ``samples/material/calib``, minmax
calibration and ``finetune_level`` 0 to keep it short. The peak resident set size of each
run comes from ``os.wait4`` (the child's own ``ru_maxrss``, Linux: KiB). Prints a Markdown
table; the last column is the ratio to the first row.

Usage::

    python benchmarks/calibration_memory.py [--samples 100 1000] [--analysis] [--finetune-level 0]

Calibration samples are read lazily (``xquant_core.data.CalibrationDataset``, cache
bounded by ``CACHE_BUDGET_BYTES``), so the peak should not grow with the sample count
beyond that cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "samples" / "mobilenet_v2" / "mobilenet_v2.onnx"
CALIB = REPO / "samples" / "material" / "calib"


def write_project(folder: Path, samples: int, analysis: bool, finetune_level: int) -> Path:
    photos = [line.strip() for line in (CALIB / "list.txt").read_text().splitlines() if line.strip()]
    lines = [str((CALIB / photos[index % len(photos)]).resolve()) for index in range(samples)]
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    config = {
        "model_parameters": {"onnx_model": str(MODEL), "working_dir": str(folder), "output_prefix": "out"},
        "calibration_parameters": {
            "calibration_step": samples, "calibration_device": "cpu", "calibration_type": "minmax",
            "input_parametres": [{
                "file_type": "img", "color_format": "rgb", "preprocess_file": "PT_IMAGENET",
                "mean_value": [123.675, 116.28, 103.53], "std_value": [58.395, 57.12, 57.375],
                "data_list_path": "list.txt"}],
        },
        "quantization_parameters": {"analysis_enable": analysis, "finetune_level": finetune_level},
    }
    path = folder / "cfg.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def measure(samples: int, analysis: bool, finetune_level: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one CLI run."""
    with tempfile.TemporaryDirectory(prefix=f"xquant_mem_{samples}_") as tmp:
        config = write_project(Path(tmp), samples, analysis, finetune_level)
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "xquant", "-c", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=tmp, env={**os.environ, "XQUANT_CACHE_DIR": ""})  # as a first run
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            sys.exit(f"xquant failed with exit code {child.returncode} for {samples} samples:\n"
                     f"{output.decode(errors='replace')}")
        return usage.ru_maxrss / 1024.0, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--analysis", action="store_true", help="also write the analysis report")
    parser.add_argument("--finetune-level", type=int, default=0)
    args = parser.parse_args()
    if not MODEL.is_file() or not (CALIB / "list.txt").is_file():
        sys.exit("sample model or material missing: run scripts/setup.sh")

    rows = []
    for samples in args.samples:
        peak, seconds = measure(samples, args.analysis, args.finetune_level)
        rows.append((samples, peak, seconds))
        print(f"{samples} samples: peak RSS {peak:.0f} MiB, {seconds:.1f} s", file=sys.stderr, flush=True)

    print(f"\nMobileNetV2 1x3x224x224, img + PT_IMAGENET, minmax, finetune_level {args.finetune_level}, "
          f"analysis {'on' if args.analysis else 'off'}, {os.cpu_count()} CPUs\n")
    print("| calibration samples | peak RSS (MiB) | wall time (s) | RSS / first row |")
    print("|---:|---:|---:|---:|")
    for samples, peak, seconds in rows:
        print(f"| {samples} | {peak:.0f} | {seconds:.1f} | {peak / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
