"""IRP (Iterative Refinement Primitive) integration.

- :mod:`~hrm_vision.irp.contract`: ``IRPState``, ``IRPPlugin``, ``IRPConfig``, trust metrics,
  telemetry records and schema, the host's guards, the ``hookspec``/``hookimpl`` markers;
- :mod:`~hrm_vision.irp.registry`: ``PluginRegistry`` (built-ins and ``hrm_vision.irp_plugins``
  entry points, the ``HRM_VISION_IRP_PLUGINS`` allow-list);
- :mod:`~hrm_vision.irp.tinyvae`: the ``tinyvae`` plugin and the image converter;
- :mod:`~hrm_vision.irp.sage`: SAGE's drop-in (``create_tinyvae_irp``), a facade over it;
- :mod:`~hrm_vision.irp.host`: ``Orchestrator`` and ``hrm-vision irp``.

The plugin (and torch) is imported by the registry when it is first built, not by this package.
"""

from .contract import (
    IRPConfig,
    IRPPlugin,
    IRPResult,
    IRPState,
    TrustMetrics,
    hookimpl,
    hookspec,
    telemetry_schema,
    trust_metrics,
    validate_telemetry,
)
from .registry import (
    ALLOW_ENV,
    ENTRY_POINT_GROUP,
    PluginConfigError,
    PluginInfo,
    PluginRegistry,
    PluginWarning,
    create_plugin,
    get_registry,
)

__all__ = ["ALLOW_ENV", "ENTRY_POINT_GROUP", "IRPConfig", "IRPPlugin", "IRPResult", "IRPState",
           "PluginConfigError", "PluginInfo", "PluginRegistry", "PluginWarning", "TrustMetrics",
           "create_plugin", "get_registry", "hookimpl", "hookspec", "telemetry_schema",
           "trust_metrics", "validate_telemetry"]
