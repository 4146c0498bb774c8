"""The parse-time scan cache: a cached scan equals a fresh one, and every way a file can change
(edit, replacement, deletion, an edit inside the timestamp tick) is read again."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from lorabake import store
from lorabake.data import scan_cache
from lorabake.data.dataset import DatasetError, caption_digest, scan_dataset
from lorabake.data.scan_cache import image_sha256

HOUR_NS = 3600 * 10**9


def make_image(path: Path, size: tuple[int, int], color=(200, 30, 30), caption: str | None = None,
               orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    fmt = {".jpg": "JPEG", ".bmp": "BMP"}.get(path.suffix, "PNG")
    if orientation is None:
        image.save(path, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, format=fmt, exif=exif)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def back_date(root: Path, ns_ago: int = HOUR_NS) -> int:
    """Age every file, as a real dataset is older than the parse reading it (fresh files are racy)."""
    stamp = time.time_ns() - ns_ago
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(stamp, stamp))
    return stamp


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_image(root / "10_cat" / "a.png", (64, 32), caption="cat, sitting\n")
    make_image(root / "10_cat" / "b.png", (32, 48))  # captioned by its concept
    make_image(root / "10_cat" / "rotated.jpg", (64, 32), caption=" cat ,  rotated ", orientation=6)
    make_image(root / "2_dog" / "c.bmp", (40, 40), caption="dog")
    make_image(root / "reg" / "1_animal" / "r.png", (32, 32), caption="an animal")
    back_date(root)
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "results" / "cache" / "scan"


def scan(root: Path, cache_dir: Path | None):
    return scan_dataset(root, "pets", cache_file=None if cache_dir is None else cache_dir / "pets.json")


def cache_records(cache_dir: Path) -> dict:
    return json.loads((cache_dir / "pets.json").read_text())


def test_cached_scan_equals_a_fresh_one(dataset: Path, cache_dir: Path) -> None:
    fresh = scan(dataset, None)
    first, second = scan(dataset, cache_dir), scan(dataset, cache_dir)
    assert first == fresh and second == fresh
    assert caption_digest(second) == caption_digest(fresh)
    rotated = next(item for item in second.items if item.rel == "10_cat/rotated.jpg")
    assert (rotated.width, rotated.height, rotated.caption) == (32, 64, "cat ,  rotated")
    assert sorted(cache_records(cache_dir)["images"]) == [item.rel for item in fresh.items]


def test_unchanged_dataset_is_scanned_without_opening_a_file(dataset: Path, cache_dir: Path, monkeypatch) -> None:
    first = scan(dataset, cache_dir)
    written = (cache_dir / "pets.json").stat().st_mtime_ns
    read_text = Path.read_text

    def no_dataset_reads(path: Path, *args, **kwargs):
        if dataset in path.parents:
            raise AssertionError(f"read {path}")
        return read_text(path, *args, **kwargs)

    def no_reads(path, *args, **kwargs):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(Image, "open", no_reads)
    monkeypatch.setattr(store, "file_sha256", no_reads)
    monkeypatch.setattr(Path, "read_text", no_dataset_reads)
    assert scan(dataset, cache_dir) == first
    assert (cache_dir / "pets.json").stat().st_mtime_ns == written  # nothing new: not rewritten


def test_edited_caption_of_the_same_size_is_read_again(dataset: Path, cache_dir: Path) -> None:
    before = scan(dataset, cache_dir)
    caption = dataset / "10_cat" / "a.txt"
    stat = caption.stat()
    caption.write_text("cat, walking\n")  # as many bytes as "cat, sitting\n"
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert caption.stat().st_size == stat.st_size
    after = scan(dataset, cache_dir)
    assert after.items[0].caption == "cat, walking"
    assert caption_digest(after) != caption_digest(before)


def test_replaced_image_with_the_same_mtime_is_read_again(dataset: Path, cache_dir: Path) -> None:
    scan(dataset, cache_dir)
    image = dataset / "2_dog" / "c.bmp"
    stat = image.stat()
    make_image(image, (48, 40), color=(1, 2, 3))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_mtime_ns == stat.st_mtime_ns and image.stat().st_size != stat.st_size
    item = next(item for item in scan(dataset, cache_dir).items if item.rel == "2_dog/c.bmp")
    assert (item.width, item.height) == (48, 40)
    assert image_sha256(item.path) == hashlib.sha256(image.read_bytes()).hexdigest()


def test_deleted_files_drop_out(dataset: Path, cache_dir: Path) -> None:
    scan(dataset, cache_dir)
    (dataset / "10_cat" / "a.png").unlink()
    (dataset / "10_cat" / "a.txt").unlink()
    assert [item.rel for item in scan(dataset, cache_dir).items] == [
        "10_cat/b.png", "10_cat/rotated.jpg", "2_dog/c.bmp", "reg/1_animal/r.png"]
    records = cache_records(cache_dir)
    assert "10_cat/a.png" not in records["images"] and "10_cat/a.txt" not in records["captions"]
    assert "10_cat/rotated.txt" in records["captions"]


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],  # a truncated write
    lambda text: "\0\0\0",
    lambda text: text.replace('"version":1', '"version":999'),
    lambda text: json.dumps({**json.loads(text), "images": {"10_cat/a.png": [1, 2]}}),
])
def test_corrupt_cache_is_rebuilt(dataset: Path, cache_dir: Path, damage) -> None:
    fresh = scan(dataset, cache_dir)
    file = cache_dir / "pets.json"
    file.write_text(damage(file.read_text()))
    assert scan(dataset, cache_dir) == fresh
    assert cache_records(cache_dir)["version"] == scan_cache.CACHE_VERSION
    assert sorted(cache_records(cache_dir)["images"]) == [item.rel for item in fresh.items]


def test_cache_of_another_root_is_not_trusted(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Same names, sizes and mtimes (BMP sizes depend on dimensions only), other pixels."""
    scan(dataset, cache_dir)
    other = tmp_path / "other"
    make_image(other / "2_dog" / "c.bmp", (40, 40), color=(9, 9, 9))
    stat = (dataset / "2_dog" / "c.bmp").stat()
    os.utime(other / "2_dog" / "c.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    item = scan(other, cache_dir).items[0]
    assert image_sha256(item.path) == hashlib.sha256(item.path.read_bytes()).hexdigest()
    assert cache_records(cache_dir)["root"] == str(other.resolve())


def test_file_changed_within_the_timestamp_tick_is_read_again(dataset: Path, cache_dir: Path) -> None:
    """A just-written caption is not remembered: rewritten with the same size and mtime, the
    new text is still seen (git's racy-clean case)."""
    caption = dataset / "2_dog" / "c.txt"
    caption.write_text("dog")
    stat = caption.stat()
    assert scan(dataset, cache_dir).items[3].caption == "dog"
    caption.write_text("cat")
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert scan(dataset, cache_dir).items[3].caption == "cat"
    assert "2_dog/c.txt" not in cache_records(cache_dir)["captions"]


def test_problems_are_found_again_with_a_warm_cache(dataset: Path, cache_dir: Path) -> None:
    (dataset / "10_cat" / "broken.png").write_bytes(b"not an image")
    back_date(dataset)
    for _ in range(2):
        with pytest.raises(DatasetError, match="broken.png"):
            scan(dataset, cache_dir)
    assert "10_cat/a.png" in cache_records(cache_dir)["images"]  # the good files were kept


def test_image_sha256_is_served_from_the_scan(dataset: Path, cache_dir: Path, monkeypatch) -> None:
    items = scan(dataset, cache_dir).items
    expected = {item.rel: hashlib.sha256(item.path.read_bytes()).hexdigest() for item in items}
    with monkeypatch.context() as patch:
        patch.setattr(store, "file_sha256", lambda path: pytest.fail(f"hashed {path}"))
        assert {item.rel: image_sha256(item.path) for item in items} == expected
    changed = dataset / "10_cat" / "b.png"
    make_image(changed, (32, 48), color=(0, 0, 255))
    assert image_sha256(changed.resolve()) == hashlib.sha256(changed.read_bytes()).hexdigest()


def test_unwritable_cache_only_costs_speed(dataset: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    assert scan(dataset, blocked) == scan(dataset, None)
