"""Files crafted to nest deeply or to carry huge metadata are refused by name, not with a
``RecursionError`` traceback: a ``.pth`` checkpoint holding a list nested 100,000 levels deep,
``.safetensors`` metadata whose ``arch`` JSON nests 20,000 levels (or 40: still more than an
architecture has) or 100,000 (then too large), and metadata past the size bound. Every loader
path is checked: the library functions and the commands that read checkpoints (training
``--resume`` and ``--teacher-checkpoint``, evaluation, export, the IRP host's plugin).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from safetensors.torch import save_file

from hrm_vision.cli import main as cli_main
from hrm_vision.io import (
    MAX_METADATA_CHARS,
    CheckpointError,
    load_checkpoint,
    load_model,
    load_pretrained,
    load_pretrained_adapter,
    read_metadata,
    save_checkpoint,
)
from hrm_vision.vae import MinimalVAE

DEPTH = 100_000
TOO_DEEP = "is nested too deep"


def deep_pickle(depth: int) -> bytes:
    """Pickle opcodes of ``{"history": [[[...]]]}`` nested ``depth`` lists deep (written by
    hand: ``pickle.dumps`` of such a list would itself exceed the recursion limit)."""
    key = b"history"
    return (b"\x80\x02}X" + len(key).to_bytes(4, "little") + key
            + b"]" * depth + b"a" * (depth - 1) + b"s.")


def write_deep_pth(path: Path, depth: int = DEPTH) -> Path:
    """A torch zip checkpoint (as ``torch.save`` writes it) whose pickle is :func:`deep_pickle`."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    template = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in template.namelist():
            data = template.read(name)
            out.writestr(name, deep_pickle(depth) if name.endswith("data.pkl") else data)
    return path


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def write_safetensors(path: Path, **metadata: str) -> Path:
    """A tiny student's weights with ``metadata`` over what ``save_pretrained`` writes."""
    torch.manual_seed(0)
    model = MinimalVAE(latent_dim=8, base_channels=8)
    model.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={**read_metadata(path), **metadata})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("limits")
    write_deep_pth(d / "deep.pth")
    write_safetensors(d / "deep_arch.safetensors", arch=nested_json(20_000))
    write_safetensors(d / "deeper_arch.safetensors", arch=nested_json(DEPTH))
    write_safetensors(d / "nested_arch.safetensors", arch=nested_json(40))
    write_safetensors(d / "deep_adapter.safetensors", adapter_arch=nested_json(20_000))
    write_safetensors(d / "large.safetensors", images="x" * MAX_METADATA_CHARS)
    return d


class TestPth:
    def test_torch_loads_the_crafted_file(self, files: Path) -> None:
        """The file is what it claims: torch reads the 100,000 levels without recursing."""
        value = torch.load(files / "deep.pth", weights_only=True)["history"]
        depth = 0
        while isinstance(value, list) and value:
            value, depth = value[0], depth + 1
        assert depth == DEPTH - 1  # the innermost list is empty

    @pytest.mark.parametrize("load", [load_checkpoint, load_model,
                                      lambda p: load_pretrained(p),
                                      lambda p: MinimalVAE.from_pretrained(p)],
                             ids=["load_checkpoint", "load_model", "load_pretrained",
                                  "from_pretrained"])
    def test_loaders_name_the_file(self, files: Path, load: Callable[[Path], object]) -> None:
        with pytest.raises(CheckpointError, match=f"deep.pth {TOO_DEEP}: more than 32 levels"):
            load(files / "deep.pth")

    def test_a_checkpoint_of_this_package_nests_little(self, tmp_path: Path) -> None:
        """The bound is far above what a real payload holds (a history record: 4 levels)."""
        payload = {"history": [{"phase": "distill", "val": {"psnr": 20.0}}],
                   "deep": [[[[[[1]]]]]]}
        save_checkpoint(payload, tmp_path / "ok.pth")
        assert load_checkpoint(tmp_path / "ok.pth")["deep"] == [[[[[[1]]]]]]


class TestSafetensors:
    @pytest.mark.parametrize("name, expect", [
        ("deep_arch", "the 'arch' metadata of {p} is nested too deep"),
        ("nested_arch", "the 'arch' metadata of {p} is nested too deep: more than 2 levels"),
        ("deeper_arch", "metadata of {p} is too large: 200"),
        ("large", f"characters, at most {MAX_METADATA_CHARS}"),
    ])
    def test_model_loaders_name_the_file(self, files: Path, name: str, expect: str) -> None:
        path = files / f"{name}.safetensors"
        for load in (load_pretrained, MinimalVAE.from_pretrained):
            with pytest.raises(CheckpointError) as info:
                load(path)
            assert expect.format(p=path) in str(info.value)

    def test_adapter_loader_names_the_file(self, files: Path) -> None:
        path = files / "deep_adapter.safetensors"
        with pytest.raises(CheckpointError, match="'adapter_arch' metadata .* nested too deep"):
            load_pretrained_adapter(path)
        assert isinstance(load_pretrained(path), MinimalVAE)  # a VAE load never reads it


def write_crafted_models(d: Path) -> None:
    """``typed.pth``: a student and a teacher with one int64 weight each; ``wide.pth``: with
    an empty ``(0, 200000)`` tensor and ``base_channels`` 20,000 (an empty tensor must not
    lift the architecture bound)."""
    from hrm_vision.io import model_entry
    from hrm_vision.vae import TeacherVAE

    torch.manual_seed(0)
    entries = {**model_entry(MinimalVAE(latent_dim=8, base_channels=8), "student"),
               **model_entry(TeacherVAE(**tiny_run.TEACHER), "teacher")}
    typed = {k: dict(v) if k.endswith("_state_dict") else v for k, v in entries.items()}
    for role in ("student", "teacher"):
        state = typed[f"{role}_state_dict"]
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].to(torch.int64)
    save_checkpoint(typed, d / "typed.pth")
    wide = {k: dict(v) for k, v in entries.items()}
    for role in ("student", "teacher"):
        wide[f"{role}_state_dict"]["wide"] = torch.zeros(0, 200_000)
        wide[f"{role}_arch"]["base_channels"] = 20_000
    save_checkpoint(wide, d / "wide.pth")


EVALUATE = ["--out-dir", "{d}/evaluation", "--num-images", "8", "--batch-size", "8",
            "--latency-repeats", "1", "--throughput-repeats", "1", "--throughput-batch", "2",
            "--warmup", "0", "--baseline-train-images", "0", "--dataset", "imagefolder",
            "--data-dir", "{d}/images"]


def commands(d: Path, deep: str) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, given the crafted one ``deep``."""
    train = tiny_run.prepare(d, 1, train_samples=16, checkpoint_dir=d / "ckpt")
    return {
        "distill --resume": ["distill", *train, "--resume", deep],
        "distill --teacher-checkpoint": ["distill", *train, "--teacher-checkpoint", deep],
        "evaluate --student": ["evaluate", "--checkpoint-dir", str(d), "--student", deep,
                               *EVALUATE],
        "evaluate --teacher": ["evaluate", "--checkpoint-dir", str(d), "--teacher", deep,
                               *EVALUATE],
        "export": ["export", "--checkpoint", deep, "--out-dir", str(d / "exports"),
                   "--num-images", "4", "--timing-repeats", "0", "--dataset", "imagefolder",
                   "--data-dir", str(d / "images")],
        "irp": ["irp", "--plugin", "tinyvae", "--config",
                "tinyvae=" + json.dumps({"checkpoint": deep}), "--images",
                str(d / "images" / "crop_0000.png")],
    }


COMMANDS = ["distill --resume", "distill --teacher-checkpoint", "evaluate --student",
            "evaluate --teacher", "export", "irp"]
#: Crafted file -> what the message says; the model files are not training checkpoints, so
#: ``--resume`` gets the deep one only (typed weights on resume: test_resume_semantics.py).
CRAFTED = {"deep.pth": TOO_DEEP, "typed.pth": "wrong dtypes",
           "wide.pth": "base_channels=20000 is outside [0, "}
CASES = [(c, f) for f in CRAFTED for c in COMMANDS if f == "deep.pth" or "resume" not in c]


@pytest.mark.parametrize("command, crafted", CASES, ids=[f"{c}: {f}" for c, f in CASES])
def test_commands_give_one_line(command: str, crafted: str, files: Path,
                                capsys: pytest.CaptureFixture) -> None:
    if not (files / "typed.pth").exists():
        write_crafted_models(files)
    every = commands(files, str(files / crafted))
    assert sorted(every) == sorted(COMMANDS)
    argv = [a.replace("{d}", str(files)) for a in every[command]]
    status = cli_main(argv)
    err = capsys.readouterr().err
    expect = CRAFTED[crafted]
    assert "Traceback" not in err and "RecursionError" not in err, err[-3000:]
    assert status in (1, 2) and expect in err, (status, err[-3000:])
    line = next(ln for ln in err.splitlines() if expect in ln)
    assert str(files / crafted) in line and line.strip() != "", line
