"""The command line: quantize, check, init, compare, plugins.

``xquant -c cfg.json [-i in.onnx] [-o out.onnx] [--summary-json S.json]``, ``xquant check``,
``xquant init``, ``xquant compare`` and ``xquant plugins``.

Exit codes: 0 ok, 1 quantization failed, 2 bad usage/config/input/plugin,
3 internal error (a bug: the log file has the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ._version import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_QUANTIZATION_FAILED, EXIT_USAGE, XQuantError

log = logging.getLogger("xquant")
#: where internal-error tracebacks go (one new file per failure); None: the temp folder
LOG_DIR: Path | None = None


def write_error_log(details: str) -> Path:
    """Write a traceback to a new ``xquant-error-*.log``: concurrent failures keep their own logs."""
    handle, name = tempfile.mkstemp(
        prefix="xquant-error-", suffix=".log", dir=str(LOG_DIR) if LOG_DIR is not None else None
    )
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(details)
    return Path(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xquant",
        description="Post-training INT8 quantization of ONNX models for SpacemiT chips, from an "
        "XQuant-compatible JSON config.",
        epilog="commands:\n  (none)    quantize the model the config describes (needs -c)\n"
        "  check     check the config, the model, every calibration sample and the output path\n"
        "            without quantizing (needs -c)\n"
        "  init MODEL.onnx [DATA_DIR] [-o cfg.json]\n"
        "            write a config for the model (and calibration/held-out lists of DATA_DIR)\n"
        "  compare FLOAT.onnx INT8.onnx (-c cfg.json | --data LIST)\n"
        "            INT8 against FP32 on the listed samples: SNR, cosine, max |diff|, top-1\n"
        "  plugins   list the installed plugins and the names they register\n\n"
        "exit codes: 0 ok, 1 quantization failed, 2 bad usage/config/input, 3 internal error, "
        "130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=["plugins", "check", "compare", "init"], help=argparse.SUPPRESS)
    parser.add_argument("models", nargs="*", help=argparse.SUPPRESS)  # compare FLOAT INT8 / init MODEL [DATA_DIR]
    parser.add_argument("-c", "--config", help="the JSON config file")
    parser.add_argument("-i", "--input", help="float ONNX model (overrides model_parameters.onnx_model)")
    parser.add_argument("-o", "--output", help="output model path (overrides <working_dir>/<output_prefix>.onnx)")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="LIST",
        help="compare: a list of samples (npy without -c), one per model input",
    )
    parser.add_argument("--json", action="store_true", help="compare: print the figures as JSON")
    parser.add_argument("--fail-snr", type=float, metavar="X", help="compare: exit 1 when an output's SNR exceeds X")
    parser.add_argument(
        "--summary-json",
        metavar="PATH",
        help="also write the run's summary figures (outputs' SNR, the report's verdict and "
        "measured candidates, stage times) to PATH as JSON",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"xquant {__version__}")
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "xquant: %(levelname)s: %(message)s")
    )
    root = logging.getLogger("xquant")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # PPQ's own warnings are about its internals (e.g. int32 bias "not executable" on
    # its onnxruntime platform, which stock onnxruntime runs fine): show them with -v.
    logging.getLogger("xquant.ppq").setLevel(logging.DEBUG if verbose else logging.ERROR)


class Stages:
    """The run's stages as the user sees them: a tqdm bar per stage on a terminal (kept when done),
    one log line with its time otherwise (CI logs, pipes), nothing with ``-q``; every stage's time
    is kept for the final summary. Called like a progress factory: ``stages(label, total)``."""

    def __init__(self, quiet: bool = False, terminal: bool | None = None):
        self.quiet = quiet
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.times: list[tuple[str, float]] = []

    def __call__(self, label: str, total: int | None) -> _Stage:
        return _Stage(self, label, total)

    def seconds(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for label, seconds in self.times:  # a stage run twice (auto-precision) shows once, summed
            merged[label] = merged.get(label, 0.0) + seconds
        return merged

    def summary(self) -> str:
        return "stages: " + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in self.seconds().items())


class _Stage:
    def __init__(self, owner: Stages, label: str, total: int | None):
        self.owner, self.label, self.started = owner, label, time.perf_counter()
        self.bar = None
        if owner.terminal and not owner.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"xquant {label}", unit="batch", file=sys.stderr, leave=True)

    def update(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        seconds = time.perf_counter() - self.started
        self.owner.times.append((self.label, seconds))
        if self.bar is not None:
            self.bar.close()
        elif not self.owner.quiet and seconds >= 1.0:
            log.info("%s: %.1f s", self.label, seconds)


def cmd_plugins() -> int:
    from .plugins import get_host

    host = get_host()
    for info, provided in host.describe():
        origin = "built-in" if info.builtin else "third-party"
        print(f"{info.name}  ({info.distribution} {info.version}, {origin})")
        for kind, names in provided.items():
            print(f"    {kind}: {', '.join(names)}")
    return EXIT_OK


def cmd_check(args) -> int:
    from .check import check
    from .config import load_config

    cfg = load_config(args.config)
    print(f"xquant: check: config {args.config}: valid")
    for line in check(cfg, model=args.input, output=args.output):
        print(f"xquant: check: {line}")
    return EXIT_OK


def cmd_init(args) -> int:
    from .init_config import write_config

    if not 1 <= len(args.models) <= 2:
        print("xquant: error: init needs the model: xquant init MODEL.onnx [DATA_DIR] [-o cfg.json]", file=sys.stderr)
        return EXIT_USAGE
    for line in write_config(
        args.models[0], args.models[1] if len(args.models) > 1 else None, args.output or "cfg.json"
    ):
        print(f"xquant: init: {line}")
    return EXIT_OK


def cmd_compare(args) -> int:
    import dataclasses
    import json

    from .compare import compare, comparison_config, render

    if len(args.models) != 2:
        print(
            "xquant: error: compare needs two models: xquant compare FLOAT.onnx INT8.onnx (-c cfg.json | --data LIST)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    float_path, int8_path = args.models
    figures, samples = compare(float_path, int8_path, comparison_config(float_path, args.config, args.data))
    if args.json:
        print(json.dumps({"samples": samples, "outputs": [dataclasses.asdict(item) for item in figures]}, indent=1))
    else:
        for line in render(figures, samples):
            print(f"xquant: compare: {line}")
    worst = max(item.snr for item in figures)
    if args.fail_snr is not None and worst > args.fail_snr:
        print(f"xquant: compare: SNR {worst:.5g} is above --fail-snr {args.fail_snr:g}", file=sys.stderr)
        return EXIT_QUANTIZATION_FAILED
    return EXIT_OK


def cmd_quantize(args) -> int:
    import json

    from .config import load_config
    from .outputs import check_folder, write_bytes_atomically

    cfg = load_config(args.config)  # before the pipeline's imports (onnx: ~0.6 s): a bad config fails fast
    from .pipeline import run

    summary_path = Path(args.summary_json) if args.summary_json else None
    also_writes = {}
    if summary_path is not None:  # before the run: a bad path costs no quantization
        check_folder(summary_path)
        also_writes[summary_path] = "the --summary-json file"
    stages = Stages(quiet=args.quiet)
    result = run(cfg, model=args.input, output=args.output, progress=stages, also_writes=also_writes)
    how = (
        f"{result.samples} calibration samples on {result.device}"
        if result.samples
        else "dynamic quantization, no calibration"
    )
    for line in result.summary:
        print(f"xquant: {line}")
    print(f"xquant: wrote {result.output_path} ({how}) in {result.seconds:.1f} s")
    if stages.times:
        print(f"xquant: {stages.summary()}")
    if summary_path is not None:
        figures = {
            "model": str(result.output_path),
            "seconds": result.seconds,
            "samples": result.samples,
            "device": result.device,
            "report": str(result.report_path) if result.report_path else None,
            "stages": stages.seconds(),
            "analysis": result.analysis,
        }
        write_bytes_atomically(summary_path, (json.dumps(figures, indent=2) + "\n").encode("utf-8"))
        print(f"xquant: summary figures in {summary_path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not args.verbose:
        # OpenCV logs its decoder's complaints (with a timestamp) on stderr before our own
        # message names the unreadable file; show them with -v only
        os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    try:
        if args.command == "plugins":
            return cmd_plugins()
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "init":
            return cmd_init(args)
        if args.models:
            parser.print_usage(sys.stderr)
            print(f"xquant: error: unexpected argument(s) {' '.join(args.models)}", file=sys.stderr)
            return EXIT_USAGE
        if not args.config:
            parser.print_usage(sys.stderr)
            what = "to check" if args.command == "check" else "to quantize"
            print(f"xquant: error: -c/--config is required {what}", file=sys.stderr)
            return EXIT_USAGE
        return cmd_check(args) if args.command == "check" else cmd_quantize(args)
    except XQuantError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"xquant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xquant: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        details = traceback.format_exc()
        try:
            where = f"the traceback is in {write_error_log(details)}"
        except OSError:
            where = "run again with --verbose for the traceback"
        if args.verbose:
            print(details, file=sys.stderr)
        print(f"xquant: internal error (this is a bug in xquant, please report it); {where}", file=sys.stderr)
        return EXIT_INTERNAL


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
