"""The plugin registry: a pluggy manager that finds, lists and creates IRP plugins.

(The loop that runs plugins on inputs is :class:`hrm_vision.irp.host.Orchestrator`.)

Plugins come from two places, registered the same way (a module with a ``@hookimpl``
``register_irp_plugins(register)`` function, see :mod:`hrm_vision.irp.hookspecs`):

1. the built-ins, :data:`BUILTIN_PLUGINS` (module paths);
2. setuptools entry points in the group :data:`ENTRY_POINT_GROUP` (``hrm_vision.irp_plugins``).
   hrm-vision declares its own built-in there too; a module is registered once.

The environment variable :data:`ALLOW_ENV` (``HRM_VISION_IRP_PLUGINS``) is an allow-list of
entry-point names, comma separated: when it is set, only those entry points are loaded (an empty
value loads none; built-ins are always registered). A plugin that fails to import, to register,
or to declare its plugins is reported (a :class:`PluginWarning` and an entry in
:attr:`PluginRegistry.errors`) and skipped: the registry still loads the others. That includes a
plugin that raises ``SystemExit`` (calls ``sys.exit``) while it is imported; only
``KeyboardInterrupt`` goes through.

>>> registry = PluginRegistry()             # built-ins + entry points
>>> registry.list_plugins()                # {"tinyvae": PluginInfo(...)}
>>> plugin = registry.create("tinyvae", {"checkpoint": "checkpoints/tinyvae_best.pth"})
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from ..io import describe_validation_error
from . import hookspecs
from .base import IRPConfig, IRPPlugin

#: Entry-point group third-party packages declare their plugin modules in.
ENTRY_POINT_GROUP = "hrm_vision.irp_plugins"
#: Allow-list of entry-point names to load (comma separated); unset: load them all.
ALLOW_ENV = "HRM_VISION_IRP_PLUGINS"
#: Modules registered by every host, exactly as entry-point modules are.
BUILTIN_PLUGINS: tuple[str, ...] = ("hrm_vision.irp.tinyvae_plugin",)
#: Names of the hooks a plugin may implement (see :mod:`hrm_vision.irp.hookspecs`).
HOOK_NAMES: tuple[str, ...] = tuple(
    n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{hookspecs.PROJECT_NAME}_spec"))


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered; the host goes on without it."""


class PluginConfigError(ValueError):
    """A plugin config that its pydantic model rejects; the message names each bad field."""


class UnknownPluginError(KeyError, ValueError):
    """No plugin of that name is registered; the message lists the registered ones.

    A ``KeyError`` (a lookup that failed) and a ``ValueError`` (a bad name given by a user, which
    the command line reports in one line).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown IRP plugin"


#: What a plugin's own code may raise without taking the host down: every exception, and
#: ``SystemExit`` (a plugin calling ``sys.exit``). ``KeyboardInterrupt`` is not caught.
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin registered: see the ``register_irp_plugins`` hook."""

    name: str
    factory: Callable[[Any], IRPPlugin]
    config_model: type[IRPConfig]
    kind: str
    description: str
    source: str  # the registered module (pluggy name) that provided it


@dataclass(frozen=True)
class PluginError:
    """A plugin failure that was reported: where it came from and what went wrong.

    Attributes:
        name: the plugin (entry-point, module or registry name).
        source: ``"builtin"``, ``"entry point <group>"``, ``"hook"``, ``"register"``, or the
            module that registered the plugin (factory and run failures).
        message: what went wrong, one line.
        stage: ``"import"``, ``"register"``, ``"factory"`` or ``"run"``.
        input_id: the input a ``"run"`` failure happened on.
    """

    name: str
    source: str
    message: str
    stage: str = "import"
    input_id: int | str | None = None


class PluginRegistry:
    """The plugin registry: a pluggy ``PluginManager`` for ``hrm_vision`` hooks and the plugins
    their ``register_irp_plugins`` hooks declare, collected once (again after a module is
    registered or unregistered).

    Args:
        load_entry_points: load modules from :data:`ENTRY_POINT_GROUP` (honouring
            :data:`ALLOW_ENV`).
        allow: entry-point names to load; ``None`` reads :data:`ALLOW_ENV` (unset: all).
        builtins: module paths registered first (default :data:`BUILTIN_PLUGINS`).
    """

    def __init__(self, load_entry_points: bool = True, allow: Iterable[str] | None = None,
                 builtins: Iterable[str] = BUILTIN_PLUGINS) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.errors: list[PluginError] = []
        self._reported: set[tuple[str, str, str]] = set()
        self._plugins: dict[str, PluginInfo] | None = None
        for module_path in builtins:
            self._register_import(module_path, module_path, "builtin")
        if load_entry_points:
            self.load_entry_points(allow)

    # ------------------------------------------------------------------ registration
    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin module or object under ``name``; a failure is reported, not raised.

        Returns the registered name, or ``None`` when it was reported and skipped.
        """
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self.pm.is_registered(plugin):
            return self.pm.get_name(plugin)
        try:
            unknown = [attr for attr in dir(plugin)
                       if hasattr(getattr(plugin, attr, None), f"{hookspecs.PROJECT_NAME}_impl")
                       and attr not in HOOK_NAMES]
            if unknown:
                self.report(name, "register", f"implements unknown hooks {unknown}; the hooks "
                                              f"are {HOOK_NAMES}", stage="register")
                return None
            registered = self.pm.register(plugin, name=name)
            self._plugins = None
            return registered
        except PLUGIN_FAILURES as exc:  # pluggy validation errors, duplicate names, ...
            self.report(name, "register", describe(exc), stage="register")
            return None

    def unregister(self, name: str) -> None:
        """Remove the plugin module registered under ``name`` (no error if absent)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
            self._plugins = None

    def load_entry_points(self, allow: Iterable[str] | None = None) -> list[str]:
        """Import and register the modules of :data:`ENTRY_POINT_GROUP`; returns their names.

        ``allow`` (default: :data:`ALLOW_ENV` if set) restricts them to these entry-point names;
        a name in the allow-list that no installed package provides is reported.
        """
        if allow is None and ALLOW_ENV in os.environ:
            allow = os.environ[ALLOW_ENV].split(",")
        wanted = None if allow is None else {n.strip() for n in allow if n.strip()}
        source = f"entry point {ENTRY_POINT_GROUP}"
        loaded = []
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        for ep in eps:
            if wanted is not None and ep.name not in wanted:
                continue
            try:
                module = ep.load()
            except PLUGIN_FAILURES as exc:  # a broken plugin must not take the host down
                self.report(ep.name, source, f"import of {ep.value!r} failed: {describe(exc)}")
                continue
            if self.register(module, ep.name) is not None:
                loaded.append(ep.name)
        for missing in sorted((wanted or set()) - {ep.name for ep in eps}):
            self.report(missing, source, f"{ALLOW_ENV} names {missing!r}, which no installed "
                                         "package provides")
        return loaded

    def _register_import(self, module_path: str, name: str, source: str) -> None:
        try:
            module = importlib.import_module(module_path)
        except PLUGIN_FAILURES as exc:
            self.report(name, source, f"import failed: {describe(exc)}")
            return
        self.register(module, name)

    def report(self, name: str, source: str, message: str, stage: str = "import",
               input_id: int | str | None = None) -> PluginError:
        """Record a plugin failure in :attr:`errors` and warn (a :class:`PluginWarning`).

        The same failure (name, source, message) is recorded and warned about once.
        """
        error = PluginError(name, source, message, stage, input_id)
        key = (name, source, message)
        if key not in self._reported:
            self._reported.add(key)
            self.errors.append(error)
            verb = "failed" if stage == "run" else "skipped"
            warnings.warn(f"IRP plugin {name!r} ({source}) {verb}: {message}", PluginWarning,
                          stacklevel=3)
        return error

    # ------------------------------------------------------------------ the registry
    def list_plugins(self) -> dict[str, PluginInfo]:
        """Every registered plugin by name (a copy of the registry, built on first use)."""
        if self._plugins is None:
            self._plugins = self._collect()
        return dict(self._plugins)

    def _collect(self) -> dict[str, PluginInfo]:
        """The plugins the ``register_irp_plugins`` hooks declare.

        Each module's hook runs on its own: one that raises or registers something invalid is
        reported and the others are kept. A name registered twice keeps the first (built-ins
        come first) and reports the second.
        """
        found: dict[str, PluginInfo] = {}
        # get_hookimpls() is in registration order (pluggy *calls* them last-registered first).
        for impl in self.pm.hook.register_irp_plugins.get_hookimpls():
            source = self.pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(name: str, factory: Callable[[Any], IRPPlugin],
                         config_model: type[IRPConfig], kind: str = "perception",
                         description: str = "", _source: str = source) -> None:
                problem = _check_registration(name, factory, config_model, kind)
                if problem is None and name in found:
                    problem = f"name {name!r} is already registered by {found[name].source}"
                if problem is not None:
                    self.report(str(name), _source, problem, stage="register")
                    return
                found[name] = PluginInfo(name, factory, config_model, kind, description, _source)

            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except PLUGIN_FAILURES as exc:
                self.report(source, "hook", f"register_irp_plugins raised {describe(exc)}",
                            stage="register")
        return found

    def get(self, name: str) -> PluginInfo:
        """The registered plugin ``name``.

        Raises:
            UnknownPluginError: (a ``KeyError``) listing the registered names, and the load
                failure of a plugin module of that name if there was one.
        """
        plugins = self.list_plugins()
        if name not in plugins:
            failed = [e.message for e in self.errors if e.name == name and e.stage != "run"]
            why = f" (it failed to load: {failed[0]})" if failed else ""
            raise UnknownPluginError(f"no IRP plugin named {name!r}{why}; registered: "
                                     f"{sorted(plugins)}")
        return plugins[name]

    def validate_config(self, name: str,
                        config: dict[str, Any] | BaseModel | None = None) -> IRPConfig:
        """``config`` validated by plugin ``name``'s config model.

        Raises :class:`PluginConfigError` whose message names every bad field, e.g.
        ``tinyvae config: step_size: Input should be greater than 0 (got -1)``, or
        ``tinyvae config: unknown key 'stepsize' (known keys: ...)``.
        """
        return self._validate(self.get(name), config)

    @staticmethod
    def _validate(info: PluginInfo, config: dict[str, Any] | BaseModel | None) -> IRPConfig:
        name = info.name
        if isinstance(config, info.config_model):
            return config
        if isinstance(config, BaseModel):
            config = config.model_dump()
        try:
            return info.config_model.model_validate(config or {})
        except ValidationError as exc:
            problems = describe_validation_error(exc, known=info.config_model.model_fields)
            raise PluginConfigError(f"{name} config: {problems}") from exc

    def create(self, name: str, config: dict[str, Any] | BaseModel | None = None) -> IRPPlugin:
        """Build plugin ``name`` from a plain-dict ``config`` (validated first, see above)."""
        info = self.get(name)
        return info.factory(self._validate(info, config))


def _check_registration(name: Any, factory: Any, config_model: Any, kind: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return f"plugin name must be a non-empty string, got {name!r}"
    if not callable(factory):
        return f"factory of {name!r} is not callable: {factory!r}"
    if not (isinstance(config_model, type) and issubclass(config_model, IRPConfig)):
        return f"config_model of {name!r} must be an IRPConfig subclass, got {config_model!r}"
    if not isinstance(kind, str) or not kind:
        return f"kind of {name!r} must be a non-empty string, got {kind!r}"
    return None


_default_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide host (built-ins and entry points), created on first use."""
    global _default_registry
    if _default_registry is None:
        _default_registry = PluginRegistry()
    return _default_registry


def create_plugin(name: str, config: dict[str, Any] | BaseModel | None = None) -> IRPPlugin:
    """``get_registry().create(name, config)``."""
    return get_registry().create(name, config)


def list_plugins() -> dict[str, PluginInfo]:
    """``get_registry().list_plugins()``."""
    return get_registry().list_plugins()
