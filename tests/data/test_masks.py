"""Loss masks follow their image through bucketing, cropping and flips, are cached by their own
content beside the latents, and are checked before training; a folder's own flip decides whether
its images are ever mirrored."""
from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lorabake.config import FolderSettings, RunConfig
from lorabake.data import latents, masks
from lorabake.data.buckets import BucketSpec, place
from lorabake.data.dataset import DatasetError, scan_dataset, with_folder_settings
from lorabake.train.data import CachedLatents, PixelLatents
from lorabake.train.plan import Entry

# 64 px squares from 96×64 and 128×96 images: one is only cropped, the other resized and cropped
SPEC = BucketSpec(resolution=(64, 64), enabled=False)


class PoolingVAE:
    """A stand-in VAE whose latents are the image's red channel averaged over 8×8 blocks (in [-1, 1]),
    so a latent pixel says which image pixels it saw; counts its encodes."""

    config = SimpleNamespace(scaling_factor=1.0)
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.encoded = 0

    def encode(self, pixels):
        self.encoded += len(pixels)
        mean = torch.nn.functional.avg_pool2d(pixels[:, :1], 8).repeat(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def pattern(size: tuple[int, int], seed: int) -> Image.Image:
    """An asymmetric grey pattern (so a mirrored copy differs from it)."""
    rng = random.Random(seed)
    image = Image.new("L", size, 0)
    for _ in range(6):
        left, top = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        image.paste(rng.choice((128, 255)), (left, top, left + rng.randrange(8, 40), top + rng.randrange(8, 30)))
    return image


def write_alpha_image(path: Path, size: tuple[int, int], seed: int) -> Image.Image:
    """An RGBA image whose colour and alpha are one pattern: its latents then show its mask."""
    mask = pattern(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.merge("RGBA", (mask, mask, mask, mask)).save(path)
    return mask


def write_masked_image(folder: Path, name: str, size: tuple[int, int], seed: int, mask_folder: str = "masks") -> Path:
    """An RGB image whose colour is its mask's pattern, and the mask in folder/mask_folder/."""
    mask = pattern(size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.merge("RGB", (mask, mask, mask)).save(folder / f"{name}.png")
    (folder / mask_folder).mkdir(exist_ok=True)
    mask.save(folder / mask_folder / f"{name}.png")
    return folder / mask_folder / f"{name}.png"


def images_of(root: Path) -> list[tuple[Path, str]]:
    return [(path, path.relative_to(root).as_posix()) for path in sorted(root.glob("*/*.png"))]


def cache(root: Path, store_dir: Path, vae=None, **options) -> dict:
    return latents.cache_latents(images_of(root), SPEC, options.pop("flip", True), vae or PoolingVAE(), "vae",
                                 store_dir, store_dir.parent / "index.json", {}, **options)


# ---------------------------------------------------------------- masks follow their image

def test_an_alpha_mask_lines_up_with_its_latents_in_both_flip_states(tmp_path):
    root = tmp_path / "ds"
    write_alpha_image(root / "5_a" / "cropped.png", (96, 64), seed=1)
    write_alpha_image(root / "5_a" / "resized.png", (128, 96), seed=2)
    index = cache(root, tmp_path / "store", mask="alpha")
    for entry in index["entries"]:
        for state in ("plain", "flip"):
            latent = latents.load_latents(index, entry, state)
            mask = latents.load_mask(index, entry, state)
            assert mask.shape == (1, 8, 8)
            # the mask weighs exactly the pixels its latent pixel was made from
            torch.testing.assert_close(mask[0], (latent[0] + 1) / 2, atol=1e-5, rtol=0)
        plain, flipped = (latents.load_mask(index, entry, state) for state in ("plain", "flip"))
        assert not torch.allclose(plain, flipped) and torch.allclose(flipped, plain.flip(-1), atol=1e-6)


def test_latent_mask_is_area_averaged_to_the_latent_size():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 4, 64))  # half of the first latent column's pixels
    weights = masks.latent_mask(mask, place(64, 64, SPEC), flip=False)
    assert weights.shape == (1, 8, 8)
    assert torch.allclose(weights[0, :, 0], torch.full((8,), 0.5)) and weights[0, :, 1:].abs().max() == 0
    assert torch.equal(masks.latent_mask(None, place(64, 64, SPEC), flip=True), torch.ones((1, 8, 8)))


def test_the_pixel_path_gives_the_masks_the_cache_gives(tmp_path):
    """PixelLatents (no latent cache) crops and flips a mask as CachedLatents' stored one."""
    root = tmp_path / "ds"
    write_masked_image(root / "5_a", "x", (128, 96), seed=3)
    index = cache(root, tmp_path / "store", mask="masks")
    dataset = scan_dataset(root, "ds", mask_folder="masks")
    run = RunConfig.model_validate({"datasets": ["ds"], "resolution": 64, "buckets": {"enabled": False},
                                    "augment": {"flip": True}, "training": {"cache_latents": False},
                                    "loss": {"masked": True, "mask_source": "folder"}})
    pixels = PixelLatents(PoolingVAE(), run)
    entry = Entry("ds", dataset.items[0], (64, 64))
    stored = {state: latents.load_mask(index, index["entries"][0], state) for state in ("plain", "flip")}
    seen = set()
    for seed in range(12):
        latent, _, mask = pixels([entry], random.Random(seed))
        state = next(state for state, m in stored.items() if torch.allclose(mask[0], m, atol=1e-6))
        torch.testing.assert_close(mask[0, 0], (latent[0, 0] + 1) / 2, atol=1e-5, rtol=0)
        seen.add(state)
    assert seen == {"plain", "flip"}


# ---------------------------------------------------------------- caching

def test_an_edited_mask_is_made_again_and_its_latents_are_not(tmp_path):
    root, store_dir = tmp_path / "ds", tmp_path / "store"
    mask_file = write_masked_image(root / "5_a", "x", (96, 64), seed=4)
    write_masked_image(root / "5_a", "y", (96, 64), seed=5)
    vae = PoolingVAE()
    first = cache(root, store_dir, vae, mask="masks")
    assert (first["encoded"], first["masks_made"], vae.encoded) == (4, 4, 4)  # 2 images × 2 flip states
    latent_files = {path: path.stat().st_mtime_ns for path in store_dir.iterdir() if "-mask" not in path.name}
    old = latents.load_mask(first, first["entries"][0])
    pattern((96, 64), seed=40).save(mask_file)
    second = cache(root, store_dir, vae, mask="masks")
    assert (second["encoded"], second["reused"], second["masks_made"], vae.encoded) == (0, 4, 2, 4)
    assert {path: path.stat().st_mtime_ns for path in latent_files} == latent_files  # never re-encoded
    assert second["entries"][0]["latents"] == first["entries"][0]["latents"]
    assert second["entries"][0]["mask"] != first["entries"][0]["mask"]
    assert second["entries"][1]["mask"] == first["entries"][1]["mask"]  # the other image's mask: untouched
    assert not torch.equal(latents.load_mask(second, second["entries"][0]), old)


def test_an_image_without_alpha_trains_everywhere(tmp_path, capsys):
    """kohya's behaviour: no alpha channel is an alpha of 255 everywhere."""
    root = tmp_path / "ds"
    (root / "5_a").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "5_a" / "opaque.png")
    index = cache(root, tmp_path / "store", mask="alpha")
    assert index["entries"][0]["mask"] is None and "1 images without an alpha channel" in capsys.readouterr().out
    cached = CachedLatents({"ds": index}, True, SPEC, masked=True)
    item = scan_dataset(root, "ds").items[0]
    _, _, weights = cached([Entry("ds", item, (64, 64))], random.Random(0))
    assert torch.equal(weights, torch.ones((1, 1, 8, 8)))


def test_an_index_without_masks_is_refused_by_a_masked_run(tmp_path):
    root = tmp_path / "ds"
    write_alpha_image(root / "5_a" / "x.png", (64, 64), seed=6)
    index = cache(root, tmp_path / "store")
    cached = CachedLatents({"ds": index}, False, SPEC, masked=True)
    with pytest.raises(ValueError, match="names no masks.*rerun cache-latents"):
        cached([Entry("ds", scan_dataset(root, "ds").items[0], (64, 64))], random.Random(0))


# ---------------------------------------------------------------- checks before training

def test_a_missing_mask_names_the_image_and_where_its_mask_belongs(tmp_path):
    root = tmp_path / "ds"
    write_masked_image(root / "5_a", "x", (64, 64), seed=7)
    Image.new("RGB", (64, 64)).save(root / "5_a" / "lonely.png")
    with pytest.raises(DatasetError) as error:
        scan_dataset(root, "ds", mask_folder="masks")
    assert "images without a mask" in str(error.value)
    assert f"{root.resolve() / '5_a' / 'lonely.png'} (expected {root.resolve() / '5_a' / 'masks' / 'lonely.png'})" \
        in str(error.value)
    with pytest.raises(masks.MaskError, match="lonely.png: no mask.*masks/lonely.png"):
        cache(root, tmp_path / "store", mask="masks")


def test_mask_folders_are_checked_and_not_read_as_images(tmp_path):
    root = tmp_path / "ds"
    mask = write_masked_image(root / "5_a", "x", (64, 64), seed=8)
    scanned = scan_dataset(root, "ds", mask_folders={"masks"})  # an unmasked scan passes the folder by
    assert [item.rel for item in scanned.items] == ["5_a/x.png"] and scanned.items[0].mask is None
    assert scan_dataset(root, "ds", mask_folder="masks").items[0].mask == mask.resolve()
    with pytest.raises(DatasetError, match="folders inside an image folder"):
        scan_dataset(root, "ds")  # a folder nobody calls a mask folder stays an error
    Image.new("L", (32, 32)).save(mask)
    (root / "5_a" / "masks" / "orphan.png").write_bytes(mask.read_bytes())
    with pytest.raises(DatasetError) as error:
        scan_dataset(root, "ds", mask_folder="masks")
    assert "masks of another size than their image" in str(error.value) and "(32x32;" in str(error.value)
    assert "masks with no image of the same name" in str(error.value) and "orphan.png" in str(error.value)


def test_mask_config_keys():
    run = RunConfig.model_validate({"datasets": ["d"], "loss": {"masked": True, "mask_source": "folder",
                                                                  "mask_folder": "m"}})
    assert run.loss.mask_folder_used == "m"
    assert RunConfig.model_validate({"datasets": ["d"], "loss": {"masked": True}}).loss.mask_folder_used is None
    with pytest.raises(ValueError, match="mask_folder is read only with mask_source: folder"):
        RunConfig.model_validate({"datasets": ["d"], "loss": {"masked": True, "mask_folder": "m"}})
    with pytest.raises(ValueError, match="mask_folder must be one folder's name"):
        RunConfig.model_validate({"datasets": ["d"], "loss": {"mask_source": "folder", "mask_folder": "a/b"}})


# ---------------------------------------------------------------- a folder's own flip

def test_a_folder_with_flip_on_is_mirrored_sometimes_and_one_with_flip_off_never(tmp_path):
    root = tmp_path / "ds"
    write_alpha_image(root / "5_on" / "x.png", (64, 64), seed=9)
    write_alpha_image(root / "5_off" / "x.png", (64, 64), seed=10)
    write_alpha_image(root / "5_run" / "x.png", (64, 64), seed=11)  # no setting of its own: augment.flip
    for run_flip in (False, True):
        flips = {"5_on": True, "5_off": False}
        index = cache(root, tmp_path / "store", flip=run_flip, folder_flips=flips)
        states = {entry["rel"].split("/")[0]: sorted(entry["latents"]) for entry in index["entries"]}
        assert states == {"5_on": ["flip", "plain"], "5_off": ["plain"],
                          "5_run": ["flip", "plain"] if run_flip else ["plain"]}
        dataset = with_folder_settings(scan_dataset(root, "ds"), {name: FolderSettings(flip=flip)
                                                                  for name, flip in flips.items()}, "datasets.ds")
        cached = CachedLatents({"ds": index}, run_flip, SPEC)
        mirrored = {item.folder: 0 for item in dataset.items}
        for seed in range(40):
            for item in dataset.items:
                plain = latents.load_latents(index, index["entries"][dataset.items.index(item)])
                latent, _, _ = cached([Entry("ds", item, (64, 64))], random.Random(seed))
                mirrored[item.folder] += not torch.equal(latent[0], plain)
        assert mirrored["5_off"] == 0 and 5 < mirrored["5_on"] < 35
        assert (mirrored["5_run"] > 0) == run_flip
        os.remove(tmp_path / "index.json")
