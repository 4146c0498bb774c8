"""Generate the demo dataset: two kohya concept folders of tiny synthetic shapes, byte-for-byte
reproducible (Pillow only, fixed seeds).

    python scripts/make_demo_dataset.py [OUT]      # OUT defaults to datasets/demo in the repo

`5_lbk_circle` holds 5 circles and `3_lbk_square` 4 squares, in square, landscape and portrait
sizes; captions are tags describing what was drawn, activation tag first. One circle has no
caption file, so its folder name is its caption; one square is a JPEG. OUT is wiped and recreated.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70),
          "yellow": (235, 200, 40), "purple": (140, 60, 190), "orange": (240, 130, 30)}
BACKGROUNDS = {"white": ((245, 245, 240), (245, 245, 240)), "gray": ((150, 150, 155), (150, 150, 155)),
               "gradient": ((30, 40, 90), (200, 210, 235))}
NOISE_LEVELS = 7  # +-3 per pixel: enough that PNGs are not trivially small, little enough to stay tiny


@dataclass(frozen=True)
class Picture:
    file: str
    size: tuple[int, int]
    color: str
    background: str
    position: str  # left, centered or right
    scale: str  # small or large
    caption: bool = True


CIRCLES = [
    Picture("circle_01.png", (128, 128), "red", "gradient", "centered", "large"),
    Picture("circle_02.png", (192, 128), "blue", "white", "left", "small"),
    Picture("circle_03.png", (128, 192), "green", "gradient", "centered", "small"),
    Picture("circle_04.png", (192, 128), "yellow", "gray", "right", "large"),
    Picture("circle_05.png", (128, 128), "purple", "white", "left", "small", caption=False),
]
SQUARES = [
    Picture("square_01.png", (128, 128), "orange", "white", "centered", "large"),
    Picture("square_02.png", (192, 128), "green", "gradient", "right", "small"),
    Picture("square_03.jpg", (128, 192), "red", "gray", "centered", "large"),
    Picture("square_04.png", (128, 128), "blue", "gradient", "right", "small"),
]
FOLDERS = {"5_lbk_circle": ("circle", CIRCLES), "3_lbk_square": ("square", SQUARES)}


def background(picture: Picture) -> Image.Image:
    top, bottom = (Image.new("RGB", picture.size, color) for color in BACKGROUNDS[picture.background])
    mask = Image.linear_gradient("L").resize(picture.size)  # 0 at the top, 255 at the bottom
    return Image.composite(bottom, top, mask)


def shape_box(picture: Picture, rng: random.Random) -> tuple[int, int, int, int]:
    width, height = picture.size
    side = round(min(width, height) * (0.6 if picture.scale == "large" else 0.3)) + rng.randint(-4, 4)
    centre_x = {"left": width * 0.28, "centered": width * 0.5, "right": width * 0.72}[picture.position]
    centre_x = round(centre_x) + rng.randint(-3, 3)
    centre_y = height // 2 + rng.randint(-6, 6)
    return centre_x - side // 2, centre_y - side // 2, centre_x + side // 2, centre_y + side // 2


def add_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    levels = bytes(b % NOISE_LEVELS for b in rng.randbytes(image.width * image.height))
    noise = Image.frombytes("L", image.size, levels).convert("RGB")
    return ImageChops.add(image, noise, scale=1.0, offset=-(NOISE_LEVELS // 2))


def draw(picture: Picture, shape: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = background(picture)
    box = shape_box(picture, rng)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[picture.color])
    else:
        pen.rectangle(box, fill=COLORS[picture.color])
    return add_noise(image, rng)


def caption(picture: Picture, shape: str) -> str:
    plain = picture.background != "gradient"
    background_tag = f"plain {picture.background} background" if plain else "gradient background"
    tags = [f"lbk_{shape}", f"{picture.color} {shape}", background_tag, picture.position, picture.scale]
    return ", ".join(tags)


def make_dataset(out: Path) -> None:
    """Write the dataset into a sibling temp folder, then swap it in place of `out`."""
    out = Path(out).resolve()
    if out in (REPO, *REPO.parents):
        raise SystemExit(f"refusing to wipe {out}: it contains the repository")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for seed, (folder, (shape, pictures)) in enumerate(FOLDERS.items()):
        (staging / folder).mkdir()
        for index, picture in enumerate(pictures):
            path = staging / folder / picture.file
            draw(picture, shape, seed=1000 * seed + index).save(path, **save_options(path))
            if picture.caption:
                path.with_suffix(".txt").write_text(caption(picture, shape) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    os.chmod(out, 0o755)  # mkdtemp makes it private


def save_options(path: Path) -> dict:
    if path.suffix == ".jpg":
        return {"quality": 85}
    return {"optimize": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "datasets" / "demo")
    out = parser.parse_args().out
    make_dataset(out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(files)} files, {sum(p.stat().st_size for p in files) / 1024:.0f} KiB, to {out}")


if __name__ == "__main__":
    main()
