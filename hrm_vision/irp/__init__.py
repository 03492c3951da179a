"""IRP (Iterative Refinement Primitive) integration: :mod:`~hrm_vision.irp.contract` (state,
plugin base, telemetry, hooks), :mod:`~hrm_vision.irp.registry` (plugins by name),
:mod:`~hrm_vision.irp.tinyvae` (the plugin and the image converter), :mod:`~hrm_vision.irp.sage`
(SAGE's drop-in), :mod:`~hrm_vision.irp.host` (``Orchestrator``, ``hrm-vision irp``). The plugin
(and torch) is imported when the registry is first built, not by this package.
"""

from .contract import (
    IRPConfig,
    IRPPlugin,
    IRPResult,
    IRPState,
    PluginConfigError,
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
    PluginInfo,
    PluginRegistry,
    PluginWarning,
    get_registry,
)

__all__ = ["ALLOW_ENV", "ENTRY_POINT_GROUP", "IRPConfig", "IRPPlugin", "IRPResult", "IRPState",
           "PluginConfigError", "PluginInfo", "PluginRegistry", "PluginWarning", "TrustMetrics",
           "get_registry", "hookimpl", "hookspec", "telemetry_schema",
           "trust_metrics", "validate_telemetry"]
