"""IRP (Iterative Refinement Primitive) integration: contract, pluggy hooks, host, TinyVAE plugin.

- :mod:`~hrm_vision.irp.base`: ``IRPState``, ``IRPPlugin`` (init_state / energy / step /
  project / halt / refine), trust metrics, telemetry records;
- :mod:`~hrm_vision.irp.hookspecs`: ``hookspec``/``hookimpl`` markers and the
  ``register_irp_plugins(register)`` hook;
- :mod:`~hrm_vision.irp.plugins`: ``PluginRegistry``, which registers built-ins and
  ``hrm_vision.irp_plugins`` entry points, lists plugins and creates them from dict configs;
- :mod:`~hrm_vision.irp.tinyvae_plugin`: the ``tinyvae`` perception plugin;
- :mod:`~hrm_vision.irp.host`: ``Orchestrator``, the loop that runs plugins on inputs
  (``python -m hrm_vision.irp.host``);
- :mod:`~hrm_vision.irp.measure`: plain encoder vs refinement, PSNR and timing;
- :mod:`~hrm_vision.irp.sage`: the drop-in for SAGE's TinyVAE plugin (``create_tinyvae_irp``),
  with its config (:mod:`~hrm_vision.irp.sage_config`), model
  (:mod:`~hrm_vision.irp.sage_model`), crop conventions (:mod:`~hrm_vision.irp.crops`) and
  measurement (:mod:`~hrm_vision.irp.sage_measure`).

The TinyVAE plugin (and torch) is imported lazily, by the host, not by this package.
"""

from .base import IRPConfig, IRPPlugin, IRPResult, IRPState, TrustMetrics, trust_metrics
from .hookspecs import hookimpl, hookspec
from .plugins import (
    ALLOW_ENV,
    ENTRY_POINT_GROUP,
    PluginConfigError,
    PluginInfo,
    PluginRegistry,
    PluginWarning,
    create_plugin,
    get_registry,
    list_plugins,
)
from .telemetry import telemetry_schema, validate_telemetry

__all__ = [
    "ALLOW_ENV",
    "ENTRY_POINT_GROUP",
    "IRPConfig",
    "PluginRegistry",
    "IRPPlugin",
    "IRPResult",
    "IRPState",
    "PluginConfigError",
    "PluginInfo",
    "PluginWarning",
    "TrustMetrics",
    "create_plugin",
    "get_registry",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "telemetry_schema",
    "trust_metrics",
    "validate_telemetry",
]
