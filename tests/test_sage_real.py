"""SAGE's own orchestrators running the drop-in: needs a SAGE checkout.

Set ``HRM_VISION_SAGE_PATH`` to a checkout of dp-web4/HRM (the folder holding ``sage/``), or put
``sage`` on the path; without it the module is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from helpers.models import perturbed  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.data import PhotoCrops
from hrm_vision.irp.sage import create_tinyvae_irp

SAGE_PATH = os.environ.get("HRM_VISION_SAGE_PATH")
if SAGE_PATH:
    sys.path.insert(0, SAGE_PATH)
try:
    import sage.irp.base as sage_base
    from sage.attention.plugin_router import PluginRouter
    from sage.irp.orchestrator import HRMOrchestrator as IRPOrchestrator
    from sage.orchestrator.hrm_orchestrator import HRMOrchestrator as AsyncOrchestrator
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"SAGE is not importable ({exc}); set HRM_VISION_SAGE_PATH to a dp-web4/HRM "
                "checkout", allow_module_level=True)

CROPS = PhotoCrops("val", image_size=64, num_crops=2, seed=7).images_uint8.float() / 255.0
INPUTS = {
    "rgb": ({}, CROPS[:1]),
    "60x60": ({}, torch.nn.functional.interpolate(CROPS[:1], size=(60, 60), mode="bilinear")),
    "grey": ({"input_channels": 1}, CROPS[:1].mean(1, keepdim=True)),
    "bgr numpy": ({"channel_order": "bgr"},
                  (CROPS[0].permute(1, 2, 0).numpy()[..., ::-1] * 255).astype(np.uint8)),
}


def make(**kwargs):
    """The drop-in on the untrained compact student (not the shipped one), perturbed: untouched,
    its encoding is already the decoder's least-squares optimum and refinement has nothing to
    improve."""
    import hrm_vision.irp.sage as sage_module

    with warnings.catch_warnings(), mock.patch.object(sage_module, "shipped_weights", list):
        warnings.simplefilter("ignore", UserWarning)
        plugin = create_tinyvae_irp(device="cpu", **kwargs)
    perturbed(plugin.model)
    return plugin


@pytest.mark.parametrize("name", list(INPUTS))
def test_irp_orchestrator_vision_slot(name) -> None:
    extra, x = INPUTS[name]
    plugin = make(**extra)
    assert isinstance(plugin, sage_base.IRPPlugin)
    orch = IRPOrchestrator({"enable_vision": False, "enable_language": False,
                            "enable_control": False, "enable_memory": False,
                            "enable_tts": False, "device": "cpu", "total_ATP": 10.0})
    orch.plugins["vision"], orch.trust_weights["vision"] = plugin, 1.0
    try:
        out = orch.process({"vision": x})
    finally:
        orch.executor.shutdown()
    tel = orch.telemetry_history[-1]
    json.dumps(tel, allow_nan=False)
    assert tel["E"] < tel["energy_trajectory"][0]
    assert tel["trust"]["monotonicity_ratio"] == 1.0
    assert out["plugin_outputs"]["vision"]["latent"].shape == (1, 64)


@pytest.mark.parametrize("name", list(INPUTS))
def test_plugin_router(name) -> None:
    extra, x = INPUTS[name]
    router = PluginRouter({"enable_vision": False, "enable_language": False,
                           "enable_memory": False, "device": "cpu"})
    router.orchestrator.plugins["vision"] = make(**extra)
    router.orchestrator.trust_weights["vision"] = 1.0
    try:
        res = asyncio.run(router.run_plugins({"observations": x}, {"vision": 10.0}))
    finally:
        router.shutdown()
    result = res["results"]["vision"]
    assert "error" not in result and result["history_length"] > 4
    assert result["final_state"].meta["target"].shape[-2:] == (64, 64)


def test_plugin_router_records_a_bad_crop_as_failed() -> None:
    router = PluginRouter({"enable_vision": False, "enable_language": False,
                           "enable_memory": False, "device": "cpu"})
    router.orchestrator.plugins["vision"] = make()
    router.orchestrator.trust_weights["vision"] = 1.0
    try:
        res = asyncio.run(router.run_plugins({"observations": CROPS[:1] * 255}, {"vision": 10.0}))
    finally:
        router.shutdown()
    assert res["results"]["vision"]["status"] == "failed"
    assert "value_range" in res["results"]["vision"]["error"]
    assert router.orchestrator.trust_weights["vision"] == 1.0


@pytest.mark.parametrize("name", list(INPUTS))
def test_async_orchestrator(name) -> None:
    extra, x = INPUTS[name]
    orch = AsyncOrchestrator(initial_atp=1000.0, device=torch.device("cpu"))
    # room to halt early: the perturbed model's energy keeps falling for about 40 states
    orch.register_plugin("tinyvae", make(max_iterations=100, **extra), initial_trust=1.0)
    result = asyncio.run(orch.execute_plugin("tinyvae", x, early_stop=True))
    assert result.state.value == "halted_early"
    assert 0.0 < result.trust_score <= 1.0
    assert result.telemetry["energy_delta"] < 0
    assert tuple(result.output.shape) == (1, 64)
