"""IRP (Iterative Refinement Primitive) integration: contract, pluggy hooks, host, TinyVAE plugin.

- :mod:`~hrm_vision.irp.base`: ``IRPState``, ``IRPPlugin`` (init_state / energy / step /
  project / halt / refine), trust metrics, telemetry records;
- :mod:`~hrm_vision.irp.hookspecs`: ``hookspec``/``hookimpl`` markers and the
  ``register_irp_plugins(register)`` hook;
- :mod:`~hrm_vision.irp.plugins`: ``IRPHost``, the manager that registers built-ins and
  ``hrm_vision.irp_plugins`` entry points, lists plugins and creates them from dict configs;
- :mod:`~hrm_vision.irp.tinyvae_plugin`: the ``tinyvae`` perception plugin;
- :mod:`~hrm_vision.irp.host`: the reference host loop (``python -m hrm_vision.irp.host``);
- :mod:`~hrm_vision.irp.measure`: plain encoder vs refinement, PSNR and timing.

The TinyVAE plugin (and torch) is imported lazily, by the host, not by this package.
"""

from .base import IRPConfig, IRPPlugin, IRPResult, IRPState, TrustMetrics, trust_metrics
from .hookspecs import hookimpl, hookspec
from .plugins import (
    ALLOW_ENV,
    ENTRY_POINT_GROUP,
    IRPHost,
    PluginConfigError,
    PluginInfo,
    PluginWarning,
    create_plugin,
    get_host,
    list_plugins,
)
from .telemetry import telemetry_schema, validate_telemetry

__all__ = [
    "ALLOW_ENV",
    "ENTRY_POINT_GROUP",
    "IRPConfig",
    "IRPHost",
    "IRPPlugin",
    "IRPResult",
    "IRPState",
    "PluginConfigError",
    "PluginInfo",
    "PluginWarning",
    "TrustMetrics",
    "create_plugin",
    "get_host",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "telemetry_schema",
    "trust_metrics",
    "validate_telemetry",
]
