"""An example third-party xquant plugin (see README.md).

The components live in :mod:`xquant_example_plugin.plugin`, the module the ``xquant``
entry point names.
"""

__version__ = "0.1.0"
