"""The built-in commands beyond quantizing: ``xquant init`` (a config to start from) and ``xquant compare``.

Registered like a third party's (:class:`xquant_core.commands.Command`). This module stays light:
``init.py`` and ``compare.py`` (onnx, numpy, onnxruntime) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from xquant_core import hookimpl
from xquant_core.commands import Command
from xquant_core.errors import EXIT_OK, EXIT_QUANTIZATION_FAILED, EXIT_USAGE


class Init(Command):
    summary = (
        "init MODEL.onnx [DATA_DIR] [-o cfg.json]\n"
        "            write a config for the model (and calibration/held-out lists of DATA_DIR)"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("models", nargs="*", metavar="MODEL.onnx [DATA_DIR]")
        parser.add_argument("-o", "--output", help="the config to write (default cfg.json)")

    def run(self, args: argparse.Namespace) -> int:
        from .init import write_config

        if not 1 <= len(args.models) <= 2:
            what = "needs the model" if not args.models else f"takes at most two paths, got {len(args.models)}"
            print(f"xquant: error: init {what}: xquant init MODEL.onnx [DATA_DIR] [-o cfg.json]", file=sys.stderr)
            return EXIT_USAGE
        data_dir = args.models[1] if len(args.models) > 1 else None
        for line in write_config(args.models[0], data_dir, args.output or "cfg.json"):
            print(f"xquant: init: {line}")
        return EXIT_OK


class Compare(Command):
    summary = (
        "compare FLOAT.onnx INT8.onnx (-c cfg.json | --data LIST)\n"
        "            INT8 against FP32 on the listed samples: SNR, cosine, max |diff|, top-1"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("models", nargs="*", metavar="FLOAT.onnx INT8.onnx")
        parser.add_argument("-c", "--config", help="the JSON config whose inputs and preprocessing to use")
        parser.add_argument(
            "--data",
            action="append",
            default=[],
            metavar="LIST",
            help="a list of samples (npy without -c), one per model input",
        )
        parser.add_argument("--json", action="store_true", help="print the figures as JSON")
        parser.add_argument(
            "--fail-snr", type=_threshold, metavar="X", help="exit 1 when an output's SNR exceeds X (or is NaN)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from .compare import compare, comparison_config, render

        if len(args.models) != 2:
            print(
                "xquant: error: compare needs two models: "
                "xquant compare FLOAT.onnx INT8.onnx (-c cfg.json | --data LIST)",
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
        if args.fail_snr is not None and not worst <= args.fail_snr:  # a NaN SNR fails the gate too
            print(f"xquant: compare: SNR {worst:.5g} is above --fail-snr {args.fail_snr:g}", file=sys.stderr)
            return EXIT_QUANTIZATION_FAILED
        return EXIT_OK


def _threshold(text: str) -> float:
    """``--fail-snr``: a finite number >= 0 (``nan`` made a gate that never fails)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


@hookimpl
def xquant_register_commands(register):
    register("init", Init())
    register("compare", Compare())
