"""Write ``benchmarks/ZOO.md`` from the per-model result records (``work/<key>/result.json``).

Every model keeps its last record, so rerunning one model (``--models ocr_rec``) rewrites the
report with the other models' earlier figures, each table saying when it was measured; a rerun
with ``--skip-ort`` keeps the model's earlier onnxruntime rows (marked with their date).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from .paths import BENCHMARKS, REPO, WORK

ZOO_MD = BENCHMARKS / "ZOO.md"


def result_path(key: str) -> Path:
    return WORK / key / "result.json"


def save_result(record: Dict) -> None:
    path = result_path(record["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def merge_runs(key: str, runs: List[Dict]) -> List[Dict]:
    """``runs`` plus the previous record's runs of the methods not run this time (in the
    order of :data:`zoo.quantizers.METHODS`)."""
    from .quantizers import METHODS

    path = result_path(key)
    previous = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    by_method = {r["method"]: r for r in previous}
    by_method.update({r["method"]: r for r in runs})
    return [by_method[m] for m in METHODS if m in by_method]


def load_results(keys: List[str]) -> List[Dict]:
    out = []
    for key in keys:
        path = result_path(key)
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


# ----------------------------------------------------------------------------------------------
# the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """HEAD of the repository (read only), with "+ local changes" when the tree is dirty."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}"
    except OSError:
        return "unknown"


def machine() -> Dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": f"{cpu_model()}, {os.cpu_count()} cores{mem}",
            "versions": f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
                        f"onnx {onnx.__version__}, numpy {numpy.__version__}",
            "commit": git_commit()}


# ----------------------------------------------------------------------------------------------
# cells


def wall_cell(run: Dict) -> str:
    walls = run["wall_s"]
    if len(walls) == 1:
        return f"{walls[0]:.1f}"
    return f"{statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}, {len(walls)} runs)"


FLOAT_WARNING = "no Q/DQ node: the model stayed float, its scores mean nothing"


def stayed_float(run: Dict) -> bool:
    return run.get("qdq") == [0, 0]


def status_cell(run: Dict) -> str:
    if (run.get("failure") or "").startswith("not run:"):
        return run["failure"]
    if run.get("failure"):
        return f"exit {run['returncode']}: failed: {run['failure']}"
    if run.get("eval_failure"):
        return f"exit {run['returncode']}; {run['eval_failure']}"
    if stayed_float(run):
        return f"exit {run['returncode']}; {FLOAT_WARNING}"
    return f"exit {run['returncode']}"


def per_output_cell(run: Dict) -> str:
    if "per_output" not in run:
        return "-"
    return "<br>".join(f"`{name}` {snr:.4g} / {cos:.4f}" for name, (snr, cos) in run["per_output"].items())


def rst_to_markdown(text: str) -> str:
    """A module docstring for Markdown: ``x`` -> `x`, :func:`.mod.f` -> `mod.f`."""
    text = re.sub(r":\w+:`\.?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_table(record: Dict) -> List[str]:
    task_keys: List[str] = []
    for run in record["runs"]:
        for k in run.get("task", {}):
            if k not in task_keys:
                task_keys.append(k)
    head = ["quantizer", *task_keys, "per-output SNR / cosine", "Q / DQ nodes", "outputs = FP32",
            "wall s", "peak RSS MiB", "exit / failure"]
    lines = ["| " + " | ".join(_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    for run in record["runs"]:
        ok = "qdq" in run
        method = run["method"] + (f" ({run['date']})" if run.get("date", record["date"]) != record["date"] else "")
        cells = [method, *[run.get("task", {}).get(k, "-") for k in task_keys], per_output_cell(run),
                 f"{run['qdq'][0]} / {run['qdq'][1]}" if ok else "-",
                 ("yes" if run["outputs_equal"] else f"no: {run['outputs']}") if ok else "-",
                 wall_cell(run), f"{run['peak_rss_mib']:.0f}", status_cell(run)]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def headline(record: Dict, method: str) -> str:
    run = next((r for r in record["runs"] if r["method"] == method), None)
    if run is None:
        return "not run"
    if (run.get("failure") or "").startswith("not run:"):
        return run["failure"][:110]
    if run.get("failure"):
        return f"failed: {run['failure'][:90]}"
    if run.get("eval_failure"):
        return run["eval_failure"][:90]
    if stayed_float(run):
        return f"not quantized ({FLOAT_WARNING})"
    value = run.get("task", {}).get(record["headline"], "-")
    return f"{value} (Q/DQ {run['qdq'][0]}/{run['qdq'][1]}, {wall_cell(run)} s)"


# ----------------------------------------------------------------------------------------------
# the document


INTRO = """\
# The model zoo: xquant and onnxruntime beyond classifiers

Generated by `benchmarks/zoo.py`. Six real models that users deploy on SpacemiT chips, fetched from
the package registries (PyPI, npm, Debian; never committed), each quantized to INT8 four ways on the
same calibration inputs and scored against FP32 on held-out inputs (different source files) with
onnxruntime on this CPU:

* **xquant default**: `.venv/bin/xquant -c benchmarks/material/data/<model>/config.json -o OUT.onnx`,
  `XQUANT_NUM_THREADS=1` and `XQUANT_CACHE_DIR=` (no onnxsim result kept from an earlier run);
  the config has default quantization settings and only describes the inputs (the configs are
  written by the benchmark, paths below);
* **xquant + report's #1**: the same, with the `custom_setting` that the default run's analysis
  report recommends (the snippet of its "Next step": the float-fallback candidate it measured
  best) added to the config (`config_report_1.json` beside it), as a user following the report would;
* **ort MinMax / ort Percentile**: `onnxruntime.quantization.quantize_static` (QDQ, per-channel,
  QInt8 activations and weights, `CalibrationMethod.MinMax` / `Percentile`, defaults otherwise) on the
  same preprocessed feeds (a `CalibrationDataReader` over the config's lists; its calibration sessions
  use onnxruntime's default thread count). Models older than opset 13 are converted to opset 13 first
  (quantize_static writes per-channel `DequantizeLinear` nodes with an `axis` attribute that opset 12
  lacks and does not upgrade by itself: onnxruntime then refuses to load its output), then
  `quant_pre_process` runs (its symbolic shape inference is skipped where it fails; the notes under
  each table say what was done).

Wall time and peak RSS are those of the quantizer's own process (the peak: its `VmHWM`, polled
every 20 ms; not `ru_maxrss`, into which Linux carries the benchmark process's own peak at `exec`,
so that every run measured at least ~460 MiB before 2026-12-05), interpreter start
included; for xquant they include its analysis report (on by default). SNR is
`sum((q-f)^2)/sum(f^2)` over all evaluation samples (lower is better), cosine the mean per sample.
Q/DQ nodes are counted in the whole model including If/Loop subgraphs. A memory guard stops a
quantizer when the machine has less than 8 % of its RAM (at least 2 GiB) available (onnxruntime's
Percentile calibrator keeps every intermediate tensor of every sample). The accuracy figures are
deterministic for a given xquant version; the times are not (a shared 2-core machine: another job
may have been running).
"""


def commands(argv: Optional[List[str]]) -> List[str]:
    lines = ["```sh",
             ".venv/bin/python benchmarks/zoo.py --fetch-only         # fetch + build the inputs (idempotent)",
             ".venv/bin/python benchmarks/zoo.py                      # all models, all quantizers",
             ".venv/bin/python benchmarks/zoo.py --models ocr_rec     # one model again (others keep their rows)",
             ".venv/bin/python benchmarks/zoo.py --skip-ort --repeat 3 # xquant only, median of 3 runs",
             "```"]
    if argv is not None:
        lines += ["", f"This report's last run: `{' '.join(['.venv/bin/python', 'benchmarks/zoo.py', *argv])}`"]
    return lines


def model_section(record: Dict) -> List[str]:
    counts = record["counts"]
    lines = [f"## {record['title']}", "",
             f"Measured {record['date']}. Model `{record['model']}` ({record['origin']}). "
             f"Config: `{record['config']}`.", "",
             f"Inputs: {counts['calib']} calibration / {counts['eval']} evaluation samples; "
             f"{record['sources']}.", ""]
    if record.get("about"):
        lines += ["<details><summary>About the model (inputs, outputs, pitfalls)</summary>", "",
                  rst_to_markdown(record["about"]), "", "</details>", ""]
    if record.get("notes"):
        lines += [f"Notes: {record['notes']}", ""]
    lines += model_table(record)
    for run in record["runs"]:
        if run.get("notes"):
            lines += ["", f"{run['method']}: " + "; ".join(run["notes"])]
    for run in record["runs"]:
        if run.get("failure"):
            lines += ["", f"<details><summary>{run['method']}: last lines of its output</summary>", "",
                      "```", *run["tail"], "```", "</details>"]
    return lines + [""]


def summary(records: List[Dict]) -> List[str]:
    from .quantizers import METHODS

    lines = ["| model | metric | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for record in records:
        cells = [record["title"], record["headline"], *[headline(record, m) for m in METHODS]]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def write_report(records: List[Dict], argv: Optional[List[str]] = None) -> Path:
    info = machine()
    lines = [INTRO,
             f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {info['cpu']}; "
             f"{info['versions']}; xquant at {info['commit']}.", "",
             "## Commands", "", *commands(argv), "",
             "## Summary", "", *summary(records), ""]
    for record in records:
        lines += model_section(record)
    ZOO_MD.write_text("\n".join(lines).rstrip() + "\n")
    return ZOO_MD
