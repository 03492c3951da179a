"""pluggy hook specifications of hrm-vision's IRP plugin system.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names match the
hooks below. Third-party packages make their module discoverable by declaring it in the
``hrm_vision.irp_plugins`` entry-point group::

    # pyproject.toml of a plugin package
    [project.entry-points."hrm_vision.irp_plugins"]
    my_plugin = "my_package.irp_plugin"

hrm-vision's own plugins are declared and registered exactly the same way (see
:mod:`hrm_vision.irp.plugins`). Every hook is documented here and in docs/irp.md;
a test fails when one is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

#: The pluggy project name: markers, the manager and entry points all use it.
PROJECT_NAME = "hrm_vision"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_irp_plugins(register: Callable[..., Any]) -> None:
    """Register the IRP plugins this module provides.

    Call ``register(name, factory, config_model, kind="perception", description="")`` once per
    plugin:

    - ``name``: the unique registry name hosts create the plugin by (e.g. ``"tinyvae"``);
    - ``factory``: a callable taking one validated ``config_model`` instance and returning an
      :class:`hrm_vision.irp.base.IRPPlugin` (usually the plugin class itself);
    - ``config_model``: a pydantic model (subclass of :class:`hrm_vision.irp.base.IRPConfig`)
      that validates the plain-dict config a host passes; its errors name the offending field;
    - ``kind``: what the plugin does, e.g. ``"perception"``;
    - ``description``: one line shown by ``python -m hrm_vision.irp.host --list``.

    The hook may run more than once (a registry collects again after a module is registered), so
    it must only call ``register`` and not do heavy work such as loading weights.
    """
