"""Run the quantizers in subprocesses and measure them: exit code, wall time, peak RSS, log.

* xquant: ``.venv/bin/xquant -c CONFIG -o OUT.onnx`` with ``XQUANT_NUM_THREADS=1`` and the onnxsim
  cache off (the config is the model's, default settings);
* xquant + report's #1: the same with the ``custom_setting`` that the default run's analysis
  report recommends (its "Next step" snippet) added to the config, as a user following the
  report would;
* onnxruntime: ``benchmarks/zoo/ort_worker.py KEY {minmax,percentile} OUT.onnx`` (same feeds).

Peak RSS is the child's own high-water mark (``VmHWM`` of ``/proc/PID/status``, polled every
20 ms; ``ru_maxrss`` from ``os.wait4`` where /proc is missing). Not ``ru_maxrss`` alone: Linux
carries the parent's high-water mark into it at ``exec`` (``setmax_mm_hiwater_rss``), so every
child of this ~460 MB benchmark process measured at least that much, the small models' runs
(xquant's and onnxruntime's alike) all 462 MiB. A :class:`MemoryGuard` stops a child before the
machine runs out of memory. A quantizer that fails gives a :class:`Run` with its one-line reason; nothing raises.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .common import Bench
from .paths import REPO, VENV_PYTHON, WORK, XQUANT, ZOO

METHODS = ("xquant default", "xquant + report's #1", "ort MinMax", "ort Percentile")
FOLLOW_REPORT = METHODS[1]
TAIL_LINES = 12


@dataclasses.dataclass
class Run:
    """One quantizer run."""

    method: str
    output: Path
    command: List[str]
    returncode: int
    wall_s: float
    peak_rss_mib: float
    log: Path
    failure: Optional[str] = None
    tail: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.output.is_file()


MEMORY_ERRORS = ("MemoryError", "Failed to allocate memory", "std::bad_alloc", "Cannot allocate memory")


def mem_available_bytes() -> int:
    """The kernel's MemAvailable (what can still be allocated without swapping or OOM)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def memory_reserve_bytes() -> int:
    """What the guard keeps free for the rest of the machine: 8 % of the RAM, at least 2 GiB."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(int(0.08 * total), 2 << 30)


class MemoryGuard(threading.Thread):
    """Kills one child process (by its pid) when the machine is about to run out of memory.

    onnxruntime's Percentile calibrator keeps every intermediate tensor of every calibration
    sample in memory (PP-OCRv4 det, 48 photos at 480x640: past 23 GB RSS); left alone, the kernel's
    out-of-memory killer ends it, or another process on the shared machine. The guard polls
    MemAvailable every 0.2 s and stops the child first; an address-space limit would be no good,
    as it fails runs whose address space exceeds it while their RSS would fit.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.reserve = pid, memory_reserve_bytes()
        self.done = threading.Event()
        self.tripped: Optional[str] = None
        self.peak_kib: Optional[int] = None  # the child's VmHWM, last seen

    def _read_peak(self) -> None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib = int(line.split()[1])
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        while not self.done.wait(0.02):
            self._read_peak()
            available = mem_available_bytes()
            if available < self.reserve:
                self.tripped = (f"stopped by the benchmark's memory guard: the machine had "
                                f"{available / 2 ** 30:.1f} GiB available left")
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return


@dataclasses.dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_rss_mib: float
    guard: Optional[str]  # why the memory guard stopped it, if it did


# xquant as on a first run: one thread (issue 10's bytes), no onnxsim result kept from an earlier
# run (the cache would spare re-runs onnxsim; onnxruntime keeps nothing between runs either)
XQUANT_ENV = {"XQUANT_NUM_THREADS": "1", "XQUANT_CACHE_DIR": ""}


def run_process(cmd: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None) -> Measured:
    """Run ``cmd`` (stdout+stderr to ``log``) under the memory guard and measure it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        child = subprocess.Popen(list(cmd), stdout=stream, stderr=subprocess.STDOUT, cwd=str(REPO),
                                 env=dict(os.environ, **(env or {})))
        guard = MemoryGuard(child.pid)
        guard.start()
        _, status, usage = os.wait4(child.pid, 0)
        guard.done.set()
        guard.join()
    peak_kib = guard.peak_kib if guard.peak_kib is not None else usage.ru_maxrss
    return Measured(os.waitstatus_to_exitcode(status), time.perf_counter() - started,
                    peak_kib / 1024.0, guard.tripped)


_EXCEPTION = re.compile(r"^[A-Za-z_.]*(Error|Exception|Fail\w*)\b.*")


def failure_line(lines: List[str], returncode: int) -> str:
    """The one line that says why a run failed: the signal that killed it, or the error line
    (:func:`_last_error`), prefixed when it is an allocation failure under the memory cap."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return f"killed by {name}" + (" (the out-of-memory killer?)" if name == "SIGKILL" else "")
    if any(marker in line for line in lines for marker in MEMORY_ERRORS):
        return "out of memory: " + _last_error(lines)
    return _last_error(lines, returncode)


def _last_error(lines: List[str], returncode: int = 1) -> str:
    """xquant's ``xquant: error:`` line, else the last exception line of a traceback, else the
    last line."""
    for line in reversed(lines):
        if line.startswith("xquant: error:"):
            return line[len("xquant: error:"):].strip()
    for line in reversed(lines):
        if _EXCEPTION.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else f"exit code {returncode}"


def notes(lines: List[str]) -> List[str]:
    """What a run says about its choices: the worker's ``zoo:`` lines (opset upgrade,
    quant_pre_process) and xquant's calibration-strategy line."""
    out = [ln[len("zoo: "):] for ln in lines if ln.startswith("zoo: ")]
    out += [ln.split("INFO: ", 1)[1] for ln in lines if ln.startswith("xquant: INFO: calibration: output SNR")]
    return out


def _finish(method: str, output: Path, cmd: List[str], log: Path, env=None) -> Run:
    if output.exists():
        output.unlink()
    measured = run_process(cmd, log, env)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    run = Run(method, output, cmd, measured.returncode, measured.wall_s, measured.peak_rss_mib, log,
              tail=lines[-TAIL_LINES:], notes=notes(lines))
    if measured.guard:
        run.failure = f"{measured.guard} (peak RSS {measured.peak_rss_mib / 1024:.1f} GiB)"
    elif not run.ok:
        run.failure = failure_line(lines, run.returncode) if run.returncode != 0 else "no output model written"
    return run


def report_snippet(report: Path) -> Optional[list]:
    """The ``custom_setting`` of the report's "Next step" (its first JSON block there), or None."""
    if not report.is_file():
        return None
    text = report.read_text(encoding="utf-8").split("## Next step", 1)[-1]
    match = re.search(r"```json\n(.*?)\n```", text, re.DOTALL)
    return json.loads("{" + match.group(1) + "}")["custom_setting"] if match else None


def quantize(bench: Bench, method: str, attempt: int, ort_pre_process: bool = True) -> Run:
    """Run one method on one model; files go to ``benchmarks/material/work/<key>/``."""
    folder = WORK / bench.key
    slug = method.replace(" ", "_").lower()
    output = folder / f"{bench.key}.{slug}.onnx"
    log = folder / f"{slug}.{attempt}.log"
    if method == "xquant default":
        cmd = [str(XQUANT), "-c", str(bench.config_path), "-o", str(output)]
        return _finish(method, output, cmd, log, env=XQUANT_ENV)
    if method == FOLLOW_REPORT:
        report = folder / f"{bench.key}.xquant_default_report.md"
        snippet = report_snippet(report)
        if snippet is None:
            return Run(method, output, [], 1, 0.0, 0.0, log,
                       failure=f"not run: the default run's report ({report.name}) recommends no custom_setting")
        config = json.loads(bench.config_path.read_text())
        config["quantization_parameters"]["custom_setting"] = snippet
        config["quantization_parameters"]["analysis_enable"] = False
        followed = bench.folder / "config_report_1.json"  # beside the config: its relative paths hold
        followed.write_text(json.dumps(config, indent=2) + "\n")
        cmd = [str(XQUANT), "-c", str(followed), "-o", str(output)]
        run = _finish(method, output, cmd, log, env=XQUANT_ENV)
        run.notes.insert(0, f"the report's custom_setting: `{json.dumps(snippet)}`")
        return run
    cmd = [str(VENV_PYTHON), str(ZOO / "ort_worker.py"), bench.key, method.split()[1].lower(), str(output)]
    if not ort_pre_process:
        cmd.append("--no-pre-process")
    return _finish(method, output, cmd, log)
