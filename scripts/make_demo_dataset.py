"""Generate the shipped demo dataset: stars, a shape the toy-shapes base never saw, in one kohya folder.

    python scripts/make_demo_dataset.py [OUT]      # OUT defaults to datasets/demo in the repo

`10_lbk_star` holds 12 stars of the toy world (lorabake.models.toy_world), each colour on a few
backgrounds, captioned like the world's own captions with the activation tag first:
"lbk_star, a red star on a blue background". Byte-for-byte reproducible (a fixed seed, Pillow and
numpy only). OUT is wiped and recreated.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabake.models import toy_world  # noqa: E402

FOLDER = "10_lbk_star"
TAG = "lbk_star"
COUNT = 12
SEED = 7


def scenes(rng: np.random.Generator) -> list[toy_world.Scene]:
    """COUNT stars; colours and backgrounds cycle, so every colour appears and no pair repeats."""
    pairs = [(colour, ground) for colour in toy_world.COLOURS for ground in toy_world.BACKGROUNDS if colour != ground]
    picks = rng.permutation(len(pairs))[:COUNT]
    found = []
    for i in picks:
        colour, ground = pairs[i]
        shape = toy_world.random_scene(rng, ("star",))
        found.append(toy_world.Scene("star", colour, ground, shape.center, shape.radius))
    return found


def make_dataset(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        folder = Path(tmp) / FOLDER
        folder.mkdir()
        for n, scene in enumerate(scenes(rng), 1):
            toy_world.render(scene, rng).save(folder / f"star_{n:02d}.png", optimize=True)
            (folder / f"star_{n:02d}.txt").write_text(f"{TAG}, {scene.caption}\n")
        if out.exists():
            shutil.rmtree(out)
        Path(tmp).rename(out)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "datasets" / "demo")
    out = parser.parse_args().out.resolve()
    if out in (REPO, *REPO.parents):
        raise SystemExit(f"refusing to wipe {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    make_dataset(out)
    print(f"wrote {COUNT} images to {out}")


if __name__ == "__main__":
    main()
