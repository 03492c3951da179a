"""The TinyVAE perception plugin on a real (tiny, briefly trained) checkpoint and real photos.

Also drives the reference host loop, its command line, the measurement script
(``experiments/irp_measure.py``) and the "Use in an IRP host" example of docs/irp.md.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import irp_measure as measure_cli
from hrm_vision.cli import main as cli_main
from hrm_vision.data import PhotoCrops
from hrm_vision.io import CheckpointError, load, model_entry, save, save_checkpoint
from hrm_vision.irp import PluginRegistry, validate_telemetry
from hrm_vision.irp.host import Orchestrator
from hrm_vision.irp.tinyvae import TinyVAEConfig, TinyVAEPlugin
from hrm_vision.metrics import psnr
from hrm_vision.vae import MinimalVAE, TeacherVAE

IRP_DOC = Path(__file__).resolve().parents[1] / "docs" / "irp.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student trained for 30 steps on photos train crops, saved like the distiller does.

    The loss is reconstruction plus a small KL term, as for any VAE: the KL pulls the encoder's
    means toward the prior, which leaves the gap between the encoder's guess and the best latent
    for the decoder that refinement closes. (Without it, an encoder that is nearly a projection
    onto the decoder's linear basis is already close to the best latent, and there is little
    for refinement to show.)
    """
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MinimalVAE(latent_dim=8, base_channels=8)
    images = PhotoCrops("train", num_crops=256).images_uint8.float() / 255.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(30):
        x = images[(i * 16) % 256:(i * 16) % 256 + 16]
        out = model(x)
        kl = 0.5 * (out.mu.pow(2) + out.logvar.exp() - 1 - out.logvar).mean()
        loss = (out.reconstruction - x).pow(2).mean() + 0.01 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "tinyvae_best.pth"
    save_checkpoint(model_entry(model.eval(), "student"), path)
    return path


@pytest.fixture(scope="module")
def host() -> PluginRegistry:
    return PluginRegistry(load_entry_points=False)


@pytest.fixture(scope="module")
def plugin(host: PluginRegistry, checkpoint: Path) -> TinyVAEPlugin:
    made = host.create("tinyvae", {"checkpoint": str(checkpoint), "max_steps": 8})
    assert isinstance(made, TinyVAEPlugin)
    return made


@pytest.fixture(scope="module")
def frames_rgb() -> np.ndarray:
    """8 validation crops as (8, 32, 32, 3) uint8 RGB frames."""
    return PhotoCrops("val", num_crops=8, seed=1).images_uint8.permute(0, 2, 3, 1).numpy()


class TestRefinement:
    def test_one_step_is_exactly_the_plain_encoder(self, plugin, checkpoint, photo_batch) -> None:
        state, history = plugin.refine(photo_batch, max_steps=1)
        with torch.no_grad():
            expected = load(checkpoint, role="student").encode(photo_batch)
        assert len(history) == 1 and torch.equal(state.x, expected)

    def test_energy_never_rises_and_does_fall_on_real_images(self, plugin, photo_batch) -> None:
        _, history = plugin.refine(photo_batch)
        assert len(history) == 8
        batch = [s.energy_val for s in history]
        assert all(b <= a for a, b in zip(batch, batch[1:], strict=False))
        per_image = torch.stack([s.meta["energies"] for s in history])  # (states, B)
        assert bool((per_image[1:] <= per_image[:-1]).all())
        assert batch[-1] < 0.98 * batch[0]  # steps are taken, not all rejected
        assert float((per_image[-1] < per_image[0]).float().mean()) > 0.9

    def test_refined_reconstruction_is_better(self, plugin, photo_batch) -> None:
        plain = plugin.perceive(photo_batch, max_steps=1)
        refined = plugin.perceive(photo_batch, max_steps=8)
        assert psnr(refined.reconstruction, photo_batch) > psnr(plain.reconstruction,
                                                                 photo_batch) + 0.1

    def test_energy_matches_its_definition(self, plugin, photo_batch) -> None:
        state, _ = plugin.refine(photo_batch, max_steps=3)
        recon = plugin.decode(state.x)
        mse = (recon - photo_batch).pow(2).mean(dim=(1, 2, 3))
        prior = plugin.config.prior_weight * 0.5 * state.x.pow(2).mean(dim=(1, 2, 3))
        assert plugin.energy(state) == pytest.approx(float((mse + prior).mean()), rel=1e-5)
        assert state.energy_val == pytest.approx(plugin.energy(state), rel=1e-5)

    def test_prior_weight_adds_the_prior_term(self, host, checkpoint, photo_batch) -> None:
        energies = {}
        for weight in (0.0, 0.5):
            p = host.create("tinyvae", {"checkpoint": str(checkpoint), "prior_weight": weight})
            state = p.init_state(photo_batch, {})
            mse = (p.decode(state.x) - photo_batch).pow(2).mean()
            energies[weight] = (state.energy_val, float(mse), float(state.x.pow(2).mean()))
        e0, mse, z2 = energies[0.0]
        assert e0 == pytest.approx(mse, rel=1e-5)
        assert energies[0.5][0] == pytest.approx(mse + 0.25 * z2, rel=1e-5)

    def test_max_backtracks_bounds_the_retries(self, host, checkpoint, photo_batch) -> None:
        def first_update_moves(max_backtracks: int) -> float:
            p = host.create("tinyvae", {"checkpoint": str(checkpoint), "step_size": 1e3,
                                        "max_backtracks": max_backtracks, "latent_bound": 1e4})
            _, history = p.refine(photo_batch, max_steps=2)
            moved = (history[1].x != history[0].x).flatten(1).any(1)
            return float(moved.float().mean())

        assert first_update_moves(0) == 0.0  # a 1000-unit step is rejected, nothing retried
        assert first_update_moves(20) > 0.5  # halving 20 times finds a step that helps

    def test_project_keeps_latent_in_range(self, host, checkpoint, photo_batch) -> None:
        tight = host.create("tinyvae", {"checkpoint": str(checkpoint), "latent_bound": 0.05,
                                        "step_size": 1.0})
        state, history = tight.refine(photo_batch, max_steps=6)
        lower, upper = state.meta["lower"], state.meta["upper"]
        assert bool(((state.x >= lower) & (state.x <= upper)).all())
        assert float(upper.min()) >= 0.05 and torch.equal(tight.project(state).x, state.x)
        wild = type(state)(upper + 10.0, state.step_idx, None, state.meta)
        assert torch.equal(tight.project(wild).x, upper)

    def test_telemetry_of_a_real_run_validates(self, plugin, photo_batch) -> None:
        record = plugin.perceive(photo_batch, max_steps=4, input_id=7).telemetry
        validate_telemetry(record)
        assert record["steps"] == 3 and record["batch_size"] == len(photo_batch)
        assert record["trust"]["monotonicity"] == 1.0 and record["input_id"] == 7
        assert record["time_ms"] > 0
        single = plugin.perceive(photo_batch[0], max_steps=1).telemetry
        validate_telemetry(single)
        assert single["steps"] == 0 and single["batch_size"] == 1


class TestInputs:
    def test_bgr_uint8_frames_match_float_rgb_tensor(self, host, checkpoint, plugin,
                                                     frames_rgb) -> None:
        rgb_tensor = torch.from_numpy(frames_rgb).permute(0, 3, 1, 2).float() / 255.0
        expected = plugin.init_state(rgb_tensor, {}).x
        bgr = np.ascontiguousarray(frames_rgb[..., ::-1])
        by_ctx = plugin.init_state(bgr, {"channel_order": "bgr"}).x
        bgr_plugin = host.create("tinyvae", {"checkpoint": str(checkpoint),
                                             "channel_order": "bgr"})
        by_config = bgr_plugin.init_state(bgr, {}).x
        single = bgr_plugin.init_state(bgr[2], {}).x
        torch.testing.assert_close(by_ctx, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(by_config, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(single, expected[2:3], rtol=1e-5, atol=1e-5)
        # and reading BGR as RGB is visibly different: the flag matters
        assert not torch.allclose(plugin.init_state(bgr, {}).x, expected, atol=1e-3)

    def test_callers_input_is_unchanged(self, plugin, frames_rgb, photo_batch) -> None:
        frames = frames_rgb.copy()
        frames.setflags(write=False)  # read-only frames (e.g. a camera buffer) work too
        tensor = photo_batch.clone().requires_grad_(False)
        for x in (frames, frames[..., ::-1], tensor, tensor[0]):
            before = x.copy() if isinstance(x, np.ndarray) else x.clone()
            out = plugin.perceive(x, max_steps=3)
            assert out.latent.shape[0] == (1 if x.ndim == 3 else len(x))
            if isinstance(x, np.ndarray):
                assert np.array_equal(x, before)
            else:
                assert torch.equal(x, before)

    def test_size_not_divisible_by_8_is_rejected_or_resized(self, host, checkpoint,
                                                           photo_batch) -> None:
        odd = photo_batch[:2, :, :30, :27]
        plugin = host.create("tinyvae", {"checkpoint": str(checkpoint)})
        with pytest.raises(ValueError, match=r"30x27 is not a multiple of 8.*resize=True"):
            plugin.perceive(odd)
        resizing = host.create("tinyvae", {"checkpoint": str(checkpoint),
                                           "resize": True})
        out = resizing.perceive(odd, max_steps=2)
        assert out.latent.shape == (2, 8, 4, 3) and out.reconstruction.shape == (2, 3, 32, 24)

    @pytest.mark.parametrize("bad, message", [
        (np.zeros((32, 32, 3), dtype=np.int64), "uint8"),
        (np.zeros((32, 32, 4), dtype=np.uint8), r"\(H, W, 3\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int32), "float"),
        (torch.full((1, 3, 32, 32), 255.0), r"\[0, 1\]"),
        (torch.zeros(1, 32, 32, 3), "permute"),
        ([[0.0]], "torch tensor or a numpy"),
        (torch.full((1, 3, 32, 32), float("nan")), r"3072 NaN or infinite value\(s\) of 3072"),
        (torch.zeros(2, 3, 32, 32).index_fill_(2, torch.tensor([5]), float("inf")),
         r"192 NaN or infinite"),
        (torch.zeros(0, 3, 32, 32), "no image"),
        (torch.zeros(1, 3, 0, 0), r"no pixels \(0x0"),
        (torch.zeros(3, 32, 0), r"no pixels \(32x0"),
        (np.zeros((0, 0, 3), dtype=np.uint8), r"no pixels \(0x0"),
        (np.zeros((0, 32, 32, 3), dtype=np.uint8), "no image"),
    ], ids=["int-numpy", "rgba", "int-tensor", "0-255", "nhwc", "list", "nan", "inf",
            "empty-batch", "0x0", "zero-width", "numpy-0x0", "numpy-empty-batch"])
    def test_bad_inputs_say_what_was_expected(self, plugin, bad, message) -> None:
        with pytest.raises(ValueError, match=message):
            plugin.perceive(bad)

    @pytest.mark.parametrize("bad", [torch.zeros(1, 3, 0, 0), torch.full((1, 3, 30, 30),
                                                                         float("nan"))])
    def test_resizing_does_not_hide_empty_or_nan_input(self, host, checkpoint, bad) -> None:
        resizing = host.create("tinyvae", {"checkpoint": str(checkpoint),
                                           "resize": True})
        with pytest.raises(ValueError, match="no pixels|NaN"):
            resizing.perceive(bad)


class TestCheckpoints:
    def test_teacher_only_checkpoint_is_a_clear_error(self, host, tmp_path) -> None:
        teacher = TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1)
        path = save_checkpoint(model_entry(teacher, "teacher"), tmp_path / "teacher.pth")
        with pytest.raises(CheckpointError, match="no 'student' model"):
            host.create("tinyvae", {"checkpoint": str(path)})

    def test_non_tinyvae_student_is_refused(self, host, tmp_path) -> None:
        teacher = TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1)
        path = save_checkpoint(model_entry(teacher, "student"), tmp_path / "odd.pth")
        with pytest.raises(CheckpointError, match="needs a MinimalVAE"):
            host.create("tinyvae", {"checkpoint": str(path)})

    def test_corrupt_checkpoint_is_a_clear_error(self, host, tmp_path) -> None:
        path = tmp_path / "tinyvae_best.pth"
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            TinyVAEPlugin(TinyVAEConfig(checkpoint=path))

    def test_safetensors_weights_give_the_same_run(self, host, plugin, checkpoint, tmp_path,
                                                    photo_batch) -> None:
        path = save(load(checkpoint), tmp_path / "tinyvae.safetensors")
        from_st = host.create("tinyvae", {"checkpoint": str(path), "max_steps": 8})
        a, b = plugin.perceive(photo_batch[:2]), from_st.perceive(photo_batch[:2])
        assert torch.equal(a.latent, b.latent)
        assert a.telemetry["energy_trajectory"] == b.telemetry["energy_trajectory"]

    def test_non_finite_weights_are_refused(self, host, checkpoint, tmp_path) -> None:
        payload = torch.load(checkpoint)
        next(iter(payload["student_state_dict"].values())).view(-1)[0] = float("nan")
        path = tmp_path / "nan.pth"
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match="NaN or infinite weights"):
            host.create("tinyvae", {"checkpoint": str(path)})

    def test_weights_come_from_the_checkpoint(self, plugin, checkpoint) -> None:
        stored = torch.load(checkpoint)["student_state_dict"]
        for key, value in plugin.model.state_dict().items():
            assert torch.equal(value, stored[key]), key


def test_docs_list_every_config_field() -> None:
    section = IRP_DOC.read_text().split("## The `tinyvae` plugin")[1].split("\n## ")[0]
    for field in TinyVAEConfig.model_fields:
        assert f"`{field}`" in section, field


class TestHost:
    def test_orchestrator_writes_valid_json_lines(self, host, checkpoint, frames_rgb) -> None:
        log = io.StringIO()
        orch = Orchestrator.from_registry({"tinyvae": {"checkpoint": str(checkpoint)}},
                                          step_budget=4, telemetry=log, registry=host)
        results = orch.run([frames_rgb[0], frames_rgb[1:4]])
        lines = [json.loads(ln) for ln in log.getvalue().splitlines()]
        assert [r["input_id"] for r in lines] == [0, 1]
        assert [r["batch_size"] for r in lines] == [1, 3]
        for record in lines:
            validate_telemetry(record)
            assert record["max_steps"] == 4 and record["plugin"] == "tinyvae"
        assert results[1]["tinyvae"].state.x.shape == (3, 8, 4, 4)

    def test_budget_is_split_among_plugins(self, host, checkpoint) -> None:
        a = host.create("tinyvae", {"checkpoint": str(checkpoint)})
        assert Orchestrator({"a": a, "b": a}, step_budget=9).steps_per_plugin == 4
        assert Orchestrator({"a": a, "b": a}, step_budget=1).steps_per_plugin == 1
        with pytest.raises(ValueError, match="step_budget"):
            Orchestrator({"a": a}, step_budget=0)

    def test_command_line_lists_and_runs(self, checkpoint, tmp_path, capsys) -> None:
        assert cli_main(["irp", "--list"]) == 0
        assert re.search(r"^tinyvae\s+perception", capsys.readouterr().out, re.M)
        out = tmp_path / "t.jsonl"
        config = json.dumps({"checkpoint": str(checkpoint)})
        assert cli_main(["irp", "--plugin", "tinyvae", "--config", f"tinyvae={config}",
                         "--num-crops", "4", "--batch-size", "2", "--step-budget", "3",
                         "--telemetry", str(out)]) == 0
        records = [json.loads(ln) for ln in out.read_text().splitlines()]
        assert len(records) == 2 and all(r["steps"] == 2 for r in records)

    def test_command_line_errors_name_the_problem(self, tmp_path, capsys) -> None:
        config = json.dumps({"checkpoint": str(tmp_path / "none.pth"), "stepsize": 1})
        assert cli_main(["irp", "--plugin", "tinyvae", "--config", f"tinyvae={config}",
                         "--num-crops", "2", "--telemetry", str(tmp_path / "t.jsonl")]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(r"hrm-vision irp: error: tinyvae config: checkpoint: .*not found.*"
                            r"unknown key 'stepsize' \(known keys: .*checkpoint.*\)\n", err), err
        assert cli_main(["irp", "--plugin", "tinyvae", "--config", "other={}"]) == 2
        assert "not among --plugin" in capsys.readouterr().err

    def test_docs_example_runs(self, checkpoint, tmp_path, monkeypatch) -> None:
        section = IRP_DOC.read_text().split("## Use in an IRP host")[1]
        code = section.split("```python\n")[1].split("```")[0]
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "tinyvae_best.pth").write_bytes(checkpoint.read_bytes())
        monkeypatch.chdir(tmp_path)
        namespace: dict = {}
        exec(compile(code, "docs/irp.md", "exec"), namespace)
        assert namespace["result"].latent.shape == (4, 8, 4, 4)
        lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
        assert len(lines) == 2
        for line in lines:
            validate_telemetry(json.loads(line))


class TestMeasure:
    def test_measure_reports_every_setting(self, checkpoint, tmp_path, capsys) -> None:
        out = tmp_path / "m.json"
        assert measure_cli.main(["--checkpoint", str(checkpoint), "--num-crops", "8",
                                 "--batch-size", "4", "--steps", "3", "6", "--threads", "1",
                                 "--json", str(out)]) == 0
        table = capsys.readouterr().out
        assert "bare model" in table and "plain encoder" in table and "max_steps=6" in table
        rows = json.loads(out.read_text())["rows"]
        assert [r["max_steps"] for r in rows] == [0, 1, 3, 6]  # 0: the bare model
        assert rows[0]["psnr_db"] == pytest.approx(rows[1]["psnr_db"], abs=1e-6)
        assert all(r["energy_never_rose"] == 1.0 for r in rows)
        assert rows[3]["psnr_db"] > rows[1]["psnr_db"]
        assert all(r["ms_per_image"] > 0 for r in rows)


def test_latents_as_8bit_codes_and_tokens(checkpoint: Path, tmp_path: Path) -> None:
    """A spatial student's latents (B, 8, h, w) as uint8 codes of the same shape and as token ids
    (B, 2) of codebooks over the whole latent, decoded back; without a codes file, a ValueError."""
    from hrm_vision.codes import Codes, fit_codebooks, fit_spread

    plugin = TinyVAEPlugin(TinyVAEConfig(checkpoint=checkpoint))
    images = PhotoCrops("train", num_crops=520, image_size=16).images_uint8.float() / 255.0
    z = plugin.encode(images)
    with pytest.raises(ValueError, match="with the codes setting"):
        plugin.to_code(z, "8bit")
    path = tmp_path / "codes.safetensors"
    path.write_bytes(Codes(*fit_spread(z), fit_codebooks(z, stages=2, iterations=3)).to_bytes())
    coded = TinyVAEPlugin(TinyVAEConfig(checkpoint=checkpoint, codes=path))
    z = plugin.encode(PhotoCrops("val", num_crops=4, image_size=16).images_uint8.float() / 255.0)
    q, ids = coded.to_code(z, "8bit"), coded.to_code(z, "tokens")
    assert q.dtype == torch.uint8 and q.shape == z.shape
    assert ids.dtype == torch.int64 and ids.shape == (4, 2)
    exact = coded.decode(z)
    assert psnr(coded.decode(coded.from_code(q, z.shape[1:])), exact) > 35
    worse = psnr(coded.decode(coded.from_code(ids[:, :1], z.shape[1:])), exact)
    assert 0 < worse < psnr(coded.decode(coded.from_code(ids, z.shape[1:])), exact)
    with pytest.raises(ValueError, match="form 'int4'"):
        coded.to_code(z, "int4")
    with pytest.raises(ValueError, match="none.safetensors is not a codes file"):
        TinyVAEPlugin(TinyVAEConfig(checkpoint=checkpoint, codes=tmp_path / "none.safetensors"))
