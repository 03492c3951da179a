"""The SAGE drop-in called the way each of SAGE's callers calls it (no SAGE code needed).

Callers: SAGE's IRP orchestrator (dict config it writes into, ``refine(x, task_ctx)``,
``emit_telemetry``, ``get_semantic_representation``), its attention plugin router
(``init_state``/``step``/``energy``/``halt`` one by one, swallowing init errors), its async
orchestrator (``refine(x, early_stop)`` -> ``(latent, telemetry)``) and its camera scripts
(``create_tinyvae_irp(latent_dim=64, input_channels=3, use_fp16=True, beta_kl=0.1)``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import perturbed  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.data import PhotoCrops
from hrm_vision.io import model_entry, save_checkpoint, shipped_weights
from hrm_vision.irp.contract import IRPState
from hrm_vision.irp.sage import TinyVAEIRP, create_tinyvae_irp, sage_trust
from hrm_vision.vae import MinimalVAE


def make(**kwargs) -> TinyVAEIRP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_tinyvae_irp(**{"device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """(4, 3, 64, 64) held-out photos crops, float RGB in [0, 1]."""
    return PhotoCrops("val", image_size=64, num_crops=4, seed=5).images_uint8.float() / 255.0


@pytest.fixture(scope="module")
def plugin() -> TinyVAEIRP:
    return make(latent_dim=64, input_channels=3)


@pytest.fixture(scope="module")
def refining() -> TinyVAEIRP:
    """The untrained compact student, perturbed: untouched, its linear path's encoding is
    already the decoder's least-squares optimum and refinement has nothing to improve."""
    made = make(latent_dim=64, input_channels=3)
    perturbed(made.model)
    return made


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sage") / "tinyvae_best.pth"
    torch.manual_seed(0)
    save_checkpoint(model_entry(MinimalVAE(latent_dim=16, base_channels=4).eval(), "student"),
                    path)
    return path


class TestIRPOrchestrator:
    """sage/irp/orchestrator.py: writes config keys, refine(x, task_ctx), emit_telemetry."""

    def test_budget_written_into_config_bounds_the_run(self, plugin, crops) -> None:
        plugin.config["max_ATP"] = 0.3
        plugin.config["max_iterations"] = int(0.3 * 10)
        state, history = plugin.refine(crops[:1], {})
        assert isinstance(state, IRPState) and len(history) <= 3
        plugin.config["max_iterations"] = 20

    def test_telemetry_has_sages_keys_and_is_json_safe(self, refining, crops) -> None:
        state, history = refining.refine(crops[:1], {})
        tel = refining.emit_telemetry(state, history)
        json.dumps(tel, allow_nan=False)
        assert set(tel["trust"]) == {"monotonicity_ratio", "dE_variance", "convergence_rate"}
        assert tel["trust"]["monotonicity_ratio"] == 1.0
        assert tel["budget"]["ATP_spent"] == pytest.approx(0.1 * len(history))
        assert tel["E"] == history[-1].energy_val < history[0].energy_val
        assert tel["steps"] == len(history) and tel["entity_id"] == "tinyvae_irp"

    def test_semantic_representation_for_the_vision_slot(self, plugin, crops) -> None:
        state, _ = plugin.refine(crops[:2], {})
        sem = plugin.get_semantic_representation(state)
        assert sem["latent"].shape == (2, 64)
        assert sem["latent_flat"].shape == (2, 64)
        assert sem["reconstruction"].shape == (2, 3, 64, 64)
        assert sem["refinement_steps"] == state.step_idx


class TestPluginRouter:
    """sage/attention/plugin_router.py: the primitives one by one, a 60x60 crop."""

    def run(self, plugin, x, steps: int = 10) -> list[IRPState]:
        history = [plugin.init_state(x, {"goal": "observe", "constraints": {}})]
        for i in range(steps):
            nxt = plugin.step(history[-1])
            nxt.energy_val = plugin.energy(nxt)
            nxt.step_idx = i + 1
            history.append(nxt)
            if plugin.halt(history):
                break
        return history

    def test_60x60_crop_is_resized_and_refined(self, refining, crops) -> None:
        crop = torch.nn.functional.interpolate(crops[:1], size=(60, 60), mode="bilinear")
        history = self.run(refining, crop)
        assert history[0].meta["target"].shape == (1, 3, 64, 64)
        assert history[-1].energy_val < history[0].energy_val

    def test_fallback_state_after_a_failed_init_is_an_error(self, plugin, crops) -> None:
        bad = crops[:1].clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            plugin.init_state(bad, {})
        fallback = IRPState(x={"observations": bad}, energy_val=1.0, meta={"source": "fallback"})
        with pytest.raises(ValueError, match="init_state failed: .*NaN"):
            plugin.halt([fallback])
        with pytest.raises(ValueError, match="not made by this plugin"):
            plugin.step(fallback)


class TestAsyncOrchestratorAndScripts:
    """sage/orchestrator/hrm_orchestrator.py and the camera scripts: (latent, telemetry)."""

    def test_scripts_factory_call(self, crops) -> None:
        with pytest.warns(UserWarning) as caught:
            vae = create_tinyvae_irp(latent_dim=64, input_channels=3, use_fp16=True,
                                     beta_kl=0.1, device="cpu")
        messages = " ".join(str(w.message) for w in caught)
        assert "no-op on the CPU" in messages
        assert ("untrained" in messages) == (not shipped_weights())  # else the shipped student
        assert (vae.entity_id, vae.latent_dim, vae.input_channels) == ("tinyvae_irp", 64, 3)
        assert vae.use_fp16 is False and vae.device == torch.device("cpu")
        latent, tel = vae.refine(crops[:1])
        for key in ("reconstruction_error", "kl_divergence", "latent_dim", "latent_norm",
                    "time_ms", "iterations"):
            assert key in tel
        assert isinstance(tel["trust"], float) and 0.0 <= tel["trust"] <= 1.0
        json.dumps(tel, allow_nan=False)
        assert vae.decode_batch(latent).shape == (1, 3, 64, 64)
        assert torch.equal(vae.get_latents(crops[:1]), vae.encode_batch(crops[:1]))

    def test_early_stop_argument(self, crops) -> None:
        """An untrained 16-number compact student: its DCT code is already the decoder's
        least-squares code, so the energy is flat from the start and the halting rule fires."""
        flat = make(latent_dim=16, input_channels=3)
        _, stopped = flat.refine(crops[:1], True)
        latent, full = flat.refine(crops[:1], False)
        assert full["iterations"] == flat.config["max_iterations"] > stopped["iterations"]
        assert stopped["early_stopped"] and not full["early_stopped"]
        assert full["energy_trajectory"][-1] <= stopped["energy_trajectory"][-1]
        assert latent.shape == (1, 16)

    def test_flat_vector_view_decodes_like_the_latent(self, plugin, crops) -> None:
        flat = plugin.get_latents(crops[:2], flat=True)
        assert flat.shape == (2, 64)  # the compact student: 64 numbers per 64x64 crop
        assert torch.allclose(plugin.decode_batch(flat),
                              plugin.decode_batch(plugin.get_latents(crops[:2])))

    def test_refinement_gains_under_sages_default_halting(self, checkpoint, crops) -> None:
        """SAGE's halt_eps=1e-4 read absolutely would stop after halt_K + 1 = 4 states. (A
        spatial student: the untrained compact student's DCT encoder is already the decoder's
        least-squares code, so refinement has nothing to gain there.)"""
        plugin = make(checkpoint=str(checkpoint))
        _, tel = plugin.refine(crops[:1])
        assert plugin.config["halt_eps"] == 1e-4
        assert tel["iterations"] > 4 and tel["halt_reason"] == "slope<eps"
        assert tel["energy_delta"] < 0


class TestSageTrust:
    """SAGE's plugin: ``0.5 * max(0, 1 - 10 * MSE) + 0.5 / (1 + KL per dimension)``."""

    @pytest.mark.parametrize(("mse", "kl", "trust"), [
        (0.0, 0.0, 1.0), (0.05, 1.0, 0.5), (0.2, 0.0, 0.5), (0.01, 3.0, 0.575), (1.0, 1e9, 0.0)])
    def test_formula_on_known_values(self, mse, kl, trust) -> None:
        assert sage_trust(mse, kl) == pytest.approx(trust, abs=1e-8)

    def test_negative_values_are_refused(self) -> None:
        with pytest.raises(ValueError, match=">= 0"):
            sage_trust(-0.1, 0.0)

    def test_telemetry_trust_is_sages_of_the_reported_error_and_kl(self, plugin, crops) -> None:
        _, tel = plugin.refine(crops[:2])
        assert tel["trust"] == pytest.approx(sage_trust(tel["reconstruction_error"],
                                                        tel["kl_divergence"]))
        recon = plugin.decode_batch(plugin.get_latents(crops[:2]))
        assert tel["reconstruction_error"] <= float((recon - crops[:2]).pow(2).mean()) + 1e-6

    def test_code_forms_need_a_codes_file(self, plugin, crops) -> None:
        with pytest.raises(ValueError, match="with the codes setting"):
            plugin.get_latents(crops[:1], form="tokens")


class TestInputConventions:
    def test_grey_crops(self, crops) -> None:
        grey = make(input_channels=1)
        x = crops[:1].mean(1, keepdim=True)
        latent, tel = grey.refine(x)
        assert grey.decode_batch(latent).shape == (1, 1, 64, 64)
        assert torch.equal(grey.get_latents(x[0, 0]), grey.get_latents(x))  # (H, W) too
        with pytest.raises(ValueError, match="input_channels=1"):
            grey.refine(crops[:1])

    @pytest.mark.parametrize("value_range", [(-1, 1), (0, 255)])
    def test_value_ranges(self, plugin, crops, value_range) -> None:
        low, high = value_range
        x = crops[:1] * (high - low) + low
        with pytest.raises(ValueError, match=r"value_range to \(" + str(low)):
            plugin.get_latents(x)
        scaled = make(latent_dim=64, value_range=value_range)
        assert torch.allclose(scaled.get_latents(x), plugin.get_latents(crops[:1]), atol=1e-4)
        assert torch.allclose(scaled.decode_batch(scaled.get_latents(x)).min(), torch.tensor(
            float(low)), atol=0.2 * (high - low))

    def test_01_crop_under_0_255_is_refused(self, crops) -> None:
        with pytest.raises(ValueError, match="value_range=\\(0, 1\\)"):
            make(value_range=(0, 255)).get_latents(crops[:1])

    def test_bgr_tensor_and_numpy(self, plugin, crops) -> None:
        bgr = make(latent_dim=64, channel_order="bgr")
        rgb_latent = plugin.get_latents(crops[:1])
        assert torch.allclose(bgr.get_latents(crops[:1].flip(1)), rgb_latent, atol=1e-5)
        frame = (crops[0].permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)
        with pytest.raises(ValueError, match="channel_order"):
            plugin.get_latents(frame)
        assert torch.allclose(bgr.get_latents(frame), rgb_latent, atol=0.05)
        as_float = frame.astype(np.float32) / 255.0
        assert torch.allclose(bgr.get_latents(as_float), bgr.get_latents(frame), atol=1e-5)
        out = bgr.decode_batch(rgb_latent)
        assert torch.allclose(out, plugin.decode_batch(rgb_latent).flip(1))

    def test_sizes_and_bad_inputs(self, plugin, crops) -> None:
        before = crops.clone()
        plugin.refine(crops[:1] * 1.0, {})
        assert torch.equal(crops, before)
        with pytest.raises(ValueError, match="resize=True"):
            make(resize=False).get_latents(crops[:1, :, :60, :60])
        with pytest.raises(ValueError, match="channels-first"):
            plugin.get_latents(crops[:1].permute(0, 2, 3, 1))
        with pytest.raises(ValueError, match="no pixels"):
            plugin.get_latents(crops[:0])
        with pytest.raises(ValueError, match="expected a torch tensor"):
            plugin.get_latents([[0.0]])


class TestConfig:
    def test_unknown_key_and_device(self) -> None:
        with pytest.raises(ValueError, match="unknown key 'halt_k'"):
            make(halt_k=3)
        with pytest.raises(ValueError, match="not a torch device"):
            make(device="gpu0")
        assert make(device=torch.device("cpu")).device.type == "cpu"
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="needs CUDA"):
                make(device="jetson")

    def test_normalize_warns_that_it_is_not_used(self) -> None:
        with pytest.warns(UserWarning) as caught:
            create_tinyvae_irp(device="cpu", normalize=True, mean=[0.5] * 3, std=[0.5] * 3)
        assert any("normalize/mean/std are not used" in str(w.message) for w in caught)

    def test_checkpoint_sizes(self, checkpoint, crops) -> None:
        loaded = make(checkpoint=str(checkpoint))
        assert loaded.latent_dim == 16 and loaded.latent_shape == (16, 8, 8)
        with pytest.raises(ValueError, match="latent_dim=64 disagrees with the checkpoint"):
            make(checkpoint=str(checkpoint), latent_dim=64)
        latent, tel = loaded.refine(crops[:1])
        assert tel["latent_dim"] == 16 and latent.shape == (1, 16, 8, 8)

    def test_live_halting_keys_are_checked(self, plugin, crops) -> None:
        plugin.config["max_iterations"] = "ten"
        try:
            with pytest.raises(ValueError, match="max_iterations"):
                plugin.refine(crops[:1], {})
        finally:
            plugin.config["max_iterations"] = 20


class TestModelLevelSwap:
    """SAGE's code using the model itself: ``mu, logvar = vae.encode(x)``, ``vae(x)``."""

    def test_encode_unpacks_into_mu_and_logvar_for_a_batch_of_two(self, crops) -> None:
        from hrm_vision.irp.sage import SageVAE

        vae = SageVAE(input_channels=3, latent_dim=64, img_size=64).eval()
        with torch.no_grad():
            mu, logvar = vae.encode(crops[:2])
            recon, mu2, logvar2 = vae(crops[:2])
        assert mu.shape == logvar.shape == (2, 64)
        assert torch.equal(mu, mu2) and recon.shape == (2, 3, 64, 64)
        assert torch.equal(vae.decode(mu), recon)

    def test_grey_and_checkpoint_sizes(self, crops, checkpoint) -> None:
        from hrm_vision.irp.sage import SageVAE

        grey = SageVAE(input_channels=1, latent_dim=64).eval()
        with torch.no_grad():
            recon, _, _ = grey(crops[:1].mean(1, keepdim=True))
        assert recon.shape == (1, 1, 64, 64)
        with pytest.raises(ValueError, match="latent_dim=64 disagrees"):
            SageVAE(latent_dim=64, checkpoint=checkpoint)
        assert SageVAE(latent_dim=16, checkpoint=checkpoint).latent_dim == 16


def test_no_checkpoint_starts_from_the_shipped_compact_student(tmp_path: Path, monkeypatch,
                                                                crops) -> None:
    """SAGE's factory without a checkpoint: the shipped ``compact_student`` at SAGE's sizes, the
    untrained student when none is shipped or other sizes are asked for."""
    import hrm_vision.io as io_module
    from hrm_vision.compact import CompactStudentVAE
    from hrm_vision.io import save

    monkeypatch.setattr(io_module, "WEIGHTS_DIR", tmp_path)
    untrained = CompactStudentVAE().eval()
    with torch.no_grad():
        assert torch.equal(make().model.encode(crops), untrained.encode(crops))
        shipped = perturbed(CompactStudentVAE()).eval()
        save(shipped, tmp_path / "compact_student.safetensors")
        assert torch.allclose(make().model.encode(crops), shipped.encode(crops), atol=1e-6)
        assert not torch.allclose(shipped.encode(crops), untrained.encode(crops), atol=1e-3)
        assert make(latent_dim=32).model.latent_dim == 32  # another size: untrained, not shipped
    with pytest.warns(UserWarning, match="untrained compact student"):
        create_tinyvae_irp(latent_dim=32, device="cpu")
