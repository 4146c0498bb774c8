"""Aspect-ratio bucketing with kohya's arithmetic.

Buckets are every (w, h) on a `step` grid between `min` and `max` whose area does not exceed the
training resolution's area, plus the square of that area. An image goes to the bucket whose aspect
ratio is closest to its own, is scaled to cover it and centre-cropped. With `no_upscale` each image
gets its own bucket: scaled down only if it is larger than the resolution's area, then cut to the
step grid.

A spec is refused (ValueError) when its sides pass MAX_SIDE or its enumeration would be huge, so no
caller can hang on a typo such as `max: 1000000000`; the config refuses those sides first, naming the key.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from PIL import Image

# SDXL trains at 1024 px and its largest hires renders reach 4096; 8192 px is 8x SDXL (a 1024x1024
# latent, whose self-attention alone needs terabytes), so no real run comes near it.
MAX_SIDE = 8192
# Bucket widths one spec may enumerate. The config allows at most (MAX_SIDE - 64) / 8 + 1 = 1,017.
MAX_BUCKET_WIDTHS = 2048


@dataclass(frozen=True)
class BucketSpec:
    resolution: tuple[int, int]  # (width, height)
    enabled: bool = True
    min_size: int = 256
    max_size: int = 1024
    step: int = 64
    no_upscale: bool = False

    def __post_init__(self) -> None:
        sides = (*self.resolution, self.min_size, self.max_size)
        if max(sides) > MAX_SIDE:
            raise ValueError(f"bucket spec {self}: sides above {MAX_SIDE} px (8x SDXL's 1024) are refused")
        if self.step < 1:
            raise ValueError(f"bucket spec {self}: step must be at least 1 px")
        widths = (self.max_size - self.min_size) // self.step + 1
        if widths > MAX_BUCKET_WIDTHS:
            raise ValueError(f"bucket spec {self}: {widths:,} bucket widths to enumerate, more than "
                             f"{MAX_BUCKET_WIDTHS:,}; use a larger step or a narrower min-max range")

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class Placement:
    """Where one image lands: its bucket, the size it is resized to, and the crop taken from that."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]  # left, top, right, bottom in resized pixels


def bucket_resolutions(spec: BucketSpec) -> list[tuple[int, int]]:
    """All buckets of a spec, sorted; kohya's `make_bucket_resolutions`."""
    side = int(math.sqrt(spec.max_area) // spec.step) * spec.step
    resolutions = {(side, side)}
    for width in range(spec.min_size, spec.max_size + 1, spec.step):
        height = min(spec.max_size, (spec.max_area // width) // spec.step * spec.step)
        if height >= spec.min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


@functools.lru_cache(maxsize=65536)  # a farm has thousands of images of a few sizes
def place(width: int, height: int, spec: BucketSpec) -> Placement:
    """Choose the bucket for an image of this size and how to resize and crop it into the bucket."""
    if not spec.enabled:
        return _cover(width, height, spec.resolution)
    if spec.no_upscale:
        return _own_bucket(width, height, spec)
    aspect = width / height
    bucket = min(bucket_resolutions(spec), key=lambda b: (abs(b[0] / b[1] - aspect), b))
    return _cover(width, height, bucket)


def _cover(width: int, height: int, bucket: tuple[int, int]) -> Placement:
    """Scale so the image covers the bucket, then centre-crop the overhang."""
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return Placement(bucket, resized, (left, top, left + bucket[0], top + bucket[1]))


def _own_bucket(width: int, height: int, spec: BucketSpec) -> Placement:
    scale = min(1.0, math.sqrt(spec.max_area / (width * height)))
    resized = (round(width * scale), round(height * scale))
    bucket = (resized[0] - resized[0] % spec.step, resized[1] - resized[1] % spec.step)
    if min(bucket) == 0:
        raise ValueError(
            f"image of {width}x{height} is smaller than one bucket step ({spec.step} px) with no_upscale"
        )
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return Placement(bucket, resized, (left, top, left + bucket[0], top + bucket[1]))


def apply(image: Image.Image, placement: Placement) -> Image.Image:
    """Resize and crop a decoded RGB image as its placement says."""
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    return image.crop(placement.crop)
