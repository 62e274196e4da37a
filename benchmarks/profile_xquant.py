"""Profile xquant's MobileNetV2 run (sample config, default settings) with pyinstrument.

Usage::

    python benchmarks/profile_xquant.py [--photos 100] [--top 15] [--output benchmarks/PROFILE.md]

Runs, in a subprocess, the same quantizer process ``benchmarks/run.py`` times
(``benchmarks/quantizers.py xquant-default`` on the MobileNetV2 sample, 100 calibration
photos made as ``run.py`` makes them, ``calibration_step`` 100) under ``python -m pyinstrument -r pstats``, then writes the
top functions by cumulative time (and by own time) to ``benchmarks/PROFILE.md`` together with
the exact command. pyinstrument is a sampling profiler: a development tool, not a dependency
of xquant; when it is missing this script installs it into the running interpreter with pip
(say so first).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import functools
import importlib.util
import os
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def ensure_pyinstrument() -> None:
    if importlib.util.find_spec("pyinstrument") is None:
        print(f"installing pyinstrument into {sys.prefix} ({sys.executable} -m pip install pyinstrument)",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "pyinstrument"], check=True)


@functools.lru_cache(maxsize=None)
def _qualnames(filename: str) -> Dict[int, str]:
    """line of each ``def`` -> ``Class.method`` qualified name, for one source file."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    out: Dict[int, str] = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):  # code objects start at the decorator
                    for line in [child.lineno] + [d.lineno for d in child.decorator_list]:
                        out[line] = name
                visit(child, f"{name}." if isinstance(child, ast.ClassDef) else f"{name}.<locals>.")
    visit(tree, "")
    return out


def where(func) -> str:
    """``path:line Class.name`` with the path relative to site-packages or the repository."""
    filename, line, name = func
    if line and filename.endswith(".py"):
        name = _qualnames(filename).get(line, name)
    if "site-packages/" in filename:
        filename = filename.split("site-packages/", 1)[1]
    else:
        try:
            filename = str(Path(filename).relative_to(REPO))
        except ValueError:
            pass
    return f"{filename}:{line} {name}" if line else f"{filename} {name}"


def harness(func) -> bool:
    """Frames of the benchmark harness itself (the quantizer process's own main)."""
    return func[0].endswith("benchmarks/quantizers.py")


def top_rows(stats: pstats.Stats, key: int, top: int, total: float) -> List[str]:
    """``key``: 3 cumulative time, 2 own time (pstats' (cc, nc, tt, ct, callers) tuple)."""
    items = [kv for kv in stats.stats.items() if not harness(kv[0])]
    items = sorted(items, key=lambda kv: kv[1][key], reverse=True)[:top]
    rows = []
    for rank, (func, value) in enumerate(items, 1):
        cum, own = value[3], value[2]
        rows.append(f"| {rank} | `{where(func)}` | {cum:.2f} | {100 * cum / total:.0f} % | {own:.2f} |")
    return rows


def callees(stats: pstats.Stats, parent_suffix: str, parent_name: str, total: float) -> List[str]:
    """Time of each direct callee of one function (``path`` suffix and name), largest first."""
    parents = [f for f in stats.stats if f[0].endswith(parent_suffix) and f[2] == parent_name]
    rows = []
    for func, value in stats.stats.items():
        for caller, edge in value[4].items():
            if caller in parents:
                rows.append((edge[3], func))
    rows.sort(reverse=True)
    return [f"| `{where(func)}` | {cum:.2f} | {100 * cum / total:.0f} % |" for cum, func in rows[:8]
            if cum >= 0.05]


def zoo_stages() -> List[str]:
    """The stage times xquant printed for each zoo model in the last ``benchmarks/zoo.py`` run (its logs)."""
    work = HERE / "material" / "work"
    rows = []
    for log in sorted(work.glob("*/xquant_default.0.log")):
        text = log.read_text(errors="replace").splitlines()
        lines = [line for line in text if line.startswith("xquant: stages:")]
        wrote = [line for line in text if line.startswith("xquant: wrote")]
        if lines:
            seconds = wrote[-1].rsplit(" in ", 1)[-1] if wrote else "?"
            rows.append(f"| {log.parent.name} | {seconds} | {lines[-1].removeprefix('xquant: stages: ')} |")
    if not rows:
        return []
    return [
        "## The zoo models, stage by stage",
        "",
        "From the logs of the last `benchmarks/zoo.py` run (`benchmarks/material/work/*/xquant_default.0.log`: "
        "default settings, analysis on; the quantization time excludes the analysis and the interpreter's start, and includes loading torch, PPQ and onnxsim, about 1.6 s).",
        "",
        "| model | quantization | stages |",
        "|---|---|---|",
        *rows,
        "",
    ]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--output", type=Path, default=HERE / "PROFILE.md")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--photos", type=int, default=100, help="calibration photos, made as benchmarks/run.py makes them")
    args = ap.parse_args(argv)
    ensure_pyinstrument()

    work = Path(tempfile.mkdtemp(prefix="xquant_profile_"))
    sys.path.insert(0, str(HERE))
    import run  # benchmarks/run.py: the photo list it times with

    photo_list = run.calibration_list(args.photos, work)
    prof = work / "xquant.pstats"
    rel = lambda p: os.path.relpath(p, REPO)  # noqa: E731
    cmd = [sys.executable, "-m", "pyinstrument", "-i", "0.001", "-r", "pstats", "-o", str(prof),
           rel(HERE / "quantizers.py"), "xquant-default",
           "--config", "samples/mobilenet_v2/config.json", "--model", "samples/mobilenet_v2/mobilenet_v2.onnx",
           "--list", str(photo_list), "--steps", str(args.steps),
           "--output", str(work / "mobilenet_v2.q.onnx"), "--json", str(work / "record.json")]
    shown = " ".join(shlex.quote(c) for c in [Path(sys.executable).name] + cmd[1:])
    print(f"running: {shown}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=str(REPO), stdout=subprocess.DEVNULL,
                   env={**os.environ, "XQUANT_CACHE_DIR": ""})  # a first run: onnxsim imported and run
    wall = time.perf_counter() - started

    stats = pstats.Stats(str(prof))
    total = max(v[3] for v in stats.stats.values())
    header = ["| # | function | cumulative s | % of run | own s |", "|---|---|---|---|---|"]
    lines = [
        "# Profile: xquant on the MobileNetV2 sample",
        "",
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.uname().machine}, "
        f"{os.cpu_count()} cores; load average at the end {'%.2f %.2f %.2f' % os.getloadavg()}. "
        f"Profiled process wall time {wall:.1f} s (pyinstrument's 1 ms sampling adds overhead), "
        f"profiled time {total:.1f} s.",
        "",
        "Command (from the repository root; produced by `python benchmarks/profile_xquant.py`):",
        "",
        "```sh",
        shown,
        "```",
        "",
        "The same process `benchmarks/run.py` times: sample config (`default` calibration, "
        f"`finetune_level` 1, analysis on), `calibration_step` {args.steps} over {args.photos} listed photos "
        "(the sample's 40, their mirror images, their centre crops: `benchmarks/run.py --photos`), torch 1 "
        "thread on the main thread (histograms are counted on a second one, which pyinstrument does not "
        "sample). pyinstrument samples wall-clock stacks, "
        "so time spent waiting (I/O, native code) counts too. The harness's own frames "
        "(`benchmarks/quantizers.py`: `<module>`, `main`, `run_xquant`) are left out of the tables.",
        "",
        f"## Top {args.top} functions by cumulative time",
        "",
        *header,
        *top_rows(stats, 3, args.top, total),
        "",
        "## Where the pipeline's time goes (direct callees)",
        "",
        "`xquant_core/pipeline.py` `_run` (`run` after the inputs are checked and the libraries loaded):",
        "",
        "| callee | s | % of run |",
        "|---|---|---|",
        *callees(stats, "xquant_core/pipeline.py", "_run", total),
        "",
        "`xquant_core/engine/core.py` `_quantize`:",
        "",
        "| callee | s | % of run |",
        "|---|---|---|",
        *callees(stats, "xquant_core/engine/core.py", "_quantize", total),
        "",
        "`xquant_core/engine/calibrate.py` `ActivationCalibration.run`:",
        "",
        "| callee | s | % of run |",
        "|---|---|---|",
        *callees(stats, "xquant_core/engine/calibrate.py", "run", total),
        "",
        f"## Top {args.top} functions by own time",
        "",
        *header,
        *top_rows(stats, 2, args.top, total),
        "",
        *zoo_stages(),
    ]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
