"""Build the learning corpus: photographs and renders from Debian's desktop-wallpaper packages.

    python benchmarks/corpus.py --out data/corpus
    python benchmarks/corpus.py --out /tmp/corpus --debs data/corpus/debs   # no download

Downloads the packages with ``apt-get download`` into ``--debs`` (default ``OUT/debs``; no root
install, no post-install script: ``dpkg -x`` unpacks them into a temporary folder), keeps one
raster image per variant of each picture, scales it so its longest side is at most
``--max-side`` pixels (default 1600), writes them as PNG under ``OUT/train/`` and ``OUT/val/``
(the layout the ``imagefolder`` dataset takes as its split) and a ``OUT/manifest.json`` that
lists, for every image, its package, source path, original size, group and split, with each
package's version and its copyright file (copied to ``OUT/licenses/``).

A *group* is one picture with all its variants (the light and dark versions of a wallpaper, its
sizes): the split is by group, so no picture has a variant on both sides. About a fifth of the
groups (chosen by a hash of the group's name, so the split does not depend on what else is in
the corpus) are ``val``, the rest ``train``. Nothing in the test suite needs this corpus.

Idempotent: a corpus whose manifest has the same ``--max-side`` and packages and whose images
are all present is kept as it is; packages already in the ``--debs`` folder are not fetched again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Debian packages of desktop wallpapers (photographs and renders) and the folders they hold.
PACKAGES = ("plasma-workspace-wallpapers", "gnome-backgrounds", "ukui-wallpapers")
RASTER = {".jpg", ".jpeg", ".png", ".webp"}
#: Images smaller than this on their shortest side are icons or placeholders, not pictures.
MIN_SIDE = 256
#: Share of the groups held out (``val``).
VAL_SHARE = 0.2


def group_of(path: Path) -> str:
    """The picture a file shows, whatever its variant: ``wallpapers/NAME/contents/...`` is
    ``NAME``; ``backgrounds/gnome/adwaita-l.webp`` is ``gnome/adwaita``."""
    parts = path.parts
    if "wallpapers" in parts and "contents" in parts:
        return parts[parts.index("wallpapers") + 1]
    stem = re.sub(r"-[ld]$", "", path.stem)
    parent = path.parent.name
    return stem if parent == "backgrounds" else f"{parent}/{stem}"


def split_of(group: str, val_share: float = VAL_SHARE) -> str:
    """``"val"`` for about ``val_share`` of the groups (by a hash of the name), else ``"train"``."""
    h = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_share else "train"


def variants(root: Path) -> list[Path]:
    """The raster images under ``root`` worth keeping: one file per variant of a picture (the
    largest of a wallpaper's ``images/`` or ``images_dark/`` sizes, which differ only in scale),
    no screenshots, nothing under ``MIN_SIDE`` pixels on its shortest side."""
    from PIL import Image

    best: dict[Path, tuple[int, Path]] = {}
    for src in sorted(root.rglob("*")):
        if src.suffix.lower() not in RASTER or src.stem.startswith("screenshot"):
            continue
        with Image.open(src) as img:
            w, h = img.size
        if min(w, h) < MIN_SIDE:
            continue
        key = src.parent if src.parent.name.startswith("images") else src
        if key not in best or w * h > best[key][0]:
            best[key] = (w * h, src)
    return sorted(src for _, src in best.values())


def download(packages: tuple[str, ...], debs: Path) -> list[Path]:
    """The ``.deb`` files of ``packages`` in ``debs``, fetched with ``apt-get download`` when
    missing."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    return [sorted(debs.glob(f"{p}_*.deb"))[-1] for p in packages]


SPLITS = ("train", "val")


def usable(out: Path) -> dict | None:
    """The manifest of a finished corpus in ``out`` (every image present in the folder of its
    split, every licence present), else None: a corpus of an older layout is not usable."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        images, packages = manifest["images"], manifest["packages"]
        laid_out = all(m["file"].startswith(f"{m['split']}/") for m in images)
        files = [m["file"] for m in images] + [p["license"] for p in packages.values()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if laid_out and images and all((out / f).is_file() for f in files) else None


def built(out: Path, max_side: int, packages: tuple[str, ...]) -> dict | None:
    """The :func:`usable` manifest in ``out`` when it was built with ``max_side`` from
    ``packages``, else None."""
    manifest = usable(out)
    same = manifest is not None and manifest.get("max_side") == max_side and tuple(
        manifest["packages"]) == packages
    return manifest if same else None


def build(out: Path, max_side: int = 1600, packages: tuple[str, ...] = PACKAGES,
          debs: Path | None = None) -> dict:
    """Download (into ``debs``, default ``out/debs``), unpack and select; writes ``out/train``,
    ``out/val``, ``out/licenses`` and the manifest, unless :func:`built` finds them done."""
    from PIL import Image

    done = built(out, max_side, packages)
    if done is not None:
        return done
    licenses = out / "licenses"
    for folder in (*(out / s for s in SPLITS), licenses, out / "images"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (*(out / s for s in SPLITS), licenses):
        folder.mkdir(parents=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: present means finished
    manifest: dict = {"max_side": max_side, "packages": {}, "images": []}
    for deb in download(packages, debs or out / "debs"):
        package, version = deb.name.split("_")[:2]
        manifest["packages"][package] = {"version": version.replace("%3a", ":"),
                                         "license": f"licenses/{package}.copyright"}
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
            root = Path(tmp)
            shutil.copy(root / "usr/share/doc" / package / "copyright",
                        licenses / f"{package}.copyright")
            for src in variants(root):
                with Image.open(src) as img:
                    img = img.convert("RGB")
                    size = img.size
                    scale = min(1.0, max_side / max(size))
                    if scale < 1.0:
                        img = img.resize((round(size[0] * scale), round(size[1] * scale)),
                                         Image.Resampling.LANCZOS)
                    rel = src.relative_to(root)
                    group = group_of(rel)
                    split = split_of(f"{package}/{group}")
                    name = f"{package}__{'_'.join(rel.parts[3:]).rsplit('.', 1)[0]}.png"
                    img.save(out / split / name)
                manifest["images"].append({
                    "file": f"{split}/{name}", "package": package, "source": f"/{rel}",
                    "original_size": list(size), "size": list(img.size), "group": group,
                    "split": split})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/corpus.py", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/corpus"))
    parser.add_argument("--max-side", type=int, default=1600)
    parser.add_argument("--debs", type=Path, default=None,
                        help="folder of the downloaded packages (default: OUT/debs)")
    args = parser.parse_args(argv)
    if args.max_side < 64:
        parser.error(f"--max-side must be at least 64, got {args.max_side}")
    manifest = build(args.out, max_side=args.max_side, debs=args.debs)
    splits = [m["split"] for m in manifest["images"]]
    groups = {(m["package"], m["group"], m["split"]) for m in manifest["images"]}
    print(f"{args.out}: {len(splits)} images ({splits.count('train')} train, "
          f"{splits.count('val')} val) in {len(groups)} groups "
          f"({sum(g[2] == 'val' for g in groups)} val)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
