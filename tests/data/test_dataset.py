"""Kohya folder parsing, validation errors, caption digests, epoch entries and bucketed steps."""
from __future__ import annotations

import importlib.util
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lorabake.data.buckets import BucketSpec, place
from lorabake.data.dataset import (DatasetError, bucket_steps, caption_digest, epoch_items, image_files,
                                   normalize_caption, scan_dataset, split_tags)

from conftest import FIXTURE, REPO

DEMO = FIXTURE / "datasets" / "demo"


def make_image(path: Path, size: tuple[int, int] = (32, 32), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix[1:].upper())
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture
def kohya(tmp_path: Path) -> Path:
    make_image(tmp_path / "10_cat" / "a.png", caption="cat, sitting\n")
    make_image(tmp_path / "10_cat" / "b.png")
    make_image(tmp_path / "2_big_dog" / "c.jpg", (48, 32), caption="  big_dog ,  running  ")
    make_image(tmp_path / "reg" / "1_animal" / "r.png", caption="an animal")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "10_cat" / ".hidden.gif").write_bytes(b"\0")
    return tmp_path


def error_of(root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        scan_dataset(root, "t", **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# parsing

def test_scan_parses_repeats_concepts_captions_and_reg(kohya: Path) -> None:
    dataset = scan_dataset(kohya, "pets")
    assert [item.rel for item in dataset.items] == [
        "10_cat/a.png", "10_cat/b.png", "2_big_dog/c.jpg", "reg/1_animal/r.png"]
    a, b, c, r = dataset.items
    assert (a.folder, a.repeats, a.concept, a.caption, a.has_caption_file) == (
        "10_cat", 10, "cat", "cat, sitting", True)
    assert (c.repeats, c.concept, c.caption, c.width, c.height) == (
        2, "big_dog", "big_dog ,  running", 48, 32)
    assert (r.folder, r.repeats, r.concept, r.is_reg, r.caption) == (
        "reg/1_animal", 1, "animal", True, "an animal")
    assert a.path == (kohya / "10_cat" / "a.png").resolve() and a.path.is_absolute()
    assert dataset.train_items == (a, b, c) and dataset.reg_items == (r,)


def test_missing_caption_file_uses_folder_concept(kohya: Path) -> None:
    b = scan_dataset(kohya, "pets").items[1]
    assert (b.caption, b.has_caption_file) == ("cat", False)


def test_custom_caption_extension(tmp_path: Path) -> None:
    make_image(tmp_path / "1_x" / "a.png")
    (tmp_path / "1_x" / "a.caption").write_text("x, blue")
    assert scan_dataset(tmp_path, "t", caption_extension=".caption").items[0].caption == "x, blue"
    with_txt = scan_dataset(tmp_path, "t")  # with the default .txt it is reported and not read
    assert with_txt.other_captions == ("1_x/a.caption",) and with_txt.items[0].caption == "x"


def test_extensions_in_any_case(tmp_path: Path) -> None:
    make_image(tmp_path / "1_x" / "a.PNG")
    make_image(tmp_path / "1_x" / "b.JpG", caption="x, b")
    make_image(tmp_path / "1_x" / "c.webp")
    dataset = scan_dataset(tmp_path, "t")
    assert [item.rel for item in dataset.items] == ["1_x/a.PNG", "1_x/b.JpG", "1_x/c.webp"]
    assert dataset.items[1].caption == "x, b"
    assert image_files(tmp_path) == [tmp_path / "1_x" / name for name in ("a.PNG", "b.JpG", "c.webp")]


def test_image_files_lists_train_and_reg_without_decoding(kohya: Path) -> None:
    (kohya / "10_cat" / "broken.png").write_bytes(b"not an image")
    names = [p.relative_to(kohya).as_posix() for p in image_files(kohya)]
    assert names == ["10_cat/a.png", "10_cat/b.png", "10_cat/broken.png", "2_big_dog/c.jpg",
                     "reg/1_animal/r.png"]


# ---------------------------------------------------------------------------------------------
# errors

def test_unsupported_files_are_all_listed(kohya: Path) -> None:
    (kohya / "10_cat" / "notes.gif").write_bytes(b"GIF89a")
    (kohya / "2_big_dog" / "layers.psd").write_bytes(b"8BPS")
    message = error_of(kohya)
    assert "notes.gif" in message and "layers.psd" in message and "unsupported" in message


def test_corrupt_and_truncated_images_are_all_listed(kohya: Path) -> None:
    (kohya / "10_cat" / "x.png").write_bytes(random.Random(0).randbytes(500))
    noisy = Image.frombytes("L", (64, 64), random.Random(1).randbytes(64 * 64))
    noisy.save(kohya / "10_cat" / "full.png")
    data = (kohya / "10_cat" / "full.png").read_bytes()
    (kohya / "10_cat" / "full.png").unlink()
    (kohya / "10_cat" / "truncated.png").write_bytes(data[: len(data) // 2])
    message = error_of(kohya)
    assert "x.png" in message and "truncated.png" in message and "corrupt" in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope", "t")
    with pytest.raises(DatasetError, match="does not exist"):
        image_files(tmp_path / "nope")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("nothing yet")
    (tmp_path / "1_empty").mkdir()
    assert "no training images" in error_of(tmp_path)


def test_reg_only_dataset_has_no_training_images(tmp_path: Path) -> None:
    make_image(tmp_path / "reg" / "1_x" / "r.png")
    assert "no training images" in error_of(tmp_path)


def test_bad_folder_names_and_zero_repeats(kohya: Path) -> None:
    make_image(kohya / "cat" / "a.png")
    make_image(kohya / "0_dog" / "a.png")
    message = error_of(kohya)
    assert "rename it to 10_cat" in message and "rename it to 1_dog" in message


def test_orphan_caption_root_files_and_nested_folders(kohya: Path) -> None:
    (kohya / "10_cat" / "ghost.txt").write_text("cat")
    (kohya / "stray.png").write_bytes(b"")
    make_image(kohya / "10_cat" / "deeper" / "d.png")
    message = error_of(kohya)
    assert "orphan" in message and "ghost.txt" in message
    assert "dataset root" in message and "stray.png" in message
    assert "deeper" in message
    assert "README.md" not in message and ".DS_Store" not in message and ".hidden.gif" not in message


# ---------------------------------------------------------------------------------------------
# captions

def test_normalize_caption_and_split_tags() -> None:
    assert normalize_caption("  a,b ,,  red   circle\t, ,\n") == "a, b, red circle"
    assert split_tags("lbk, red  circle,") == ["lbk", "red circle"]
    assert split_tags("   ") == []


def test_caption_digest_ignores_touch_and_whitespace_but_not_tags(kohya: Path) -> None:
    before = caption_digest(scan_dataset(kohya, "pets"))
    caption = kohya / "10_cat" / "a.txt"
    os.utime(caption, (1, 1))
    assert caption_digest(scan_dataset(kohya, "pets")) == before
    caption.write_text("  cat ,sitting  \n\n")
    assert caption_digest(scan_dataset(kohya, "pets")) == before
    caption.write_text("cat, standing")
    assert caption_digest(scan_dataset(kohya, "pets")) != before


# ---------------------------------------------------------------------------------------------
# epochs and steps

def test_epoch_items_match_reg_entries_to_training_entries(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_image(tmp_path / "3_x" / f"{name}.png")
    for name in ("r1", "r2", "r3", "r4"):
        make_image(tmp_path / "reg" / "1_y" / f"{name}.png")
    entries = [item.rel for item in epoch_items(scan_dataset(tmp_path, "t"))]
    assert entries == ["3_x/a.png"] * 3 + ["3_x/b.png"] * 3 + [
        "reg/1_y/r1.png", "reg/1_y/r2.png", "reg/1_y/r3.png", "reg/1_y/r4.png",
        "reg/1_y/r1.png", "reg/1_y/r2.png"]


def test_epoch_items_truncate_surplus_reg_and_skip_absent_reg(tmp_path: Path) -> None:
    make_image(tmp_path / "1_x" / "a.png")
    assert len(epoch_items(scan_dataset(tmp_path, "t"))) == 1
    make_image(tmp_path / "reg" / "2_y" / "r1.png")
    make_image(tmp_path / "reg" / "2_y" / "r2.png")
    entries = [item.rel for item in epoch_items(scan_dataset(tmp_path, "t"))]
    assert entries == ["1_x/a.png", "reg/2_y/r1.png"]


def test_steps_per_epoch_batches_within_buckets(tmp_path: Path) -> None:
    # bucket S (square): a (3 repeats) + c (2 repeats) = 5 entries
    # bucket W (wide):   b (3 repeats) + d, e (2 repeats each) = 7 entries
    make_image(tmp_path / "3_x" / "a.png", (64, 64))
    make_image(tmp_path / "3_x" / "b.png", (96, 32))
    make_image(tmp_path / "2_y" / "c.png", (64, 64))
    make_image(tmp_path / "2_y" / "d.png", (96, 32))
    make_image(tmp_path / "2_y" / "e.png", (96, 32))
    dataset = scan_dataset(tmp_path, "t")
    spec = BucketSpec(resolution=(64, 64), min_size=32, max_size=128, step=32)
    placements = {item.rel: place(item.width, item.height, spec).bucket for item in dataset.items}
    assert sorted(set(placements.values())) == [(64, 64), (96, 32)]
    entries = epoch_items(dataset)
    # by hand: ceil(5/bs) + ceil(7/bs); batching across buckets would give ceil(12/bs) instead
    per_bucket = Counter(placements[item.rel] for item in entries)
    assert [bucket_steps(per_bucket, bs) for bs in (1, 2, 3)] == [12, 3 + 4, 2 + 3]
    with pytest.raises(ValueError):
        bucket_steps(per_bucket, 0)


# ---------------------------------------------------------------------------------------------
# demo dataset

def load_demo_script():
    path = REPO / "tests" / "fixtures" / "make_fixture_dataset.py"
    spec = importlib.util.spec_from_file_location("make_demo_dataset", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_demo_dataset_scans_and_is_varied() -> None:
    dataset = scan_dataset(DEMO, "demo")
    assert {item.repeats for item in dataset.items} == {5, 3}
    assert len({item.width / item.height for item in dataset.items}) >= 2
    assert sum(not item.has_caption_file for item in dataset.items) == 1
    assert any(item.path.suffix == ".jpg" for item in dataset.items)
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 200_000


def test_demo_generator_matches_committed_dataset(tmp_path: Path) -> None:
    load_demo_script().make_dataset(tmp_path / "demo")
    regenerated = scan_dataset(tmp_path / "demo", "demo")
    committed = scan_dataset(DEMO, "demo")
    assert caption_digest(regenerated) == caption_digest(committed)
    assert [(i.width, i.height) for i in regenerated.items] == [(i.width, i.height) for i in committed.items]


def test_os_clutter_is_skipped_and_listed(tmp_path):
    """Windows' and macOS' files stop nothing: kohya skips them, and the report lists them."""
    make_image(tmp_path / "3_cat" / "a.png", caption="cat")
    clutter = ["3_cat/Thumbs.db", "3_cat/desktop.ini", "3_cat/.DS_Store", "3_cat/._a.png", "Thumbs.db",
               "3_cat/.ipynb_checkpoints/a-checkpoint.txt"]
    for rel in clutter:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0\1 not an image")
    dataset = scan_dataset(tmp_path, "cats")
    assert [item.rel for item in dataset.items] == ["3_cat/a.png"]
    assert set(dataset.skipped) == {"3_cat/Thumbs.db", "3_cat/desktop.ini", "3_cat/.DS_Store", "3_cat/._a.png",
                                    "Thumbs.db", "3_cat/.ipynb_checkpoints"}


def test_a_caption_of_another_extension_is_reported_not_fatal(tmp_path):
    make_image(tmp_path / "3_cat" / "a.png", caption="cat, from the txt")
    (tmp_path / "3_cat" / "a.caption").write_text("cat, from another tagger")
    (tmp_path / "3_cat" / "b.png").write_bytes((tmp_path / "3_cat" / "a.png").read_bytes())
    (tmp_path / "3_cat" / "b.caption").write_text("only a .caption")
    dataset = scan_dataset(tmp_path, "cats")
    captions = {item.rel: item.caption for item in dataset.items}
    assert captions == {"3_cat/a.png": "cat, from the txt", "3_cat/b.png": "cat"}  # b: the folder's concept
    assert dataset.other_captions == ("3_cat/a.caption", "3_cat/b.caption")
    assert scan_dataset(tmp_path, "cats", ".caption").other_captions == ("3_cat/a.txt",)


# ---------------------------------------------------------------------------------------------
# per-folder settings (kohya's subsets)

def test_folder_settings_apply_to_their_folder_only(kohya: Path) -> None:
    from lorabake.config import FolderSettings
    from lorabake.data.dataset import with_folder_settings

    scanned = scan_dataset(kohya, "t")
    folders = {"10_cat": FolderSettings(num_repeats=3, caption_prefix="lbk_style,", caption_suffix=", photo",
                                        keep_tokens=2, shuffle=True, loss_weight=0.5)}
    dataset = with_folder_settings(scanned, folders, "config.yaml: datasets.t")
    cats = [item for item in dataset.items if item.folder == "10_cat"]
    dog = next(item for item in dataset.items if item.folder == "2_big_dog")
    assert [item.caption for item in cats] == ["lbk_style, cat, sitting , photo", "lbk_style, cat , photo"]
    assert {(i.repeats, i.keep_tokens, i.shuffle, i.loss_weight) for i in cats} == {(3, 2, True, 0.5)}
    assert dog == next(item for item in scanned.items if item.folder == "2_big_dog")  # untouched
    assert Counter(item.folder for item in epoch_items(dataset))["10_cat"] == 6  # 2 images × 3 repeats, not × 10
    assert caption_digest(dataset) != caption_digest(scanned)  # a prefix edit retrains
    with pytest.raises(DatasetError, match=r"config.yaml: datasets.t.folders: no folder 5_cat in .* \(its folders: "
                                           r"10_cat, 2_big_dog, reg/1_animal\)"):
        with_folder_settings(scanned, {"5_cat": FolderSettings(num_repeats=1)}, "config.yaml: datasets.t")
