"""The content-addressed latent cache.

An image's latents live at `results/cache/latents/{vae_id}/{geometry}/{sha256 of image bytes}.safetensors`
(and `…-flip.safetensors` for the mirrored image). A `cache_latents` job hashes every image of its
dataset, encodes only the keys the store lacks, and writes the dataset's index: which image has which
latents in which bucket. Captions are not read here, so a caption edit never re-encodes anything.
A folder with its own `flip` gets (or lacks) the mirrored latents whatever the run's augment.flip.
With masked loss the index names each image's loss mask too, stored beside the latents under the
mask's own content (`{sha256 of the mask file}-mask.safetensors`, or `{image sha256}-alpha…` for an
alpha mask), bucketed and mirrored as its latents are: an edited mask is made again, its image's
latents are not.
Jobs running at once on one store claim an image (`.{sha256}.lock`, an flock) before encoding it, so
each key is encoded once however many datasets share the image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from lorabake import store
from lorabake.data import buckets, masks
from lorabake.data.buckets import BucketSpec
from lorabake.progress import track

FLIP_STATES = {False: ("plain",), True: ("plain", "flip")}


@dataclass(frozen=True)
class Job:
    image: Path
    rel: str
    sha256: str
    flip: bool = False  # cache the mirrored latents too
    mask: Path | None = None  # the mask file (mask_source folder)


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
                  store_dir: Path, index_path: Path, meta: dict, folder_flips: dict[str, bool] | None = None,
                  mask: str | None = None) -> dict:
    """Encode what the store lacks for these (path, rel) images, then write the index.

    `folder_flips` overrides `flip` for the images of those folders (by folder, as `rel` starts);
    `mask` ("alpha", or the mask folder's name) adds each image's loss mask.
    Jobs sharing a store (two datasets with common images, under `-j2`) encode each image once: an
    image is encoded under a claim on its key; one that another job holds is put off until the rest
    are done, then waited for, and its latents reused."""
    cache = _LatentStore(Path(store_dir), spec, vae, vae_id, mask)
    cache.store_dir.mkdir(parents=True, exist_ok=True)
    jobs = [Job(path, rel, store.file_sha256(path), (folder_flips or {}).get(rel.rpartition("/")[0], flip),
                _mask_of(path, mask)) for path, rel in images]
    entries = [cache.entry(job, wait=False) for job in track(jobs, len(jobs), "latents", unit="img")]
    held_elsewhere = [i for i, entry in enumerate(entries) if entry is None]
    if held_elsewhere:
        print(f"cache_latents: waiting for {len(held_elsewhere)} images another job is encoding", flush=True)
    for i in held_elsewhere:
        entries[i] = cache.entry(jobs[i], wait=True)
    index = {**meta, "vae_id": vae_id, "store": str(store_dir), "flip": flip,
             "encoded": cache.encoded, "reused": cache.reused, "entries": entries}
    if folder_flips:
        index["folder_flips"] = folder_flips
    if mask is not None:
        index.update(mask=mask, masks_made=cache.masks_made)
        bare = f"; {cache.without_alpha} images without an alpha channel train everywhere" if cache.without_alpha else ""
        print(f"cache_latents: {cache.masks_made} masks made (from {mask}){bare}", flush=True)
    store.write_json(index_path, index)
    print(f"cache_latents: encoded {cache.encoded}, reused {cache.reused} (store {store_dir})")
    return index


def _mask_of(image: Path, mask: str | None) -> Path | None:
    """The mask file of `image` (mask_source folder); a missing one is an error naming where it belongs."""
    if mask is None or mask == "alpha":
        return None
    found = masks.mask_file(image, mask)
    if found is None:
        raise masks.MaskError(f"{image}: no mask; loss.masked with mask_source folder wants it at "
                              f"{masks.expected_mask(image, mask)} (same name, any image extension)")
    return found


@dataclass
class _LatentStore:
    """One job's view of a latent store: what it encodes, what it finds already there."""

    store_dir: Path
    spec: BucketSpec
    vae: object
    vae_id: str
    mask: str | None = None
    encoded: int = 0
    reused: int = 0
    masks_made: int = 0
    without_alpha: int = 0

    def files(self, key: str, flip: bool) -> tuple[dict[str, str], list[str]]:
        """A key's file names by flip state, and the states whose file the store lacks."""
        files = {state: entry_name(key, state) for state in FLIP_STATES[flip]}
        return files, [state for state, name in files.items() if not (self.store_dir / name).exists()]

    def entry(self, job: Job, wait: bool) -> dict | None:
        """The index entry of one image, encoding the latents the store lacks; None when another job
        holds the image's claim and `wait` is False."""
        image = load_rgb(job.image)
        placement = buckets.place(image.width, image.height, self.spec)
        files, missing = self.files(job.sha256, job.flip)
        if missing:
            with store.claim(self.store_dir / f".{job.sha256}.lock", wait=wait) as held:
                if not held:
                    return None
                # Another job may have written them while this one waited for the claim.
                missing = [state for state in missing if not (self.store_dir / files[state]).exists()]
                for state in missing:
                    latents = encode(self.vae, image, placement, flip=state == "flip")
                    store.write_safetensors(self.store_dir / files[state], {"latents": latents},
                                            {"vae_id": self.vae_id, "bucket": f"{placement.bucket}"})
        self.encoded += len(missing)
        self.reused += len(files) - len(missing)
        entry = {"rel": job.rel, "sha256": job.sha256, "bucket": list(placement.bucket),
                 "original_size": [image.width, image.height], "crop": list(placement.crop), "latents": files}
        if self.mask is not None:
            entry["mask"] = self.mask_entry(job, image.size, placement)
        return entry

    def mask_entry(self, job: Job, size: tuple[int, int], placement: buckets.Placement) -> dict | None:
        """The image's mask files by flip state, made where the store lacks them; None for an image
        without an alpha channel (trained everywhere). A mask is cheap and the same whoever makes
        it, so two jobs making one at once just write the same bytes."""
        key = f"{job.sha256}-alpha" if job.mask is None else f"{store.file_sha256(job.mask)}-mask"
        files, missing = self.files(key, job.flip)
        if not missing:
            return files
        mask = masks.load_mask(job.image, job.mask, "alpha" if job.mask is None else "folder")
        if mask is None:
            self.without_alpha += 1
            return None
        masks.check_size(mask, size, job.image, job.mask)
        for state in missing:
            store.write_safetensors(self.store_dir / files[state],
                                    {"mask": masks.latent_mask(mask, placement, flip=state == "flip")},
                                    {"bucket": f"{placement.bucket}"})
        self.masks_made += len(missing)
        return files


def read_index(index_path: Path) -> dict:
    return json.loads(Path(index_path).read_text())


def load_latents(index: dict, entry: dict, state: str = "plain") -> torch.Tensor:
    return load_file(str(Path(index["store"]) / entry["latents"][state]))["latents"]


def load_mask(index: dict, entry: dict, state: str = "plain") -> torch.Tensor | None:
    """The image's cached loss mask (1, h/8, w/8), or None where it has none (train everywhere)."""
    if "mask" not in entry:
        raise ValueError(f"{entry['rel']}: the latent index names no masks; it was written without loss.masked "
                         "(rerun cache-latents)")
    return None if entry["mask"] is None else load_file(str(Path(index["store"]) / entry["mask"][state]))["mask"]
