"""training/entity_pairs.py: the halves of a corpus are disjoint, keep a picture's variants
together and share the held-out pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.scripts import load_script  # tests/ is on sys.path (pytest prepend mode)

ENTITY = load_script("training/entity_pairs.py", "entity_pairs")


def corpus(root: Path, train: list[str], val: list[str]) -> Path:
    for split, names in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for name in names:
            (root / split / name).write_bytes(name.encode())
    return root


def test_corpus_halves_are_disjoint_and_keep_variants_together(tmp_path) -> None:
    names = ["a-d.png", "a-l.png", "b.png", "c-d.png", "c-l.png", "d.jpg", "e.png"]
    src = corpus(tmp_path / "corpus", names, ["v1.png", "v2.png"])
    half_a, half_b = ENTITY.corpus_halves(src, tmp_path / "out")
    train_a, train_b = ({p.name for p in (h / "train").iterdir()} for h in (half_a, half_b))
    assert train_a | train_b == set(names) and not train_a & train_b
    for stem in ("a", "c"):  # the dark and light variants of one picture in one half
        assert {f"{stem}-d.png", f"{stem}-l.png"} <= train_a or \
            {f"{stem}-d.png", f"{stem}-l.png"} <= train_b
    assert min(len(train_a), len(train_b)) >= 2
    for half in (half_a, half_b):
        assert sorted(p.name for p in (half / "val").iterdir()) == ["v1.png", "v2.png"]
        link = half / "val" / "v1.png"
        assert link.is_symlink() and link.read_bytes() == b"v1.png"
    assert ENTITY.corpus_halves(src, tmp_path / "out") == [half_a, half_b]  # a rerun keeps them


def test_a_corpus_of_one_picture_is_refused(tmp_path) -> None:
    src = corpus(tmp_path / "corpus", ["a-d.png", "a-l.png"], ["v.png"])
    with pytest.raises(SystemExit, match="two kinds"):
        ENTITY.corpus_halves(src, tmp_path / "out")
