"""Where a batch's latents come from.

Normally from the content-addressed cache (both flip states are cached when flip is on, and each
step picks one per image). Color and random-crop augmentation change the pixels every step, so
those runs read the images and encode them with the VAE at each step instead, as kohya does.
A folder's own flip (datasets.<ds>.folders.<folder>.flip) decides for its images instead of
augment.flip. With loss.masked each image's mask comes along, bucketed, cropped and mirrored as
its latents are (lorabake.data.masks).
"""
from __future__ import annotations

import random

import torch
from PIL import Image, ImageOps

from lorabake.config import RunConfig
from lorabake.data import buckets, latents, masks
from lorabake.data.dataset import ImageItem
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


Latents = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # latents, size numbers, masks (or None)


def flips(item: ImageItem, flip: bool) -> bool:
    """Whether an image is mirrored at random: its folder's own flip, else the run's augment.flip."""
    return flip if item.flip is None else item.flip


def stacked_masks(found: list[torch.Tensor | None], latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) masks of a batch; an image without one (no alpha channel) is trained everywhere."""
    ones = torch.ones((1, *latents.shape[2:]))
    return torch.stack([ones if mask is None else mask for mask in found])


class CachedLatents:
    """Latents for a batch from the cache (one index per dataset, one flip state per image), with
    each image's size conditioning and, with `masked`, its mask in the same flip state."""

    def __init__(self, indexes: dict[str, dict], flip: bool, spec: buckets.BucketSpec, masked: bool = False):
        self.indexes, self.flip, self.spec, self.masked = indexes, flip, spec, masked
        self.by_rel = {name: {e["rel"]: e for e in index["entries"]} for name, index in indexes.items()}
        self.loaded: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _load(self, dataset: str, cached: dict, state: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image's latents (and mask) in one flip state, read from the store once per run and kept in
        memory (kohya's cache_latents keeps them in RAM too): every later epoch reads no file."""
        key = (dataset, cached["rel"], state)
        if key not in self.loaded:
            index = self.indexes[dataset]
            self.loaded[key] = (latents.load_latents(index, cached, state),
                                latents.load_mask(index, cached, state) if self.masked else None)
        return self.loaded[key]

    def __call__(self, batch: list[Entry], rng: random.Random) -> Latents:
        tensors, sizes, found = [], [], []
        for entry in batch:
            cached = self.by_rel[entry.dataset][entry.item.rel]
            state = "flip" if flips(entry.item, self.flip) and rng.random() < 0.5 else "plain"
            if state not in cached["latents"]:
                raise ValueError(f"{entry.dataset}/{entry.item.rel}: its folder flips, but the latent index has no "
                                 "mirrored latents for it (rerun cache-latents)")
            image_latents, mask = self._load(entry.dataset, cached, state)
            tensors.append(image_latents)
            if self.masked:
                found.append(mask)
            original = tuple(cached["original_size"])
            sizes.append(size_conditioning(original, buckets.place(*original, self.spec), state == "flip"))
        stacked = torch.stack(tensors)
        return stacked, torch.tensor(sizes), stacked_masks(found, stacked) if self.masked else None


class PixelLatents:
    """Latents encoded from the images at each step, after random crop / color / flip augmentation."""

    def __init__(self, vae, run: RunConfig):
        self.vae, self.spec, self.augment = vae, run.bucket_spec(), run.augment
        self.mask_source = run.loss.mask_source if run.loss.masked else None

    def __call__(self, batch: list[Entry], rng: random.Random) -> Latents:
        images, sizes, found = zip(*(self.augmented(entry.item, rng) for entry in batch))
        x = torch.stack([latents.to_tensor(image) for image in images]).to(self.vae.device, self.vae.dtype)
        with torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean
        encoded = (mean * self.vae.config.scaling_factor).float().cpu()
        return encoded, torch.tensor(sizes), stacked_masks(found, encoded) if self.mask_source else None

    def augmented(self, item: ImageItem, rng: random.Random) -> tuple[Image.Image, list[int], torch.Tensor | None]:
        image = latents.load_rgb(item.path)
        original = image.size
        placement = buckets.place(image.width, image.height, self.spec)
        if self.augment.random_crop:
            placement = random_crop(placement, rng)
        image = buckets.apply(image, placement)
        if self.augment.color:
            image = shift_hue(image, rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES))
        flipped = flips(item, self.augment.flip) and rng.random() < 0.5
        if flipped:
            image = ImageOps.mirror(image)
        return image, size_conditioning(original, placement, flipped), self.mask(item, original, placement, flipped)

    def mask(self, item: ImageItem, size: tuple[int, int], placement: buckets.Placement,
             flipped: bool) -> torch.Tensor | None:
        """The image's mask through the same crop and flip as its pixels (all ones without an alpha
        channel); None when the run is not masked."""
        if self.mask_source is None:
            return None
        mask = masks.load_mask(item.path, item.mask, self.mask_source)
        masks.check_size(mask, size, item.path, item.mask)
        return masks.latent_mask(mask, placement, flipped)


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

