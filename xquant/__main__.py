"""``python -m xquant``: the same command line as ``xquant``."""

from xquant_core.cli import entry

entry()
