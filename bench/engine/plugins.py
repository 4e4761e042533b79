"""The plugin manager: finds plugins and builds the registry of what they provide.

Plugins come from three places, in this order:
1. the ``svdbench`` entry-point group of installed distributions - the
   built-in methods, tasks, statistics and reports are declared there by
   svdbench's own pyproject, exactly as a third-party package declares its
   plugins;
2. loose ``.py`` files in ``--plugins-dir`` directories (one file, one plugin);
3. plugin objects registered in code (tests, notebooks).

``SVDBENCH_PLUGINS`` is an allow-list of third-party entry-point plugins to
load (comma-separated entry-point names; empty loads none). Built-ins always
load. Tests set it to empty so installed plugins never leak into the suite.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from bench.api import hookspecs
from bench.api.method import Method
from bench.errors import UsageError, unknown_name
from bench.model.layouts import register_layout

ENTRY_POINT_GROUP = "svdbench"
BUILTIN_DISTRIBUTION = "svdbench"
ALLOW_LIST_ENV = "SVDBENCH_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    version: str | None
    source: str
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load_file_plugin(path: Path):
    module_name = f"svdbench_plugin_{path.stem}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as error:  # a broken plugin file is bad input, not a crash
        sys.modules.pop(module_name, None)
        raise UsageError(f"cannot load plugin file {path}: {type(error).__name__}: {error}; fix or remove the file") from error
    return module


class Registry:
    """Methods, tasks, statistics, commands and quantized layouts by name, with the plugin that provided each."""

    KINDS = {"method": "register_methods", "task": "register_tasks", "statistic": "register_statistics",
             "command": "register_commands", "layout": "register_layouts"}

    def __init__(self, manager: pluggy.PluginManager, infos: dict[str, PluginInfo]):
        self.manager = manager
        self.infos = infos
        self.items: dict[str, dict[str, Any]] = {kind: {} for kind in self.KINDS}
        self.owner: dict[tuple[str, str], str] = {}
        for kind, hook_name in self.KINDS.items():
            for impl in getattr(manager.hook, hook_name).get_hookimpls():
                plugin_name = manager.get_name(impl.plugin)
                impl.function(register=self._registrar(kind, plugin_name))

    def _registrar(self, kind: str, plugin_name: str):
        def register(item) -> None:
            name = getattr(item, "name", "")
            if not name:
                raise UsageError(f"plugin '{plugin_name}' registered a {kind} without a name; set its `name`")
            if name in self.items[kind]:
                raise UsageError(f"{kind} '{name}' is registered twice: by plugin '{self.owner[(kind, name)]}' "
                                 f"and by plugin '{plugin_name}'; rename one or uninstall one plugin")
            if kind == "layout":  # saving and loading (svdbench's and transformers') look layouts up there
                register_layout(item)
            self.items[kind][name] = item
            self.owner[(kind, name)] = plugin_name
            info = self.infos.get(plugin_name)
            if info is not None:
                info.provides.setdefault(kind + "s", []).append(name)
        return register

    @property
    def methods(self) -> dict[str, Any]:
        return self.items["method"]

    @property
    def tasks(self) -> dict[str, Any]:
        return self.items["task"]

    @property
    def statistics(self) -> dict[str, Any]:
        return self.items["statistic"]

    @property
    def commands(self) -> dict[str, Any]:
        return self.items["command"]

    @property
    def hook(self):
        """The plugin hooks that are called rather than registered into (``write_report``)."""
        return self.manager.hook

    def method_factory(self, options: Mapping[str, Mapping[str, Any]]) -> Callable[[str], Method]:
        """``create(name)``: a per-run copy of a registered method, configured from ``options[name]``."""
        def create(name: str) -> Method:
            prototype = self.get("method", name)
            return prototype.configured(prototype.make_config(options.get(name, {})), create)
        return create

    def get(self, kind: str, name: str):
        if name not in self.items[kind]:
            raise unknown_name(kind, name, list(self.items[kind]))
        return self.items[kind][name]

    def describe(self) -> list[dict]:
        return [vars(info) for info in self.infos.values()]


def plugin_manager(plugins_dirs: Iterable[str | Path] = (), extra: Iterable[tuple[str, Any]] = ()) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """A plugin manager with entry-point, directory and in-code plugins registered."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    allowed = _allowed()
    found_builtin = False
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else None
        builtin = dist == BUILTIN_DISTRIBUTION
        found_builtin |= builtin
        if not builtin and allowed is not None and ep.name not in allowed:
            continue
        if manager.has_plugin(ep.name):
            continue  # the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
        except Exception as error:
            raise UsageError(f"cannot load plugin '{ep.name}' ({ep.value}) from {dist}: {error}; "
                             f"reinstall or uninstall {dist}") from error
        manager.register(plugin, name=ep.name)
        infos[ep.name] = PluginInfo(ep.name, ep.dist.version if ep.dist else None,
                                    "builtin" if builtin else f"entry point of {dist}")
    if not found_builtin:
        raise UsageError("svdbench's built-in plugins are not registered: the package is not installed; "
                         "run `pip install -e .` in the repository")
    for directory in plugins_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"--plugins-dir {directory} is not a directory")
        for path in sorted(directory.glob("*.py")):
            module = _load_file_plugin(path)
            manager.register(module, name=path.stem)
            infos[path.stem] = PluginInfo(path.stem, getattr(module, "__version__", None), f"file {path}")
    for name, plugin in extra:
        manager.register(plugin, name=name)
        infos[name] = PluginInfo(name, getattr(plugin, "__version__", None), "registered in code")
    for name, info in infos.items():
        plugin = manager.get_plugin(name)
        info.hooks = sorted(impl.name for impl in manager.get_hookcallers(plugin) or ())
    return manager, infos


def load_registry(plugins_dirs: Iterable[str | Path] = (), extra: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Load every plugin and return the registry of what they provide."""
    manager, infos = plugin_manager(plugins_dirs, extra)
    return Registry(manager, infos)
