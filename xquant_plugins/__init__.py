"""xquant's built-in plugins.

Each module here is an ordinary plugin, declared in xquant's own ``pyproject.toml``
under the ``xquant`` entry-point group exactly as a third-party package would declare
its own, and registering its components through the hooks in
:mod:`xquant_core.hookspecs`.
"""
