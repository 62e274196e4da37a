"""The plugin author's manual: every hook xquant calls.

A plugin is a module (or object) with functions decorated by ``xquant_core.hookimpl``
and named after the hooks below. Declare it in your package's metadata under the
``xquant`` entry-point group::

    [project.entry-points.xquant]
    my_reader = "my_package.xquant_plugin"

xquant's own built-ins (``xquant_plugins``) are declared the same way. Each hook hands
the plugin a ``register`` callable instead of expecting a return value, so xquant knows
which plugin provided each name::

    register(name: str, component: object, *, override: bool = False) -> None

Registering a name that another plugin already registered is an error unless
``override=True`` is passed (then the later plugin wins and ``xquant plugins`` says so).
Hooks run once per process, built-ins first, then third-party plugins sorted by
distribution name. Keep plugin modules light: do not import torch or PPQ at module
level (``xquant --help``, ``xquant plugins`` and config validation must stay fast);
import them inside the component's methods.

The component interfaces are documented in:

- calibration algorithms: :class:`xquant_core.calibration.CalibrationAlgorithm`
- readers: :class:`xquant_core.data.Reader`
- preprocessors: :class:`xquant_core.data.Preprocessor`
- platforms: :class:`xquant_core.platform.Platform`
- auto_precision metrics: :class:`xquant_core.metrics.Metric`
- the report (``analysis_enable``): :class:`xquant_core.reporting.Reporter`
- the precision search (``auto_precision``): :class:`xquant_core.searching.PrecisionSearch`
- command-line commands (``xquant NAME``): :class:`xquant_core.commands.Command`

A component that lacks a method of its interface is refused when its plugin registers it
(:mod:`xquant_core.interfaces` lists the methods).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pluggy

PROJECT = "xquant"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callable every registration hook receives."""

    def __call__(self, name: str, component: Any, *, override: bool = False) -> None: ...


@hookspec
def xquant_register_calibration_algorithms(register: Register) -> None:
    """Register activation calibration algorithms.

    Called once, when a config is validated or a model is quantized. ``component`` must
    implement :class:`xquant_core.calibration.CalibrationAlgorithm`. The registered name
    is what users write in ``calibration_type`` (globally or in ``custom_setting``).
    """


@hookspec
def xquant_register_readers(register: Register) -> None:
    """Register calibration-data readers.

    Called once, when a config is validated or data is loaded. ``component`` must
    implement :class:`xquant_core.data.Reader`. The registered name is what users
    write in ``input_parametres[i].file_type``.
    """


@hookspec
def xquant_register_preprocessors(register: Register) -> None:
    """Register calibration-data preprocessors.

    Called once, when a config is validated or data is loaded. ``component`` must
    implement :class:`xquant_core.data.Preprocessor`. The registered name is what users
    write in ``input_parametres[i].preprocess_file`` (``"file.py:function"`` needs no
    plugin; ``"none"`` is the name used when the field is empty).
    """


@hookspec
def xquant_register_platforms(register: Register) -> None:
    """Register target platforms (quantizer policy + exporter).

    Called once, when a config is validated or a model is quantized. ``component`` must
    implement :class:`xquant_core.platform.Platform`. The registered name is what
    users write in ``quantization_parameters.platform`` (default ``spacemit``).
    """


@hookspec
def xquant_register_metrics(register: Register) -> None:
    """Register metrics for automatic mixed precision.

    Called once, when a config is validated or a model is quantized. ``component`` must
    implement :class:`xquant_core.metrics.Metric`. The registered name is what users write
    in ``auto_precision.target.metric`` (built-ins: ``snr``, ``cosine``); a metric may
    evaluate task accuracy on the plugin's own labelled data.
    """


@hookspec
def xquant_register_reporters(register: Register) -> None:
    """Register the report writer that ``analysis_enable`` runs.

    Called once, when a config is validated or a model is quantized. ``component`` must
    implement :class:`xquant_core.reporting.Reporter`; the pipeline runs the one registered as
    :data:`xquant_core.reporting.REPORTER` (the built-in analysis report; replace it with
    ``override=True``). To add a section to the built-in report, use
    :func:`xquant_report_sections`.
    """


@hookspec
def xquant_register_searchers(register: Register) -> None:
    """Register the precision search that a config's ``auto_precision`` runs.

    Called once, when a config is validated or a model is quantized. ``component`` must
    implement :class:`xquant_core.searching.PrecisionSearch`; the pipeline runs the one
    registered as :data:`xquant_core.searching.SEARCHER` (the built-in; replace it with
    ``override=True``). Its metrics are registered with :func:`xquant_register_metrics`.
    """


@hookspec
def xquant_register_commands(register: Register) -> None:
    """Register commands of the command line: ``xquant NAME ARGS...``.

    Called once, when the command line starts with a name that is not an option. ``component``
    must implement :class:`xquant_core.commands.Command`; the registered name is the word after
    ``xquant`` (built-ins: ``init``, ``compare``; ``check`` and ``plugins`` belong to the core and
    cannot be replaced).
    """


@dataclass(frozen=True)
class ReportContext:
    """What a report-section hook gets (read only: neither model may be changed)."""

    float_model: Any  #: the ``onnx.ModelProto`` that was quantized (after onnxsim)
    quant_model: Any  #: the exported QDQ ``onnx.ModelProto``
    batches: Sequence[Mapping[str, Any]]  #: the calibration batches ``{input: array}`` the report measured
    outputs: Mapping[str, Any]  #: model output name -> its figures (``.snr``, ``.cosine``), as the summary shows
    outputs_on: str  #: what those figures are over, e.g. "20 held-back sample(s)"
    report_path: Path  #: the Markdown file being written


@hookspec
def xquant_report_sections(context: ReportContext) -> list[str]:
    """Add a section to the analysis report (a task metric on your own data, say).

    Called once per report, after the measurement and before the Markdown is written, for every
    plugin that implements it, in plugin order. Return the section's Markdown lines, starting with
    a ``## Heading``, or an empty list. A hook that raises is named in a warning and left out; the
    report and the model are written all the same.
    """
    return []
