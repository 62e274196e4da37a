"""onnxruntime sessions, the thread count and the up-front imports, made one way for every part of xquant."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import onnx

A = TypeVar("A")
B = TypeVar("B")
_pool: ThreadPoolExecutor | None = None


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def in_parallel(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """``(first(), second())``, ``first`` on a second thread while ``second`` runs here when there
    is a second core (onnxruntime and torch kernels release the GIL: two one-thread sessions use
    two cores), in line otherwise. The same results either way: the two must not share state."""
    global _pool
    if cores() < 2 or threading.current_thread().name.startswith("xquant-side"):  # none nested: one side thread
        return first(), second()
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="xquant-side")
    pending = _pool.submit(first)
    try:
        other = second()
    finally:
        result = pending.result()
    return result, other


def in_halves(run: Callable[[list], A], batches: Sequence) -> list[A]:
    """``run`` on the first and on the second half of ``batches`` side by side (:func:`in_parallel`:
    e.g. one onnxruntime session run from two threads, one per core), or once on all of them with
    fewer than two batches or one core; the results in batch order."""
    batches = list(batches)
    if len(batches) < 2 or cores() < 2:
        return [run(batches)]
    half = (len(batches) + 1) // 2
    return list(in_parallel(functools.partial(run, batches[:half]), functools.partial(run, batches[half:])))


def num_threads() -> int:
    """Threads for the onnxruntime sessions that measure (the final check, the analysis report):
    ``XQUANT_NUM_THREADS``, else half the cores. What the model is built from runs on one thread
    (:data:`xquant_core.engine.backend.tensors.TORCH_THREADS`), so the result does not depend on this.

    torch's OpenMP kernels and onnxruntime's spinning threads slow down by 10x or more when
    they compete with other processes for every core (measured on a 2-core machine: a 1x1
    conv took 30 ms with 2 threads beside one busy process, 0.2 ms with 1 thread), so by
    default half of the cores stay free.
    """
    configured = os.environ.get("XQUANT_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, cores() // 2)


def onnxruntime_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    threads: int | None = None,
    fused: bool = False,
    low_memory: bool = False,
):
    """A CPU onnxruntime session: quiet (errors are raised, not logged), no telemetry, no spinning
    threads, and by default in exact int8 arithmetic.

    Exact: graph optimizations at the basic level, so every DequantizeLinear -> op -> QuantizeLinear
    runs as written (int8 values dequantized, the op in float32, requantized), which is what
    the chip computes with int32 accumulation. At the default (``fused=True``) onnxruntime fuses
    them into int8 kernels that on x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 3) use
    VPMADDUBSW, whose 16-bit sums of two u8 x s8 products saturate: measured on such a CPU, the
    MobileNetV2 sample's logits SNR was 0.096 fused against 0.011 exact, BlazeFace's second output
    67 against 0.032, while CPUs with VNNI give the exact figures. xquant measures exactly, so its
    figures do not depend on the CPU; :func:`xquant_core.verify.fused_kernel_gap` tells the user
    when this CPU's fused kernels differ.

    ``low_memory``: no memory arena, so what a run allocates goes back when it ends (for the many
    small sessions of :mod:`xquant_plugins.analysis.segments`, whose arenas would add up).
    """
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: errors come back as exceptions, not as coloured log lines
    options.intra_op_num_threads = threads or num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        options.enable_cpu_mem_arena = False
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    data = os.fspath(data) if isinstance(data, os.PathLike) else data
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def outputs_on(model, batches, names: list[str], threads: int | None = None, halves: bool = False) -> list[list]:
    """``names`` of ``model`` (a ModelProto or its bytes) on each batch ``{input: array}``, one
    session (:func:`onnxruntime_session`); batch entries the model does not take are left out.

    ``halves``: the two halves of the batches run side by side on that one session
    (:func:`in_halves`; onnxruntime's ``run`` may be called from several threads: with one
    intra-op thread each run computes on the core of the thread that calls it, with more they
    share the session's pool). The same outputs, with one session made instead of two (40-75 ms
    for each of the zoo's models)."""
    if not batches:
        return []
    session = onnxruntime_session(model, threads)
    wanted = {value.name for value in session.get_inputs()}

    def run(part: Sequence[dict]) -> list[list]:
        return [session.run(names, {name: value for name, value in batch.items() if name in wanted}) for batch in part]

    if not halves:
        return run(batches)
    return [values for part in in_halves(run, batches) for values in part]


def release_memory() -> None:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps what large numpy arrays and onnxruntime tensors freed in its heap, scattered
    among live blocks, and raises its mmap threshold as they come and go, so a process that has
    run a model at 480x640 keeps its peak memory for good. Trimmed between the report's stages,
    PP-OCRv4 det's report peaked at 1.28 GB instead of 1.41 GB (calibration peaks at 1.18 GB).
    """
    import ctypes

    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols: glibc's, if any
    except (OSError, TypeError):  # no C library to open this way (Windows)
        return
    if trim is not None:
        trim(0)


def import_onnxsim():
    """Import onnxsim and return it, without the sympy it would bring along when nothing else has.

    onnxsim 0.8 imports sympy (0.26 s and 32 MiB of a first run on this machine: a tenth of
    MTCNN O-net's whole run) for one thing: ``onnxsim.model_info`` prints symbolic shapes in the
    summary of onnxsim's command line, and takes ``sympy = None`` when it cannot import it
    (that summary then shows no symbolic shapes, for the life of the process); ``simplify``
    never reads it. So while onnxsim is imported, ``import sympy`` fails; afterwards it works
    again. Left as it is: sympy loaded already, another thread running (it might import sympy
    meanwhile), or an onnxsim that cannot do without sympy (imported again, normally).
    """
    if "sympy" in sys.modules or "onnxsim" in sys.modules or threading.active_count() > 1:
        import onnxsim

        return onnxsim
    sys.modules["sympy"] = None  # ``import sympy`` raises ImportError while it is None
    try:
        import onnxsim
    except ImportError:
        for name in [name for name in sys.modules if name == "onnxsim" or name.startswith("onnxsim.")]:
            del sys.modules[name]
    else:
        return onnxsim
    finally:
        if "sympy" in sys.modules and sys.modules["sympy"] is None:
            del sys.modules["sympy"]
    import onnxsim

    return onnxsim


@contextlib.contextmanager
def libraries_loaded(ppq: bool = True, onnxsim: bool = True, own_process: bool = False) -> Iterator[None]:
    """Import onnxruntime, onnxsim and (``ppq``) PPQ with torch up front, with the garbage collector
    paused, and keep what they made out of collections (``gc.freeze``; nothing is frozen when the
    caller has frozen objects of its own).

    Importing torch, onnxsim and PPQ leaves about a million objects that live to the end of the
    run, and every full collection walked them all: 0.4 s of MTCNN O-net's 3.4 s run (625
    collections), 0.8 s of YOLOv8n's, PPQ's own ``gc.collect()`` around its passes included.
    Frozen, they are skipped (O-net's collections 0.4 -> 0.01 s). The results do not change:
    collections free memory, they compute nothing.

    In a caller's process they are unfrozen when the block ends. ``own_process`` (the command
    line, which exits after the run): they stay frozen, since the collection at interpreter
    exit would walk them again (0.45 s), and onnxsim is left to load unfrozen, since nanobind
    reports its objects as leaked when they are still alive at exit (O-net 3.4 -> 2.7 s); if
    onnxsim is loaded already (the command line called in a process that used it), they are
    unfrozen at the end as for a caller.
    """
    ours = gc.get_freeze_count() == 0
    own_process = own_process and "onnxsim" not in sys.modules
    enabled = gc.isenabled()
    gc.disable()
    try:
        import onnxruntime  # noqa: F401

        from .engine.backend.compat import import_ppq

        if ppq:
            import_ppq()
        if onnxsim and not own_process:
            with contextlib.suppress(Exception):  # model.simplify names a broken onnxsim itself
                import_onnxsim()
        if ours:
            gc.freeze()
    finally:
        if enabled:
            gc.enable()
    try:
        yield
    finally:
        if ours and not own_process:
            gc.unfreeze()
