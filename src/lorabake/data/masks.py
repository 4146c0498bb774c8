"""Loss masks (kohya's --masked_loss): which pixels of an image the loss counts.

A mask is grayscale, white (1) trained and black (0) ignored, read from the image's alpha channel
(kohya's `alpha_mask`) or from a mask image of the same stem in a folder inside the image folder
(`10_cat/masks/a.png` for `10_cat/a.png`). It is bucketed, cropped and mirrored exactly as its image
is, then area-averaged down to the latents' size (kohya's `apply_masked_loss`), so each latent pixel
is weighted by the share of its 8×8 image pixels that are trained.

An image without an alpha channel is trained everywhere (kohya converts it to RGBA, alpha 255).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lorabake.data import buckets
from lorabake.data.dataset import IMAGE_EXTENSIONS

LATENT_FACTOR = 8  # SD1, SD2 and SDXL VAEs all make latents 1/8 of the image


class MaskError(ValueError):
    """A mask that cannot be used; the message names the image and the mask file."""


def mask_file(image: Path, folder: str) -> Path | None:
    """The mask of `image` in `folder` beside it: the file of the same stem with an image extension
    (any case), or None."""
    masks = image.parent / folder
    if not masks.is_dir():
        return None
    found = sorted(p for p in masks.iterdir() if p.stem == image.stem and p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[0] if found else None


def expected_mask(image: Path, folder: str) -> Path:
    """Where a missing mask of `image` would go (an error names it)."""
    return image.parent / folder / f"{image.stem}.png"


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def load_mask(image_path: Path, mask_path: Path | None, source: str) -> Image.Image | None:
    """The mask upright as 8-bit grayscale: the image's alpha channel (None when it has none: train
    everywhere), or the mask file's luminance (kohya reads its red channel: the same for grey masks)."""
    if source == "alpha":
        with Image.open(image_path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGBA").getchannel("A") if has_alpha(image) else None
    if mask_path is None:
        raise MaskError(f"{image_path}: no mask file; masked loss reads masks from a folder beside it")
    with Image.open(mask_path) as mask:
        return ImageOps.exif_transpose(mask).convert("L")


def check_size(mask: Image.Image | None, size: tuple[int, int], image_path: Path, mask_path: Path | None) -> None:
    if mask is not None and mask.size != size:
        raise MaskError(f"{mask_path}: the mask is {mask.width}x{mask.height}, its image {image_path} is "
                        f"{size[0]}x{size[1]}: a mask must have its image's size")


def latent_mask(mask: Image.Image | None, placement: buckets.Placement, flip: bool) -> torch.Tensor:
    """The mask as the loss weights it: bucketed like its image, optionally mirrored, values 0..1,
    area-averaged to the latents' size; shape (1, h/8, w/8). No mask: all ones."""
    width, height = placement.bucket
    size = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    if mask is None:
        return torch.ones((1, *size))
    pixels = buckets.apply(mask, placement)
    if flip:
        pixels = ImageOps.mirror(pixels)
    data = torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).view(1, 1, pixels.height, pixels.width)
    return F.interpolate(data.float() / 255.0, size=size, mode="area")[0].contiguous()
