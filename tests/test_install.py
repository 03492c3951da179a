"""Installing the package: core dependencies and extras, lazy imports, the ``hrm-vision`` command.

The core-install tests run in fresh interpreters (subprocesses). One hides every optional module
behind an import blocker, as a core-only environment would, and runs the README's deployment
snippet and the IRP plugin on a checkpoint there.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from hrm_vision import _extras, cli
from hrm_vision._extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: Modules a core install must not import (the brief's list plus the rest of the extras).
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "skimage", "matplotlib", "torchvision",
            "torchmetrics", "tqdm", "PIL", "tensorboard", "scipy")
CORE_MODULES = ("hrm_vision", "hrm_vision.vae", "hrm_vision.io", "hrm_vision.irp",
                "hrm_vision.irp.tinyvae", "hrm_vision.irp.host", "hrm_vision.data",
                "hrm_vision.cli")
#: The deployment snippet, as the README must show it.
SNIPPET = """\
from hrm_vision.vae import MinimalVAE
model = MinimalVAE(latent_dim=128, base_channels=32)
checkpoint = torch.load('checkpoints/tinyvae_best.pth')
model.load_state_dict(checkpoint['student_state_dict'])
model.eval()
with torch.no_grad():
    latent = model.encode(image)
    reconstruction = model.decode(latent)
"""


def run_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter with the repository on the path; its last stdout line
    is JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def readme_python_blocks(section: str) -> list[str]:
    """The ```python blocks of README section ``section`` (a ``## `` heading), in order."""
    text = README.read_text().split(f"\n## {section}\n")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


# ------------------------------------------------------------------------- core install
BLOCKER = """
import importlib.abc, json, sys, traceback
OPTIONAL = set(%r)
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    # What a core-only environment looks like: optional modules are not there.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in OPTIONAL:
            stack = traceback.extract_stack()[:-1]  # the import machinery, then the importer
            while stack and (stack[-1].filename.startswith("<frozen")
                             or stack[-1].filename.endswith("importlib/__init__.py")):
                stack.pop()
            importer = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"
            attempts.append([name, importer])
            raise ModuleNotFoundError(f"No module named {name!r} (core install)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


@pytest.fixture(scope="module")
def core_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fresh interpreter, optional modules blocked: import the core modules, write a student
    checkpoint, run the README's "Using a trained model" blocks and the plugin through a host."""
    cwd = tmp_path_factory.mktemp("core")
    blocks = readme_python_blocks("Using a trained model")
    code = BLOCKER % (OPTIONAL,) + textwrap.dedent(f"""
        for name in {CORE_MODULES!r}:
            __import__(name)
        after_import = sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL)

        import os, torch
        from hrm_vision.io import model_entry, save_checkpoint
        from hrm_vision.vae import LatentAdapter, MinimalVAE
        os.makedirs("checkpoints")
        torch.manual_seed(0)
        adapter = LatentAdapter(student_dim=128, teacher_dim=512)
        save_checkpoint({{**model_entry(MinimalVAE(latent_dim=128, base_channels=32), "student"),
                          "adapter_state_dict": adapter.state_dict(),
                          "adapter_arch": adapter.arch_config()}},
                        "checkpoints/tinyvae_best.pth")
        namespace = {{}}
        for block in {blocks!r}:
            exec(compile(block, "README.md", "exec"), namespace)

        from hrm_vision.irp import get_registry, validate_telemetry
        host = get_registry()
        plugin = host.create("tinyvae", {{"checkpoint": "checkpoints/tinyvae_best.pth"}})
        result = plugin.run(torch.rand(2, 3, 32, 32), max_steps=3, input_id=0)
        validate_telemetry(result.telemetry)  # jsonschema is a core dependency
        print(json.dumps({{
            "after_import": after_import,
            "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL),
            "ours": [a for a in attempts if "/hrm_vision/" in a[1]],
            "attempts": attempts,
            "latent": list(namespace["latent"].shape),
            "reconstruction": list(namespace["reconstruction"].shape),
            "teacher_latent": list(namespace["teacher_latent"].shape),
            "perceive_latent": list(namespace["result"].latent.shape),
            "states": len(result.history),
            "host_errors": [str(e) for e in host.errors],
        }}))
        """)
    return run_python(code, cwd)


class TestCoreInstall:
    def test_core_modules_import_no_optional_module(self) -> None:
        """The brief's check, without any blocking: a fresh interpreter imports the core
        modules, and no optional module enters ``sys.modules`` beyond what torch itself loads
        when it is installed (torch.hub imports tqdm if it can; the blocked run covers tqdm)."""
        code = textwrap.dedent(f"""
            import json, sys
            optional = {OPTIONAL!r}
            import torch
            by_torch = sorted(m for m in optional if m in sys.modules)
            for name in {CORE_MODULES!r}:
                __import__(name)
            from hrm_vision.irp import get_registry
            get_registry()
            print(json.dumps({{"by_torch": by_torch,
                              "loaded": sorted(m for m in optional if m in sys.modules)}}))
            """)
        result = run_python(code, ROOT)
        assert set(result["by_torch"]) <= {"tqdm"}
        assert result["loaded"] == result["by_torch"]

    def test_no_hrm_vision_code_asks_for_an_optional_module(self, core_run: dict) -> None:
        assert core_run["ours"] == [], "optional imports from hrm_vision on the core path"
        assert core_run["attempts"], "the blocker saw nothing: it is not working"
        assert core_run["after_import"] == [] and core_run["loaded"] == []

    def test_deployment_snippet_runs_on_a_core_install(self, core_run: dict) -> None:
        assert core_run["latent"] == [1, 128, 4, 4]
        assert core_run["reconstruction"] == [1, 3, 32, 32]
        assert core_run["teacher_latent"] == [1, 512, 4, 4]  # the adapter loads on a core install
        assert core_run["perceive_latent"] == [1, 128, 4, 4]

    def test_irp_plugin_runs_on_a_core_install(self, core_run: dict) -> None:
        assert core_run["states"] == 3 and core_run["host_errors"] == []

    def test_readme_shows_the_deployment_snippet_verbatim(self) -> None:
        blocks = readme_python_blocks("Using a trained model")
        assert any(SNIPPET in block for block in blocks)


# ------------------------------------------------------------------------- missing extras
def hide(monkeypatch: pytest.MonkeyPatch, top: str) -> None:
    """Make ``top`` and its submodules unimportable, as if not installed."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)


def assert_names_extra(exc: BaseException, extra: str, dist: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert f"pip install 'hrm-vision[{extra}]'" in message and dist in message


class TestMissingExtras:
    def test_require_returns_the_module(self) -> None:
        assert require("json") is json

    def test_require_names_extra_and_distribution(self, monkeypatch: pytest.MonkeyPatch) -> None:
        hide(monkeypatch, "skimage")
        with pytest.raises(MissingExtraError) as info:
            require("skimage.data", extra="photos", purpose="the 'photos' dataset")
        assert str(info.value) == ("the 'photos' dataset needs scikit-image (module 'skimage'), "
                                   "which is not installed: pip install 'hrm-vision[photos]'")
        assert isinstance(info.value, ImportError) and info.value.extra == "photos"

    def test_a_broken_dependency_is_not_hidden(self, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "half_installed.py").write_text("import no_such_module_xyz\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(ModuleNotFoundError) as info:
            require("half_installed", extra="train")
        assert not isinstance(info.value, MissingExtraError)
        assert info.value.name == "no_such_module_xyz"

    def test_photos_without_scikit_image(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from hrm_vision.data import PhotoCrops, load_photo

        hide(monkeypatch, "skimage")
        with pytest.raises(MissingExtraError) as info:
            load_photo("astronaut")  # cached in this process: the check still runs
        assert_names_extra(info.value, "photos", "scikit-image")
        with pytest.raises(MissingExtraError):
            PhotoCrops("val", num_crops=2)

    def test_photos_without_pillow(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from hrm_vision.data import load_photo, make_crops

        load_photo("coffee")  # skimage's loaders need PIL too: load (and cache) it first
        hide(monkeypatch, "PIL")
        with pytest.raises(MissingExtraError) as info:
            make_crops(["coffee"], 2, 32, seed=0, scales=(0.5,))
        assert_names_extra(info.value, "photos", "pillow")

    @pytest.mark.parametrize("top, dist", [("PIL", "pillow"), ("tqdm", "tqdm")])
    def test_imagefolder_without_its_extra(self, tmp_path: Path, top: str, dist: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        from hrm_vision.data import ImageFolderImages

        for name in ("a.png", "b.png", "c.png"):
            (tmp_path / name).write_bytes(b"not decoded: the extra check comes first")
        hide(monkeypatch, top)
        with pytest.raises(MissingExtraError) as info:
            ImageFolderImages(tmp_path, "train")
        assert_names_extra(info.value, "train", dist)

    def test_cifar10_download_without_torchvision(self, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        from hrm_vision.data import TRAIN_FILES, ensure_files

        hide(monkeypatch, "torchvision")
        with pytest.raises(MissingExtraError) as info:
            ensure_files(tmp_path, TRAIN_FILES, download=True)
        assert_names_extra(info.value, "train", "torchvision")

    def test_irp_host_images_without_pillow(self, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        from hrm_vision.irp import host

        hide(monkeypatch, "PIL")
        args = host.setup_args().parse_args(["--images", str(tmp_path / "a.png")])
        with pytest.raises(MissingExtraError) as info:
            host._inputs(args)
        assert_names_extra(info.value, "train", "pillow")


# ------------------------------------------------------------------------- pyproject
def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extra_names(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Distribution names an extra brings, self-references (``hrm-vision[a,b]``) expanded."""
    names = set()
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        name = requirement_name(req)
        if name == "hrm-vision":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                if sub.strip() not in seen:
                    names |= extra_names(sub.strip(), seen | {extra})
        else:
            names.add(name)
    return names


def declared() -> set[str]:
    core = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    return core | extra_names("all") | extra_names("dev")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path`` outside the standard library."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "hrm_vision"}


class TestPackaging:
    def test_core_dependencies_are_what_models_checkpoints_and_irp_need(self) -> None:
        core = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
        assert core == {"torch", "numpy", "pydantic", "pluggy", "jsonschema", "safetensors"}

    def test_extras(self) -> None:
        extras = PYPROJECT["project"]["optional-dependencies"]
        assert {"train", "photos", "export", "tensorboard", "all", "dev"} <= set(extras)
        assert {"torchvision", "tqdm", "torchmetrics", "matplotlib", "pillow"} <= \
            extra_names("train")
        assert "scikit-image" in extra_names("photos")
        assert {"onnx", "onnxscript", "onnxruntime"} <= extra_names("export")
        assert "tensorboard" in extra_names("tensorboard")
        every = {n for e in extras if e not in ("all", "dev") for n in extra_names(e)}
        assert extra_names("all") == every
        assert extra_names("dev") == every | {"pytest", "pytest-benchmark", "ruff"}

    def test_plain_version_ranges_only(self) -> None:
        project = PYPROJECT["project"]
        reqs = project["dependencies"] + [r for rs in project["optional-dependencies"].values()
                                         for r in rs]
        for req in reqs:
            assert "@" not in req and "://" not in req and "--" not in req, req
        assert "index-url" not in (ROOT / "pyproject.toml").read_text()

    def test_extras_table_of_the_helper_matches_pyproject(self) -> None:
        for module, extra in _extras.EXTRAS.items():
            assert _extras.DISTRIBUTIONS.get(module, module) in extra_names(extra), (module, extra)

    def test_every_third_party_import_of_the_package_is_declared(self) -> None:
        dists = metadata.packages_distributions()
        wanted = declared()
        undeclared = {}
        for path in sorted((ROOT / "hrm_vision").rglob("*.py")):
            for name in third_party_imports(path):
                provided_by = {d.lower().replace("_", "-") for d in dists.get(name, [])}
                if not provided_by & wanted:
                    undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
        assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"

    def test_console_script_is_installed(self) -> None:
        scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
        assert PYPROJECT["project"]["scripts"] == {"hrm-vision": "hrm_vision.cli:main"}
        assert scripts.get("hrm-vision") == "hrm_vision.cli:main", \
            "reinstall the package (make reinstalls when pyproject.toml changes)"


# ------------------------------------------------------------------------- hrm-vision command
AGREED = {
    "distill": "hrm_vision.train",
    "evaluate": "hrm_vision.evaluate",
    "export": "hrm_vision.export",
    "irp": "hrm_vision.irp.host",
    "perceive": "hrm_vision.perceive",
    "trust": "hrm_vision.trust",
}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class TestCommand:
    def test_dispatch_table(self) -> None:
        assert {name: c.module for name, c in cli.COMMANDS.items()} == AGREED
        assert all(c.summary for c in cli.COMMANDS.values())

    @pytest.mark.parametrize("name", sorted(AGREED))
    def test_each_command_delegates_to_its_command(self, name: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        module = AGREED[name]
        if not importable(module):
            pytest.skip(f"{module} is not in this tree yet; checked once it exists")
        function = cli.load_command(name)
        assert function is importlib.import_module(module).command
        assert list(inspect.signature(function).parameters) == ["argv", "prog"]
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        assert f"usage: hrm-vision {name}" in capsys.readouterr().out

    @pytest.fixture
    def fake(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list:
        """A command ``fake`` whose main records its argv and returns 3, and ``needs-skimage``
        whose module imports a missing optional module."""
        (tmp_path / "fake_command_mod.py").write_text(textwrap.dedent("""
            CALLS = []
            def command(argv=None, prog="fake"):
                CALLS.append((argv, prog))
                return 3
            """))
        (tmp_path / "fake_needs_skimage.py").write_text("import skimage\ndef command(argv, prog):\n"
                                                        "    return 0\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake_command_mod", "a fake"))
        monkeypatch.setitem(cli.COMMANDS, "needs-skimage",
                            cli.Command("fake_needs_skimage", "needs the photos extra"))
        monkeypatch.delitem(sys.modules, "fake_needs_skimage", raising=False)
        return importlib.import_module("fake_command_mod").CALLS

    def test_passes_the_rest_of_argv_and_returns_the_status(self, fake: list) -> None:
        assert cli.main(["fake", "--epochs", "3", "x"]) == 3
        assert fake == [(["--epochs", "3", "x"], "hrm-vision fake")]

    def test_missing_extra_is_one_line(self, fake: list, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        hide(monkeypatch, "skimage")
        assert cli.main(["needs-skimage"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "pip install 'hrm-vision[photos]'" in err
        assert err.startswith("hrm-vision needs-skimage:")

    def test_usage_unknown_command_and_version(self,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["--help"]) == 0
        out = capsys.readouterr().out
        assert all(name in out for name in AGREED)
        assert cli.main([]) == 2
        assert cli.main(["distil"]) == 2
        assert "unknown command 'distil'" in capsys.readouterr().err
        assert cli.main(["--version"]) == 0
        assert capsys.readouterr().out.strip() == f"hrm-vision {cli.__version__}"

    def test_python_dash_m_is_the_same_command(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "hrm_vision", "--help"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == cli.usage()
