"""The plugin registry: a pluggy manager that finds, lists and creates IRP plugins; one that
fails to import, register or declare itself (``SystemExit`` included) is reported and skipped.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from . import contract
from .contract import IRPConfig, IRPPlugin, PluginError, validate_config

ENTRY_POINT_GROUP = "hrm_vision.irp_plugins"
ALLOW_ENV = "HRM_VISION_IRP_PLUGINS"
BUILTIN_PLUGINS: tuple[str, ...] = ("hrm_vision.irp.tinyvae",)
HOOK_NAMES: tuple[str, ...] = tuple(
    n for n in dir(contract) if hasattr(getattr(contract, n), f"{contract.PROJECT_NAME}_spec"))
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)  # not Ctrl-C


class PluginWarning(UserWarning):
    """A plugin could not be loaded, registered or run; the host goes on without it."""


class UnknownPluginError(KeyError, ValueError):
    """No plugin of that name is registered (the message lists the registered ones)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown IRP plugin"


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class PluginInfo:
    """What ``register_irp_plugins`` registered, and the ``source`` module's name."""

    name: str
    factory: Callable[[Any], IRPPlugin]
    config_model: type[IRPConfig]
    kind: str
    description: str
    source: str


class PluginRegistry:
    """The ``builtins`` modules, then the entry points ``allow`` names (default
    :data:`ALLOW_ENV`, unset: all); plugins are collected on first use."""

    def __init__(self, load_entry_points: bool = True, allow: Iterable[str] | None = None,
                 builtins: Iterable[str] = BUILTIN_PLUGINS) -> None:
        self.pm = pluggy.PluginManager(contract.PROJECT_NAME)
        self.pm.add_hookspecs(contract)
        self.errors: list[PluginError] = []
        self._plugins: dict[str, PluginInfo] | None = None
        for module_path in builtins:
            try:
                self.register(importlib.import_module(module_path), module_path)
            except PLUGIN_FAILURES as exc:
                self.report(module_path, "builtin", f"import failed: {describe(exc)}")
        if load_entry_points:
            self.load_entry_points(allow)

    @classmethod
    def for_plugins(cls, names: Sequence[str]) -> PluginRegistry:
        """The built-ins and the entry points named in ``names`` (those of :data:`ALLOW_ENV`
        when set); all of them only when a name is still unknown. Failures are not warned."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            registry = cls(load_entry_points=ALLOW_ENV in os.environ)
            if ALLOW_ENV not in os.environ:
                known = registry.list_plugins()
                installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
                registry.load_entry_points([n for n in names if n in installed and n not in known])
                if set(names) - set(registry.list_plugins()):
                    registry.load_entry_points()
        return registry

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin module or object; ``None`` (reported) on failure."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self.pm.is_registered(plugin):
            return self.pm.get_name(plugin)
        try:
            registered = self.pm.register(plugin, name=name)
            self.pm.check_pending()  # a hookimpl of no hook in HOOK_NAMES
        except PLUGIN_FAILURES as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self.report(name, "register", describe(exc), stage="register")
            return None
        self._plugins = None
        return registered

    def unregister(self, name: str) -> None:
        if (plugin := self.pm.get_plugin(name)) is not None:
            self.pm.unregister(plugin)
            self._plugins = None

    def load_entry_points(self, allow: Iterable[str] | None = None) -> None:
        """Import and register the entry points ``allow`` names (default: as in ``__init__``)."""
        if allow is None and ALLOW_ENV in os.environ:
            allow = os.environ[ALLOW_ENV].split(",")
        wanted = None if allow is None else {n.strip() for n in allow if n.strip()}
        source = f"entry point {ENTRY_POINT_GROUP}"
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        for ep in [ep for ep in eps if wanted is None or ep.name in wanted]:
            try:
                module = ep.load()
            except PLUGIN_FAILURES as exc:
                self.report(ep.name, source, f"import of {ep.value!r} failed: {describe(exc)}")
                continue
            self.register(module, ep.name)
        for missing in sorted((wanted or set()) - {ep.name for ep in eps}):
            self.report(missing, source, f"{ALLOW_ENV} names {missing!r}, which no installed "
                                         "package provides")

    def report(self, name: str, source: str, message: str, stage: str = "import",
               input_id: int | str | None = None) -> PluginError:
        """Record a failure in :attr:`errors` and warn, once per (name, source, message)."""
        error = PluginError(name, source, message, stage, input_id)
        if not any((e.name, e.source, e.message) == (name, source, message) for e in self.errors):
            self.errors.append(error)
            verb = "failed" if stage == "run" else "skipped"
            warnings.warn(f"IRP plugin {name!r} ({source}) {verb}: {message}", PluginWarning,
                          stacklevel=3)
        return error

    def list_plugins(self) -> dict[str, PluginInfo]:
        """Every registered plugin by name; a name registered twice keeps the first."""
        if self._plugins is not None:
            return dict(self._plugins)
        found: dict[str, PluginInfo] = {}
        # each module's hook on its own (pluggy would stop at the first that raises), in order
        for impl in self.pm.hook.register_irp_plugins.get_hookimpls():
            source = self.pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(name: str, factory: Callable[[Any], IRPPlugin],
                         config_model: type[IRPConfig], kind: str = "perception",
                         description: str = "", _source: str = source) -> None:
                if name in found:
                    problem = f"name {name!r} is already registered by {found[name].source}"
                elif not (isinstance(config_model, type) and issubclass(config_model, IRPConfig)):
                    problem = (f"config_model of {name!r} must be an IRPConfig subclass, got "
                               f"{config_model!r}")
                else:
                    found[name] = PluginInfo(name, factory, config_model, kind, description,
                                             _source)
                    return
                self.report(str(name), _source, problem, stage="register")

            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except PLUGIN_FAILURES as exc:
                self.report(source, "hook", f"register_irp_plugins raised {describe(exc)}",
                            stage="register")
        self._plugins = found
        return dict(found)

    def get(self, name: str) -> PluginInfo:
        """Plugin ``name``, else an :class:`UnknownPluginError` listing the registered names."""
        plugins = self.list_plugins()
        if name not in plugins:
            failed = [e.message for e in self.errors if e.name == name and e.stage != "run"]
            why = f" (it failed to load: {failed[0]})" if failed else ""
            raise UnknownPluginError(f"no IRP plugin named {name!r}{why}; registered: "
                                     f"{sorted(plugins)}")
        return plugins[name]

    def create(self, name: str, config: dict[str, Any] | BaseModel | None = None) -> IRPPlugin:
        """Plugin ``name`` built from ``config``, else a :class:`PluginConfigError`."""
        info = self.get(name)
        return info.factory(validate_config(info.config_model, config, f"{name} config"))


@cache
def get_registry() -> PluginRegistry:
    """The process-wide registry (built-ins and entry points), created on first use."""
    return PluginRegistry()
