"""The command interface: what a plugin implements to add ``xquant <name> ...`` to the command line.

The core runs the model (``xquant -c cfg.json``), ``xquant check`` and ``xquant plugins``; every
other command is a plugin component registered with
:func:`xquant_core.hookspecs.xquant_register_commands` (the built-in ``init`` and ``compare``
live in ``xquant_plugins.commands``). ``xquant NAME ARGS...`` builds a parser for the command
(with ``-v/--verbose`` and ``-q/--quiet`` already on it), lets the command add its arguments,
and runs it with the CLI's exit codes and error handling: raise an
:class:`xquant_core.errors.XQuantError` for bad input, return the exit code otherwise.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod


class Command(ABC):
    """One ``xquant NAME`` command."""

    #: for ``xquant --help``: "NAME ARGS" and, on a line indented by 12 spaces, what it does
    summary: str = ""

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's arguments to its parser (``prog`` is ``xquant NAME``)."""

    @abstractmethod
    def run(self, args: argparse.Namespace) -> int:
        """Run with the parsed arguments; return the exit code (:mod:`xquant_core.errors`)."""
