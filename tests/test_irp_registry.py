"""The plugin system: hookspecs, entry points, built-ins, allow-list, broken plugins, configs."""

from __future__ import annotations

import inspect
import re
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from test_irp_contract import ToyConfig, ToyPlugin  # tests/ is on sys.path under pytest

from hrm_vision.irp import (
    ALLOW_ENV,
    ENTRY_POINT_GROUP,
    PluginConfigError,
    PluginRegistry,
    PluginWarning,
    contract,
    get_registry,
    hookimpl,
)
from hrm_vision.irp.registry import HOOK_NAMES
from hrm_vision.irp.tinyvae import TinyVAEConfig, TinyVAEPlugin

IRP_DOC = Path(__file__).resolve().parents[1] / "docs" / "irp.md"


class FixturePlugin:
    """A third-party style plugin object registering the toy plugin as ``"toy"``."""

    @hookimpl
    def register_irp_plugins(self, register: Any) -> None:
        register("toy", ToyPlugin, ToyConfig, kind="test", description="fixture")


def fake_distribution(root: Path, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """An installed-looking distribution under ``root`` (a sys.path entry): modules + dist-info."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / "hrm_vision_fixture_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hrm-vision-fixture-plugins\n"
                                   "Version: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")


GOOD_MODULE = """
from hrm_vision.irp import hookimpl
from test_irp_contract import ToyConfig, ToyPlugin

@hookimpl
def register_irp_plugins(register):
    register("toy_ep", ToyPlugin, ToyConfig, kind="test", description="from an entry point")
"""


@pytest.fixture
def fixture_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Entry points ``good`` (works), ``broken`` (raises on import), ``typo`` (unknown hook)."""
    fake_distribution(tmp_path, {
        "hrmv_good_plugin": GOOD_MODULE,
        "hrmv_broken_plugin": "raise RuntimeError('this plugin is broken')\n",
        "hrmv_typo_plugin": """
            from hrm_vision.irp import hookimpl

            @hookimpl
            def register_irp_plugin(register):  # missing "s": not a hook
                pass
            """,
    }, {"good": "hrmv_good_plugin", "broken": "hrmv_broken_plugin", "typo": "hrmv_typo_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    return tmp_path


class TestHookDocumentation:
    def test_every_hook_has_a_docstring_and_a_docs_entry(self) -> None:
        assert HOOK_NAMES == ("register_irp_plugins",)
        section = IRP_DOC.read_text().split("## Plugin hooks")[1].split("\n## ")[0]
        for name in HOOK_NAMES:
            doc = inspect.getdoc(getattr(contract, name)) or ""
            assert len(doc) > 80, f"hook {name} has no real docstring"
            params = list(inspect.signature(getattr(contract, name)).parameters)
            assert f"{name}({', '.join(params)})" in section, f"hook {name} not in docs/irp.md"

    def test_markers_are_named_for_the_project(self) -> None:
        assert contract.hookspec.project_name == "hrm_vision"
        assert hookimpl.project_name == "hrm_vision"


class TestDiscovery:
    def test_entry_point_is_installed_metadata(self) -> None:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
        tinyvae = [ep for ep in eps if ep.name == "tinyvae"]
        assert tinyvae and tinyvae[0].value == "hrm_vision.irp.tinyvae"
        assert tinyvae[0].load() is __import__("hrm_vision.irp.tinyvae", fromlist=["x"])

    def test_builtin_is_registered_like_an_entry_point_and_only_once(self) -> None:
        only_entry_points = PluginRegistry(builtins=())
        only_builtins = PluginRegistry(load_entry_points=False)
        both = PluginRegistry()
        for host in (only_entry_points, only_builtins, both):
            info = host.list_plugins()["tinyvae"]
            assert info.factory is TinyVAEPlugin and info.config_model is TinyVAEConfig
            assert info.kind == "perception"
        assert len(both.pm.get_plugins()) == 1 and not both.errors

    def test_fixture_plugin_registers_and_unregisters(self) -> None:
        host = get_registry()
        assert "toy" not in host.list_plugins()
        host.register(FixturePlugin(), name="fixture")
        try:
            plugins = host.list_plugins()
            assert plugins["toy"].source == "fixture" and plugins["toy"].kind == "test"
            plugin = host.create("toy", {"target": 1.0, "rate": 1.0})
            assert plugin.refine(3.0, max_steps=2)[0].x == 1.0
        finally:
            host.unregister("fixture")
        assert "toy" not in host.list_plugins() and "tinyvae" in host.list_plugins()

    def test_third_party_entry_points_load_and_broken_ones_are_reported(
            self, fixture_dist: Path) -> None:
        with pytest.warns(PluginWarning) as caught:
            host = PluginRegistry()
        plugins = host.list_plugins()
        assert {"tinyvae", "toy_ep"} <= set(plugins)  # the host started and kept the good ones
        errors = {e.name: e for e in host.errors}
        assert set(errors) == {"broken", "typo"}
        assert "this plugin is broken" in errors["broken"].message
        assert "register_irp_plugin" in errors["typo"].message
        assert any("broken" in str(w.message) for w in caught)

    def test_allow_list_env_var_restricts_entry_points(
            self, fixture_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ALLOW_ENV, "good, tinyvae")
        host = PluginRegistry()
        assert set(host.list_plugins()) == {"tinyvae", "toy_ep"} and not host.errors
        monkeypatch.setenv(ALLOW_ENV, "")
        host = PluginRegistry()
        assert set(host.list_plugins()) == {"tinyvae"}  # built-ins always load
        monkeypatch.setenv(ALLOW_ENV, "nonexistent")
        with pytest.warns(PluginWarning, match="nonexistent"):
            host = PluginRegistry()
        assert [e.name for e in host.errors] == ["nonexistent"]


class TestBadPlugins:
    def test_hook_that_raises_is_reported_and_others_survive(self) -> None:
        class Raising:
            @hookimpl
            def register_irp_plugins(self, register: Any) -> None:
                raise RuntimeError("boom")

        host = PluginRegistry(load_entry_points=False)
        host.register(Raising(), name="raising")
        with pytest.warns(PluginWarning, match="boom"):
            plugins = host.list_plugins()
        assert "tinyvae" in plugins and host.errors[0].name == "raising"

    def test_duplicate_name_and_bad_registration_are_reported(self) -> None:
        class Clash:
            @hookimpl
            def register_irp_plugins(self, register: Any) -> None:
                register("tinyvae", ToyPlugin, ToyConfig)
                register("nomodel", ToyPlugin, dict)

        host = PluginRegistry(load_entry_points=False)
        host.register(Clash(), name="clash")
        with pytest.warns(PluginWarning):
            plugins = host.list_plugins()
        assert plugins["tinyvae"].factory is TinyVAEPlugin  # the first one wins
        assert "nomodel" not in plugins
        messages = " ".join(e.message for e in host.errors)
        assert "already registered" in messages and "IRPConfig subclass" in messages

    def test_unknown_plugin_name_lists_the_choices(self) -> None:
        with pytest.raises(KeyError, match="tinyvae"):
            PluginRegistry(load_entry_points=False).create("nope")


class TestRegistryIsBuiltOnce:
    def test_hooks_run_once_until_a_module_is_registered(self) -> None:
        calls: list[str] = []

        class Counting:
            @hookimpl
            def register_irp_plugins(self, register: Any) -> None:
                calls.append("counting")
                register("toy", ToyPlugin, ToyConfig)

        registry = PluginRegistry(load_entry_points=False)
        registry.register(Counting(), name="counting")
        for _ in range(3):
            registry.get("toy")
        registry.create("toy", {})
        registry.list_plugins()
        assert calls == ["counting"]
        registry.unregister("counting")
        assert "toy" not in registry.list_plugins()
        registry.register(Counting(), name="counting")
        assert "toy" in registry.list_plugins() and calls == ["counting", "counting"]


class TestConfigErrors:
    @pytest.fixture
    def host(self) -> PluginRegistry:
        host = PluginRegistry(load_entry_points=False)
        host.register(FixturePlugin(), name="fixture")
        return host

    @pytest.mark.parametrize("config, field", [
        ({"rate": 0.0}, "rate"),
        ({"rate": "fast"}, "rate"),
        ({"max_steps": 0}, "max_steps"),
        ({"halt_window": 0}, "halt_window"),
    ])
    def test_errors_name_the_field(self, host: PluginRegistry, config: dict, field: str) -> None:
        with pytest.raises(PluginConfigError, match=rf"^toy config: {field}: "):
            host.create("toy", config)

    def test_unknown_key_lists_the_known_ones(self, host: PluginRegistry) -> None:
        with pytest.raises(PluginConfigError, match=r"^toy config: unknown key 'targte' "
                                                    r"\(known keys: .*target, rate\)$"):
            host.create("toy", {"targte": 1.0})

    def test_tinyvae_config_names_checkpoint_device_and_settings(self, host: PluginRegistry,
                                                                 tmp_path: Path) -> None:
        with pytest.raises(PluginConfigError, match=r"checkpoint: Field required"):
            host.create("tinyvae", {})
        with pytest.raises(PluginConfigError, match=r"checkpoint: .*not found"):
            host.create("tinyvae", {"checkpoint": str(tmp_path / "missing.pth")})
        existing = tmp_path / "x.pth"
        existing.write_bytes(b"")
        cases = {"device": "potato", "step_size": -1, "channel_order": "gbr",
                 "resize": "sometimes", "latent_bound": 0, "value_range": [1, 0],
                 "input_channels": 2, "img_size": 30}
        for field, value in cases.items():
            with pytest.raises(PluginConfigError, match=re.escape(f"{field}: ")):
                host.create("tinyvae", {"checkpoint": str(existing), field: value})
