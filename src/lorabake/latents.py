"""The content-addressed latent cache.

An image's latents live at `results/cache/latents/{vae_id}/{geometry}/{sha256 of image bytes}.safetensors`
(and `…-flip.safetensors` for the mirrored image). A `cache_latents` job hashes every image of its
dataset, encodes only the keys the store lacks, and writes the dataset's index: which image has which
latents in which bucket. Captions are not read here, so a caption edit never re-encodes anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from tqdm import tqdm

from lorabake import buckets, store
from lorabake.buckets import BucketSpec

FLIP_STATES = {False: ("plain",), True: ("plain", "flip")}


@dataclass(frozen=True)
class Job:
    image: Path
    rel: str
    sha256: str


def load_rgb(path: Path) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float in [-1, 1], as the VAE was trained."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def entry_name(sha256: str, state: str) -> str:
    return f"{sha256}.safetensors" if state == "plain" else f"{sha256}-{state}.safetensors"


@torch.no_grad()
def encode(vae, image: Image.Image, placement: buckets.Placement, flip: bool) -> torch.Tensor:
    """Bucket, optionally mirror, and encode one image; returns scaled latents (4, h/8, w/8)."""
    pixels = buckets.apply(image, placement)
    if flip:
        pixels = ImageOps.mirror(pixels)
    x = to_tensor(pixels).unsqueeze(0).to(vae.device, vae.dtype)
    mean = vae.encode(x).latent_dist.mean  # the mean, not a sample: one image, one latent
    return (mean[0] * vae.config.scaling_factor).float().cpu().contiguous()


def cache_latents(images: list[tuple[Path, str]], spec: BucketSpec, flip: bool, vae, vae_id: str,
                  store_dir: Path, index_path: Path, meta: dict) -> dict:
    """Encode what the store lacks for these (path, rel) images, then write the index."""
    store_dir = Path(store_dir)
    jobs = [Job(path, rel, store.file_sha256(path)) for path, rel in images]
    entries, encoded, reused = [], 0, 0
    for job in tqdm(jobs, desc="latents", unit="img"):
        image = load_rgb(job.image)
        placement = buckets.place(image.width, image.height, spec)
        files = {}
        for state in FLIP_STATES[flip]:
            name = entry_name(job.sha256, state)
            if (store_dir / name).exists():
                reused += 1
            else:
                latents = encode(vae, image, placement, flip=state == "flip")
                store.write_safetensors(store_dir / name, {"latents": latents},
                                        {"vae_id": vae_id, "bucket": f"{placement.bucket}"})
                encoded += 1
            files[state] = name
        entries.append({"rel": job.rel, "sha256": job.sha256, "bucket": list(placement.bucket),
                        "original_size": [image.width, image.height], "crop": list(placement.crop),
                        "latents": files})
    index = {**meta, "vae_id": vae_id, "store": str(store_dir), "flip": flip,
             "encoded": encoded, "reused": reused, "entries": entries}
    store.write_json(index_path, index)
    print(f"cache_latents: encoded {encoded}, reused {reused} (store {store_dir})")
    return index


def read_index(index_path: Path) -> dict:
    return json.loads(Path(index_path).read_text())


def load_latents(index: dict, entry: dict, state: str = "plain") -> torch.Tensor:
    return load_file(str(Path(index["store"]) / entry["latents"][state]))["latents"]
