"""Where a batch's latents come from.

Normally from the content-addressed cache (both flip states are cached when flip is on, and each
step picks one per image). Color and random-crop augmentation change the pixels every step, so
those runs read the images and encode them with the VAE at each step instead, as kohya does.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageOps

from lorabake.config import RunConfig
from lorabake.data import buckets, latents
from lorabake.train.plan import Entry

HUE_SHIFT_DEGREES = 8  # kohya's color_aug: a random hue shift of at most ±8°


def size_conditioning(original: tuple[int, int], placement: buckets.Placement, flipped: bool) -> list[int]:
    """SDXL's six size numbers for one image: original (h, w), the crop's top-left corner in the
    resized image, target (h, w). A mirrored image's crop starts where the unmirrored one ended
    (measured from the other side), so the numbers describe the pixels the VAE saw."""
    left, top, right, _ = placement.crop
    if flipped:
        left = placement.resized[0] - right
    return [original[1], original[0], top, left, placement.bucket[1], placement.bucket[0]]


class CachedLatents:
    """Latents for a batch from the cache (one index per dataset, one flip state per image), with
    each image's size conditioning."""

    def __init__(self, indexes: dict[str, dict], flip: bool, spec: buckets.BucketSpec):
        self.indexes, self.flip, self.spec = indexes, flip, spec
        self.by_rel = {name: {e["rel"]: e for e in index["entries"]} for name, index in indexes.items()}

    def __call__(self, batch: list[Entry], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        tensors, sizes = [], []
        for entry in batch:
            cached = self.by_rel[entry.dataset][entry.item.rel]
            state = "flip" if self.flip and rng.random() < 0.5 else "plain"
            tensors.append(latents.load_latents(self.indexes[entry.dataset], cached, state))
            original = tuple(cached["original_size"])
            sizes.append(size_conditioning(original, buckets.place(*original, self.spec), state == "flip"))
        return torch.stack(tensors), torch.tensor(sizes)


class PixelLatents:
    """Latents encoded from the images at each step, after random crop / color / flip augmentation."""

    def __init__(self, vae, run: RunConfig):
        self.vae, self.spec, self.augment = vae, run.bucket_spec(), run.augment

    def __call__(self, batch: list[Entry], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        images, sizes = zip(*(self.augmented(entry.item.path, rng) for entry in batch))
        x = torch.stack([latents.to_tensor(image) for image in images]).to(self.vae.device, self.vae.dtype)
        with torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean
        return (mean * self.vae.config.scaling_factor).float().cpu(), torch.tensor(sizes)

    def augmented(self, path: Path, rng: random.Random) -> tuple[Image.Image, list[int]]:
        image = latents.load_rgb(path)
        original = image.size
        placement = buckets.place(image.width, image.height, self.spec)
        if self.augment.random_crop:
            placement = random_crop(placement, rng)
        image = buckets.apply(image, placement)
        if self.augment.color:
            image = shift_hue(image, rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES))
        flipped = self.augment.flip and rng.random() < 0.5
        if flipped:
            image = ImageOps.mirror(image)
        return image, size_conditioning(original, placement, flipped)


def random_crop(placement: buckets.Placement, rng: random.Random) -> buckets.Placement:
    """The same resize, with the bucket-sized window anywhere in the overhang instead of centred."""
    (width, height), (bw, bh) = placement.resized, placement.bucket
    left, top = rng.randint(0, width - bw), rng.randint(0, height - bh)
    return buckets.Placement(placement.bucket, placement.resized, (left, top, left + bw, top + bh))


def shift_hue(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate every pixel's hue by `degrees`, keeping saturation and value."""
    hue, saturation, value = image.convert("HSV").split()
    offset = round(degrees / 360 * 256)
    hue = hue.point(lambda h: (h + offset) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")

