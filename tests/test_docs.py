"""The README and docs/: the generated config table, links, length, and what the text speaks of."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import Field, create_model

from hrm_vision.train.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import config_table  # noqa: E402  (training/config_table.py, the generator of the table)

README = ROOT / "README.md"
DOCS = ROOT / "docs"
TRAINING = DOCS / "training.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: Pages written alongside these docs; until they exist, links to them are allowed to dangle.


class TestConfigTable:
    def test_training_page_matches_the_config_model(self) -> None:
        page_table = config_table.extract_table(TRAINING.read_text())
        assert page_table == config_table.render_table(), (
            "docs/training.md is out of date: run "
            "python training/config_table.py --write docs/training.md")

    def test_every_key_has_one_row(self) -> None:
        rows = config_table.config_rows()
        assert [r.key.strip("`") for r in rows] == list(DistillConfig.model_fields)

    @pytest.mark.parametrize("change", ["added", "removed", "re-described", "re-defaulted"])
    def test_a_changed_field_changes_the_table(self, change: str) -> None:
        fields = dict(DistillConfig.model_fields)
        name, field = "temperature", fields["temperature"]
        definitions = {k: (f.annotation, f) for k, f in fields.items()}
        if change == "added":
            definitions["new_key"] = (int, Field(1, description="a new key"))
        elif change == "removed":
            del definitions[name]
        elif change == "re-described":
            definitions[name] = (float, Field(3.0, gt=0, description="something else"))
        else:
            definitions[name] = (float, Field(2.0, gt=0, description=field.description))
        changed = create_model("Changed", **definitions)  # type: ignore[call-overload]
        assert config_table.render_table(changed) != config_table.render_table()

    def test_rows_show_type_default_range_and_choices(self) -> None:
        rows = {r.key.strip("`"): r for r in config_table.config_rows()}
        assert rows["image_size"].default == "`32`" and rows["image_size"].allowed == ">= 8"
        assert rows["grad_clip"].type == "float | null" and rows["temperature"].allowed == "> 0"
        assert rows["mixed_precision"].allowed == '`"auto"`, `"off"`, `"bf16"`, `"fp16"`'
        assert rows["device"].default == "`null`" and rows["teacher_cache"].default == "`true`"

    def test_nested_models_get_dotted_keys(self) -> None:
        inner = create_model("Inner", lr=(float, Field(0.1, description="step")))
        outer = create_model("Outer", optim=(inner, Field(default_factory=inner)),
                             seed=(int, Field(..., description="seed")))
        keys = [r.key for r in config_table.config_rows(outer)]
        assert keys == ["`optim.lr`", "`seed`"]
        assert config_table.config_rows(outer)[1].default == "required"

    def test_check_and_write(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        page = tmp_path / "page.md"
        page.write_text(f"# t\n\n{config_table.START_MARKER}\n| stale |\n"
                        f"{config_table.END_MARKER}\nafter\n")
        assert config_table.main(["--check", str(page)]) == 1
        assert config_table.main(["--write", str(page)]) == 0
        assert config_table.main(["--check", str(page)]) == 0
        text = page.read_text()
        assert text.startswith("# t\n\n") and text.endswith(f"{config_table.END_MARKER}\nafter\n")
        (tmp_path / "none.md").write_text("no markers\n")
        assert config_table.main(["--check", str(tmp_path / "none.md")]) == 2
        capsys.readouterr()

    def test_every_config_field_is_described(self) -> None:
        assert config_table.undescribed_fields() == []


# ------------------------------------------------------------------------- links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(target)
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_link_checker_sees_links() -> None:
    links = relative_links(README)
    assert "docs/training.md" in links and "docs/irp.md" in links
    assert slug("## Using a `trained` model!".lstrip("# ")) == "using-a-trained-model"


def test_readme_links_the_module_map_and_the_models() -> None:
    for page in (DOCS / "architecture.md", DOCS / "models.md"):
        assert page.is_file()
        assert any(page == (README.parent / t).resolve() for t in relative_links(README))


# ------------------------------------------------------------------------- what the text says
#: Words about how the project was made, or pointers outside the repository.
#: (Each pattern has one letter in a character class so this file does not match itself.)
FORBIDDEN = [r"\.\./share[d]", r"DESIG[N]\.md", r"owne[r]:", r"\bthe lea[d]\b", r"goal in issu[e]",
             r"\bthe see[d]\b", r"\bmissio[n]\b", r"\bsessio[n]\b", r"\blab noteboo[k]\b",
             r"other enginee[r]s"]
#: The documentation and project files checked for them.
OWN_FILES = [README, *sorted(DOCS.glob("*.md")),
             ROOT / "pyproject.toml", ROOT / "Makefile", ROOT / ".ci" / "run",
             ROOT / "hrm_vision" / "__init__.py", ROOT / "hrm_vision" / "__main__.py",
             ROOT / "hrm_vision" / "cli.py", ROOT / "hrm_vision" / "_extras.py",
             ROOT / "training" / "config_table.py",
             *sorted((ROOT / "hrm_vision" / "irp").glob("*.py")),
             *sorted((ROOT / "hrm_vision" / "irp").glob("*.json")),
             ROOT / "hrm_vision" / "data.py",
             ROOT / "tests" / "test_install.py", *sorted((ROOT / "tests").glob("test_irp*.py")),
             ROOT / "tests" / "test_data.py"]


@pytest.mark.parametrize("path", OWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_text_speaks_of_the_product_only(path: Path) -> None:
    text = path.read_text()
    hits = [w for w in FORBIDDEN if re.search(w, text, re.I)]
    assert not hits, f"{path.relative_to(ROOT)} mentions {hits}"


def test_readme_is_short_and_keeps_its_promises() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for heading in ("## Install", "## Quick start", "## Using a trained model",
                    "## Training on your own folder of images", "## CIFAR-10 on a GPU box",
                    "## Troubleshooting", "## Results", "## Documentation"):
        assert f"\n{heading}" in text, heading
    assert "make demo" in text and "make test" in text
    assert re.search(r"pip install -e \.\s", text) and "pip install -e '.[all]'" in text
    results = text.split("\n## Results\n")[1].split("\n## ")[0]
    # measured numbers, with the command that produced them and the date of the measurement
    assert "placeholder" not in results.lower() and "hrm-vision evaluate" in results
    assert re.search(r"\d+\.\d+ dB", results) and re.search(r"20\d\d-\d\d-\d\d", results)


# ------------------------------------------------------------------------- robustness table
def robustness_selections() -> list[tuple[list[str], list[str]]]:
    """Each ``pytest tests/A.py [tests/B.py ...] [-k EXPR]`` docs/robustness.md names: the files
    and the words of its ``-k`` expression (``and``/``or``/``not`` left out)."""
    text = (DOCS / "robustness.md").read_text()
    found = []
    for command in re.findall(r"`pytest ([^`]+)`", text):
        files, _, expr = command.partition(" -k ")
        words = [w for w in re.findall(r"[\w\[\]-]+", expr) if w not in ("and", "or", "not")]
        found.append((re.findall(r"tests/[\w/]+\.py", files), words))
    return found


def test_every_guarantee_names_a_test_that_exists() -> None:
    """The tests docs/robustness.md points at exist: every file, and each ``-k`` word in one of
    the files of its command."""
    selections = robustness_selections()
    assert len(selections) > 20 and all(files for files, _ in selections)
    missing = [f for files, _ in selections for f in files if not (ROOT / f).is_file()]
    assert not missing, missing
    unmatched = [(files, w) for files, words in selections for w in words
                 if not any(w in (ROOT / f).read_text() for f in files)]
    assert not unmatched, unmatched
