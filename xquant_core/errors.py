"""Error types and the exit codes the CLI maps them to.

Every problem a user can fix (config, model, data, plugin) is an :class:`XQuantError`
subclass with exit code 2; a quantization that fails on valid input is a
:class:`QuantizationError` (exit 1). Anything else is a bug (exit 3).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_QUANTIZATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM, as a shell reports it (128 + 15)


class XQuantError(Exception):
    """A problem the user can act on. ``str(err)`` is the full message."""

    exit_code = EXIT_USAGE


class ConfigError(XQuantError):
    """The config is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''} in the config"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


class ModelError(XQuantError):
    """The ONNX model cannot be read or does not fit the config."""


class DataError(XQuantError):
    """Calibration data cannot be found, read or preprocessed."""


class PluginError(XQuantError):
    """A plugin failed to load, or a name is registered twice."""


class QuantizationError(XQuantError):
    """Quantization of a valid model with valid data failed."""

    exit_code = EXIT_QUANTIZATION_FAILED
