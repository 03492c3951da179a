"""IRP (Iterative Refinement Primitive) integration (docs/irp.md); torch loads with the registry."""

from .contract import (
    IRPConfig,
    IRPPlugin,
    IRPResult,
    IRPState,
    PluginConfigError,
    hookimpl,
    trust_metrics,
    validate_telemetry,
)
from .registry import ALLOW_ENV, ENTRY_POINT_GROUP, PluginRegistry, PluginWarning, get_registry

__all__ = ["ALLOW_ENV", "ENTRY_POINT_GROUP", "IRPConfig", "IRPPlugin", "IRPResult", "IRPState",
           "PluginConfigError", "PluginRegistry", "PluginWarning", "get_registry", "hookimpl",
           "trust_metrics", "validate_telemetry"]
