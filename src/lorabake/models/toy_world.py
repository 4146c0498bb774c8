"""The toy-shapes world: one filled shape on a plain background, captioned in words.

"a red circle on a blue background" — a procedural text-to-image world small enough that a base
with SD1's topology learns it on one CPU thread (scripts/pretrain_toy_shapes.py), and rich enough
that a LoRA can visibly teach it something: the base sees circles, squares, triangles and diamonds
only; stars and hearts it never sees, while the concept scorer (lorabake.render.scorer) knows them.

Pillow + numpy only, and seeded: the same seed gives the same scenes and the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64             # image side: SD1's VAE makes it an 8×8 latent
SUPERSAMPLE = 4       # shapes are drawn 4× larger and downscaled, so their edges are anti-aliased
RADIUS = (16, 26)     # a shape's half-extent in pixels: 32–52 px across, 4–6.5 latent pixels
MARGIN = 2            # pixels kept free between a shape and the image border
OFFSET = 8            # how far (px) a shape's centre strays from the image centre: one latent pixel
COLOUR_JITTER = 12    # ± per channel, so "red" is a range and not one exact value

BASE_SHAPES = ("circle", "square", "triangle", "diamond")
NOVEL_SHAPES = ("star", "heart")  # never shown to the base; a LoRA teaches them
SHAPES = BASE_SHAPES + NOVEL_SHAPES
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (240, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245)}
# Background colours are darker or lighter than the shape colours of the same name, and a shape
# never stands on a background of its own colour name.
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (232, 232, 226),
               "blue": (30, 45, 120), "green": (30, 90, 45)}


def concept_words() -> list[str]:
    """Every concept the scorer answers for: a shape, a shape's colour, or "<colour> background"."""
    return [*SHAPES, *COLOURS, *(f"{name} background" for name in BACKGROUNDS)]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    center: tuple[float, float]  # pixels, in a SIZE × SIZE image
    radius: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def combinations(shapes: tuple[str, ...] = BASE_SHAPES) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) the world allows, in a fixed order."""
    return [(shape, colour, background) for shape in shapes for colour in COLOURS for background in BACKGROUNDS
            if colour != background]


def prompts(shapes: tuple[str, ...] = BASE_SHAPES) -> list[str]:
    return [caption(*combo) for combo in combinations(shapes)]


def random_scene(rng: np.random.Generator, shapes: tuple[str, ...] = BASE_SHAPES) -> Scene:
    shape, colour, background = _pick(rng, combinations(shapes))
    radius = float(rng.uniform(*RADIUS))
    low, high = max(radius + MARGIN, SIZE / 2 - OFFSET), min(SIZE - radius - MARGIN, SIZE / 2 + OFFSET)
    return Scene(shape, colour, background, (float(rng.uniform(low, high)), float(rng.uniform(low, high))), radius)


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def outline(shape: str, center: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The shape as a polygon (upright: triangles and stars point up), in the given coordinates."""
    cx, cy = center

    def ring(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(cx + radius * x, cy + radius * y) for x, y in points]

    if shape == "circle":
        return ring([(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96, endpoint=False)])
    if shape == "square":
        return ring([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if shape == "triangle":  # equilateral, its centroid a little below the box centre so it looks centred
        return ring([(math.cos(a), 0.15 + math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "diamond":  # a rhombus taller than wide, so it is not a turned square
        return ring([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)])
    if shape == "star":  # five points; the inner radius is generous so the arms read at 64 px
        return ring([((1 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                      0.08 + (1 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
                     for i in range(10)])
    if shape == "heart":  # the classic parametric heart, scaled to the unit box
        ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        return ring([(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                    - math.cos(4 * t)) / 17 - 0.05) for t in ts])
    raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = SIZE) -> Image.Image:
    """Draw the scene (RGB, size × size). With `rng`, colours are jittered by ±COLOUR_JITTER."""
    scale = size * SUPERSAMPLE / SIZE
    fill, ground = COLOURS[scene.colour], BACKGROUNDS[scene.background]
    if rng is not None:
        fill, ground = _jitter(rng, fill), _jitter(rng, ground)
    canvas = Image.new("RGB", (size * SUPERSAMPLE,) * 2, ground)
    points = outline(scene.shape, (scene.center[0] * scale, scene.center[1] * scale), scene.radius * scale)
    ImageDraw.Draw(canvas).polygon(points, fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in colour)


def sample(rng: np.random.Generator, count: int, shapes: tuple[str, ...] = BASE_SHAPES
           ) -> tuple[np.ndarray, list[Scene]]:
    """`count` fresh scenes and their images as a uint8 array (count, SIZE, SIZE, 3)."""
    scenes = [random_scene(rng, shapes) for _ in range(count)]
    return np.stack([np.asarray(render(scene, rng)) for scene in scenes]), scenes
