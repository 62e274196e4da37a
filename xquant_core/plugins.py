"""The plugin host: loads plugins from entry points and keeps the name registries.

Plugins are found in the ``xquant`` entry-point group. xquant's own built-ins are
declared there too (see ``pyproject.toml``) and load first, in name order; third-party
plugins follow, sorted by distribution and entry-point name. Set
``XQUANT_DISABLE_PLUGIN_AUTOLOAD=1`` to load the built-ins only.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .interfaces import INTERFACES, missing_methods

log = logging.getLogger("xquant.plugins")

ENTRY_POINT_GROUP = "xquant"
DISTRIBUTION = "xquant-onnx"
DISABLE_AUTOLOAD_ENV = "XQUANT_DISABLE_PLUGIN_AUTOLOAD"

#: registry kind -> (hook name, what users call the name in the config)
KINDS = {
    "calibration": ("xquant_register_calibration_algorithms", "calibration_type"),
    "reader": ("xquant_register_readers", "file_type"),
    "preprocessor": ("xquant_register_preprocessors", "preprocess_file"),
    "platform": ("xquant_register_platforms", "platform"),
    "metric": ("xquant_register_metrics", "auto_precision.target.metric"),
    "reporter": ("xquant_register_reporters", "analysis_enable"),
    "searcher": ("xquant_register_searchers", "auto_precision"),
    "command": ("xquant_register_commands", "command"),
}

#: what else a name of that kind may be, told after the installed names
UNKNOWN_NAME_HINTS = {
    "preprocessor": "; a custom preprocessor is given as 'path/to/file.py:function'",
}


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its pluggy name and the distribution that shipped it."""

    name: str
    distribution: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class Registration:
    name: str
    component: Any
    plugin: str
    overrides: str | None = None


@dataclass
class Registry:
    """Names of one kind (e.g. readers) and the plugin that registered each."""

    kind: str
    entries: dict[str, Registration] = field(default_factory=dict)

    def add(self, name: str, component: Any, plugin: str, override: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} with an invalid name {name!r}")
        missing = missing_methods(self.kind, component)
        if missing:
            interface = INTERFACES[self.kind][0]
            raise PluginError(
                f"plugin '{plugin}' registers {self.kind} '{name}' as {type(component).__name__}, which lacks "
                f"{', '.join(missing)} (see {interface})"
            )
        previous = self.entries.get(name)
        if previous is not None and not override:
            raise PluginError(
                f"plugin '{plugin}' registers {self.kind} '{name}', which plugin "
                f"'{previous.plugin}' already registered; pass override=True to replace it"
            )
        self.entries[name] = Registration(name, component, plugin, previous.plugin if previous else None)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Any:
        """The component registered as ``name``; a :class:`PluginError` if none is."""
        try:
            return self.entries[name].component
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        field_name = KINDS[self.kind][1]
        return (
            f"{field_name} {name} not implemented yet. Installed: {', '.join(self.names()) or '(none)'} "
            f"(see `xquant plugins`){UNKNOWN_NAME_HINTS.get(self.kind, '')}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.entries


class PluginHost:
    """A pluggy manager plus the registries built from its hooks."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._order: list[str] = []
        self._registries: dict[str, Registry] | None = None

    # -- loading -------------------------------------------------------------
    def register(
        self, plugin: object, name: str, distribution: str = "", version: str = "", builtin: bool = False
    ) -> None:
        """Register a plugin object (module) under ``name``."""
        if self.manager.has_plugin(name):
            raise PluginError(f"a plugin named '{name}' is already registered")
        self.manager.register(plugin, name=name)
        try:  # a misspelt hook (xquant_register_reader) would otherwise register and never be called
            self.manager.check_pending()
        except pluggy.PluginValidationError:
            unknown = (
                sorted(
                    impl.__name__
                    for impl in vars(plugin).values()
                    if callable(impl)
                    and hasattr(impl, f"{hookspecs.PROJECT}_impl")
                    and not hasattr(hookspecs, impl.__name__)
                )
                if hasattr(plugin, "__dict__")
                else []
            )
            self.manager.unregister(name=name)
            known = sorted(n for n in dir(hookspecs) if n.startswith(f"{hookspecs.PROJECT}_"))
            raise PluginError(
                f"plugin '{name}'{f' ({distribution})' if distribution else ''} implements "
                f"{', '.join(unknown) or 'a hook'} that xquant does not define; its hooks are: "
                f"{', '.join(known)}"
            ) from None
        self.infos[name] = PluginInfo(name, distribution or name, version, builtin)
        self._order.append(name)
        self._registries = None

    def unregister(self, name: str) -> None:
        self.manager.unregister(name=name)
        self.infos.pop(name, None)
        self._order.remove(name)
        self._registries = None

    def load_entry_points(self) -> None:
        builtins: list = []
        third_party: list = []
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            is_builtin = _normalize(dist_name) == _normalize(DISTRIBUTION)
            (builtins if is_builtin else third_party).append((dist_name, ep, dist, is_builtin))
        if not builtins:
            raise PluginError(
                "xquant's built-in plugins are not registered: the package metadata of "
                f"'{DISTRIBUTION}' (entry-point group '{ENTRY_POINT_GROUP}') is missing. "
                "Install xquant with `pip install -e .` (or `pip install xquant-onnx`) "
                "instead of putting the source folder on PYTHONPATH."
            )
        builtins.sort(key=lambda item: item[1].name)
        third_party.sort(key=lambda item: (_normalize(item[0]), item[1].name))
        if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("", "0"):
            if third_party:
                log.info("%s is set: not loading %d third-party plugin(s)", DISABLE_AUTOLOAD_ENV, len(third_party))
            third_party = []
        for dist_name, ep, dist, is_builtin in builtins + third_party:
            version = dist.version if dist is not None else ""
            plugin_name = ep.name if is_builtin else f"{dist_name}:{ep.name}"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is named, not a bare traceback
                raise PluginError(
                    f"plugin '{ep.name}' ({ep.value}) from distribution '{dist_name} {version}' "
                    f"failed to load: {type(exc).__name__}: {exc}. Uninstall or fix it, or set "
                    f"{DISABLE_AUTOLOAD_ENV}=1 to run without third-party plugins."
                ) from exc
            self.register(plugin, plugin_name, dist_name, version, builtin=is_builtin)

    # -- registries ------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        if self._registries is None:
            self._registries = self._build_registries()
        return self._registries[kind]

    def _implementations(self, hook_name: str) -> Iterator[tuple[str, Any]]:
        """``(plugin name, hook implementation)`` of every plugin implementing ``hook_name``, in plugin
        order (built-ins first, then third parties by distribution name), not pluggy's LIFO order."""
        impls = {impl.plugin_name: impl for impl in getattr(self.manager.hook, hook_name).get_hookimpls()}
        for plugin_name in self._order:
            if plugin_name in impls:
                yield plugin_name, impls[plugin_name]

    def _build_registries(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in KINDS}
        for kind, (hook_name, _) in KINDS.items():
            for plugin_name, impl in self._implementations(hook_name):

                def register(
                    name: str, component: Any, *, override: bool = False, _kind: str = kind, _plugin: str = plugin_name
                ) -> None:
                    registries[_kind].add(name, component, _plugin, override)

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    info = self.infos[plugin_name]
                    raise PluginError(
                        f"plugin '{plugin_name}' from distribution '{info.distribution} {info.version}' "
                        f"failed in {hook_name}: {type(exc).__name__}: {exc}"
                    ) from exc
        return registries

    def report_sections(self, context: hookspecs.ReportContext) -> list[str]:
        """Every plugin's ``xquant_report_sections`` lines, in plugin order; a plugin whose hook
        raises is named in a warning and left out (the report is advice: it never costs the model)."""
        lines: list[str] = []
        for plugin_name, impl in self._implementations("xquant_report_sections"):
            try:
                result: Any = impl.function(context=context)
                section = [str(line) for line in result or []]
            except Exception as exc:
                log.warning(
                    "plugin '%s' failed in xquant_report_sections (%s: %s); its section is left out",
                    plugin_name,
                    type(exc).__name__,
                    exc,
                )
                continue
            if section:
                lines += ["", *section]
        return lines

    def describe(self) -> Iterator[tuple[PluginInfo, dict[str, list[str]]]]:
        """Each plugin with the names it registered, per kind (for `xquant plugins`)."""
        for plugin_name in self._order:
            provided = {
                kind: [
                    reg.name + (f" (overrides {reg.overrides})" if reg.overrides else "")
                    for reg in self.registry(kind).entries.values()
                    if reg.plugin == plugin_name
                ]
                for kind in KINDS
            }
            yield self.infos[plugin_name], {k: v for k, v in provided.items() if v}


def _entry_points():
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, []))  # Python 3.9


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loading entry points on first use."""
    global _host
    if _host is None:
        host = PluginHost()
        host.load_entry_points()
        _host = host
    return _host


def registry(kind: str) -> Registry:
    return get_host().registry(kind)
