"""The command line: quantize, check, plugins, and the commands plugins add (init, compare).

``xquant -c cfg.json [-i in.onnx] [-o out.onnx] [--summary-json S.json]``, ``xquant check`` and
``xquant plugins`` are the core's; ``xquant NAME ...`` runs the command a plugin registered as
NAME (:class:`xquant_core.commands.Command`; built-ins ``init`` and ``compare``).

Exit codes: 0 ok, 1 quantization failed, 2 bad usage/config/input/plugin,
3 internal error (a bug: the log file has the traceback), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); an interrupted run writes nothing, or says which files it had written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ._version import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, XQuantError

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


#: the core's own commands (a plugin cannot register these names)
CORE_COMMANDS = ("plugins", "check")


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    """The parser of the core's command line; ``commands``: the plugins' commands, listed in the help."""
    commands = commands or {}
    listed = "".join(f"  {command.summary}\n" for _, command in sorted(commands.items()))
    parser = argparse.ArgumentParser(
        prog="xquant",
        description="Post-training INT8 quantization of ONNX models for SpacemiT chips, from an "
        "XQuant-compatible JSON config.",
        epilog="commands:\n  (none)    quantize the model the config describes (needs -c)\n"
        "  check     check the config, the model, every calibration sample and the output path\n"
        "            without quantizing (needs -c)\n"
        f"{listed}"
        "  plugins   list the installed plugins and the names they register\n"
        "  (xquant COMMAND --help: a plugin command's options)\n\n"
        "environment:\n"
        "  XQUANT_NUM_THREADS=N          threads of the onnxruntime sessions that measure (default: half\n"
        "                                the cores); the model is the same bytes at any N\n"
        "  XQUANT_CACHE_DIR=DIR          where onnxsim's results are kept between runs (default\n"
        "                                ~/.cache/xquant); empty: keep none\n"
        "  XQUANT_DISABLE_PLUGIN_AUTOLOAD=1  the built-in plugins only\n\n"
        "exit codes: 0 ok, 1 quantization failed, 2 bad usage/config/input, 3 internal error, "
        "130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=[*CORE_COMMANDS, *sorted(commands)], help=argparse.SUPPRESS)
    parser.add_argument("models", nargs="*", help=argparse.SUPPRESS)  # only to say they are unexpected
    parser.add_argument("-c", "--config", help="the JSON config file")
    parser.add_argument("-i", "--input", help="float ONNX model (overrides model_parameters.onnx_model)")
    parser.add_argument("-o", "--output", help="output model path (overrides <working_dir>/<output_prefix>.onnx)")
    parser.add_argument(
        "--summary-json",
        metavar="PATH",
        help="also write the run's summary figures (outputs' SNR, the report's verdict and "
        "measured candidates, stage times) to PATH as JSON",
    )
    _common_options(parser)
    parser.add_argument("--version", action="version", version=f"xquant {__version__}")
    return parser


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def _plugin_commands(argv: list[str]) -> dict:
    """The plugins' commands when the command line may name one (or asks for help), else none:
    ``xquant -c cfg.json`` loads its plugins later, with the config."""
    if not argv or (argv[0].startswith("-") and not {"-h", "--help"} & set(argv)) or argv[0] in CORE_COMMANDS:
        return {}
    from .errors import PluginError
    from .plugins import registry

    commands = registry("command")
    for name in set(commands.names()) & set(CORE_COMMANDS):
        plugin = commands.entries[name].plugin
        raise PluginError(f"plugin '{plugin}' registers command '{name}', a name of the core's own commands")
    return {name: commands.get(name) for name in commands.names()}


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


def cmd_quantize(args) -> int:
    from .config import load_config
    from .outputs import all_or_nothing, check_folder, output_file, write_bytes_atomically

    cfg = load_config(args.config)  # before the pipeline's imports (onnx: ~0.6 s): a bad config fails fast
    from .pipeline import run

    summary_path = output_file(args.summary_json, "--summary-json") if args.summary_json is not None else None
    also_writes = {}
    if summary_path is not None:  # before the run: a bad path costs no quantization
        check_folder(summary_path, "--summary-json", beside=False)
        also_writes[summary_path] = "the --summary-json file"
    stages = Stages(quiet=args.quiet)
    with all_or_nothing():  # the model, the report and the summary: all written, or none
        result = run(
            cfg, model=args.input, output=args.output, progress=stages, also_writes=also_writes, own_process=True
        )
        if summary_path is not None:
            write_bytes_atomically(summary_path, _summary_json(result, stages))
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
        print(f"xquant: summary figures in {summary_path}")
    return EXIT_OK


def _summary_json(result, stages: Stages) -> bytes:
    """The ``--summary-json`` file's content: the run's figures for scripts."""
    import json

    figures = {
        "model": str(result.output_path),
        "seconds": result.seconds,
        "samples": result.samples,
        "device": result.device,
        "report": str(result.report_path) if result.report_path else None,
        "stages": stages.seconds(),
        "analysis": result.analysis,
    }
    return (json.dumps(figures, indent=2) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        commands = _plugin_commands(argv)
    except XQuantError as exc:  # a plugin that does not load
        print(f"xquant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if argv and argv[0] in commands:
        command = commands[argv[0]]
        command_parser = argparse.ArgumentParser(prog=f"xquant {argv[0]}")
        _common_options(command_parser)
        command.add_arguments(command_parser)
        args = command_parser.parse_args(argv[1:])
        return _guarded(args, lambda: command.run(args))
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    return _guarded(args, lambda: _core_command(parser, args))


def _core_command(parser: argparse.ArgumentParser, args) -> int:
    if args.command == "plugins":
        return cmd_plugins()
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


def _guarded(args, run) -> int:
    """``run()`` with the CLI's logging, exit codes and error messages (no traceback for the user)."""
    _setup_logging(args.verbose)
    if not args.verbose:
        # OpenCV logs its decoder's complaints (with a timestamp) on stderr before our own
        # message names the unreadable file; show them with -v only
        os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    from .outputs import forget_written, written

    forget_written()
    try:
        return run()
    except XQuantError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"xquant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        what, code = (
            ("terminated", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("interrupted", EXIT_INTERRUPTED)
        )
        done = written()
        outcome = f"after writing {', '.join(str(path) for path in done)}" if done else "no output was written"
        print(f"xquant: {what}; {outcome}", file=sys.stderr)
        return code
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run stops the same way: nothing half written."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises :class:`Terminated` while the block runs (the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The console script (and ``python -m xquant``): :func:`main` with SIGTERM stopping a run as
    Ctrl-C does (a library caller of :func:`main` keeps its own SIGTERM handling)."""
    with _terminate_as_interrupt():
        code = main()
    # the run is over and has said so: a late Ctrl-C or SIGTERM does not change its exit code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
