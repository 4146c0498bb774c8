"""Kohya-style dataset folders: find the images, pair them with captions, refuse anything odd.

A dataset root holds `<repeats>_<concept>/` folders of images, each image with an optional caption
file of the same stem beside it, and optionally `reg/<repeats>_<class>/` folders of regularization
images. An image without a caption file is captioned with its concept (kohya's "keyword" training).

Every problem is collected and reported in one error that names each offending path and says what
to do, so a user fixes a dataset in one pass instead of meeting its problems one run at a time.

Snakemake scans every dataset on every parse; given a cache folder, what each file gave is kept
there and read back while the file is unchanged (lorabake.data.scan_cache), so a parse of an unchanged
dataset stats its files but opens none.

A caption longer than CAPTION_CHARS is cut there, with a warning and `ImageItem.caption_cut` set: no
run reads that far, and a 10 MB caption once made 14 MB of LoRA metadata (a 75 MB one failed at save).
"""
from __future__ import annotations

import itertools
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

from PIL import Image

from lorabake import store
from lorabake.data.scan_cache import ImageFacts, ScanCache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What operating systems and tools leave in folders: Windows' thumbnail caches and folder settings,
# macOS' Finder data and AppleDouble forks, Jupyter's checkpoints. kohya skips them; so does the scan
# (the dataset report lists them).
OS_CLUTTER = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ".ipynb_checkpoints"})
# Caption extensions taggers and kohya write (kohya's default is .caption): one beside an image that
# is not the configured extension is reported and not read, never an error.
CAPTION_EXTENSIONS = (".txt", ".caption", ".cap", ".tags")
REG_FOLDER = "reg"
EXIF_ORIENTATION = 0x0112
FOLDER_NAME = re.compile(r"(\d+)_(.+)")
# A run reads at most 225 CLIP tokens (max_token_length), and a token covers at least one character,
# usually four or more. Shuffled tags can bring any tag forward, so the cap is far above that too:
# 8192 characters hold some 500 booru tags, more than the most heavily tagged images carry.
CAPTION_CHARS = 8192


class DatasetError(ValueError):
    """A dataset that cannot be trained on as it stands; the message says how to fix it."""


@dataclass(frozen=True)
class ImageItem:
    path: Path  # absolute path of the image
    rel: str  # path relative to the dataset root, posix style, e.g. "5_lbk_circle/a.png"
    folder: str  # "5_lbk_circle", or "reg/1_shape" for regularization images
    repeats: int
    concept: str  # "lbk_circle"
    caption: str  # caption text as written (stripped), or the concept if no caption file
    has_caption_file: bool
    is_reg: bool
    width: int
    height: int
    caption_cut: bool = False  # the caption file was longer than CAPTION_CHARS and was cut there
    # The folder's own settings (datasets.<ds>.folders in config.yaml): None/1.0 = the run's
    keep_tokens: int | None = None
    shuffle: bool | None = None
    loss_weight: float = 1.0
    flip: bool | None = None
    mask: Path | None = None  # the mask file (loss.mask_source folder), when the scan was asked for masks


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    items: tuple[ImageItem, ...]  # sorted by rel
    skipped: tuple[str, ...] = ()  # OS clutter (Thumbs.db, .DS_Store, ._*, …), relative to root
    other_captions: tuple[str, ...] = ()  # caption files with another extension than the configured one

    @property
    def train_items(self) -> tuple[ImageItem, ...]:
        return tuple(item for item in self.items if not item.is_reg)

    @property
    def reg_items(self) -> tuple[ImageItem, ...]:
        return tuple(item for item in self.items if item.is_reg)


# --------------------------------------------------------------------------------------------
# listing

def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_image_name(name: str) -> bool:
    """`is_image` for the name of a visible file (a name starting with a dot never gets here)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    return name.rpartition(".")[0] or name


def _visible(folder: Path) -> list[Path]:
    """Folder entries minus hidden ones (.DS_Store, .ipynb_checkpoints, editor swap files)."""
    return [Path(entry.path) for entry in _visible_entries(folder)]


def _visible_entries(folder: Path, clutter: list[str] | None = None) -> list[os.DirEntry]:
    """`_visible` as directory entries, sorted by name: they know their type without a stat call,
    which matters in folders of thousands of images listed on every Snakemake parse. Hidden and
    OS-clutter entries are left out; with `clutter`, the clutter's paths are added to it."""
    with os.scandir(folder) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    if clutter is not None:
        clutter += [entry.path for entry in listed if is_clutter(entry.name)]
    return [entry for entry in listed if not entry.name.startswith(".") and not is_clutter(entry.name)]


def is_clutter(name: str) -> bool:
    """A file or folder an operating system or tool left, which no dataset means to hold."""
    lower = name.lower()
    return lower in OS_CLUTTER or lower.startswith("._")


def _require_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; create it or fix the path")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is a file, not a folder")


def _image_folders(root: Path) -> list[tuple[Path, bool]]:
    """Every folder that should hold images, with whether it holds regularization images."""
    folders = []
    for path in _visible(root):
        if path.is_dir() and path.name == REG_FOLDER:
            folders += [(sub, True) for sub in _visible(path) if sub.is_dir()]
        elif path.is_dir():
            folders.append((path, False))
    return folders


def image_files(root: Path) -> list[Path]:
    """Every image file of a dataset, sorted, without decoding or validating anything.

    Cheap enough for Snakemake input functions, which run on every DAG build."""
    root = Path(root)
    _require_root(root)
    return sorted(
        Path(entry.path)
        for folder, _ in _image_folders(root)
        for entry in _visible_entries(folder)
        if _is_image_name(entry.name) and entry.is_file()
    )


# --------------------------------------------------------------------------------------------
# full scan with validation

class _Problems:
    """Offending paths grouped under a message that says what is wrong and what to do."""

    def __init__(self) -> None:
        self.by_message: dict[str, list[str]] = {}
        self.skipped: list[str] = []         # OS clutter, skipped (absolute paths)
        self.other_captions: list[str] = []  # caption files of another extension, not read

    def add(self, message: str, entry: str) -> None:
        self.by_message.setdefault(message, []).append(entry)

    def raise_if_any(self, root: Path) -> None:
        if not self.by_message:
            return
        lines = [f"dataset {root} cannot be used:"]
        for message, entries in self.by_message.items():
            lines.append(f"- {message}:")
            lines += [f"    {entry}" for entry in entries]
        raise DatasetError("\n".join(lines))


def scan_dataset(root: Path, name: str, caption_extension: str = ".txt",
                 cache_file: Path | None = None, mask_folders: Collection[str] = (),
                 mask_folder: str | None = None) -> Dataset:
    """Read and validate a whole dataset folder; raise one DatasetError listing every problem.

    With `cache_file` (paths.scan_cache), what each file gave is remembered there and reused
    while the file's size and mtime stay the same (lorabake.data.scan_cache). Folders named in
    `mask_folders` inside an image folder hold loss masks and are not read as images; with
    `mask_folder`, every image must have its mask there (same stem, same size), which its item
    then names."""
    root = Path(root)
    _require_root(root)
    root = root.resolve()
    caption_extension = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
    cache = ScanCache.open(root, Path(cache_file) if cache_file is not None else None)
    problems = _Problems()
    _check_loose_files(root, problems)
    masks = _MaskFolders(frozenset(mask_folders) | ({mask_folder} if mask_folder else set()), mask_folder)
    items = []
    for folder, is_reg in _image_folders(root):
        items += _scan_folder(folder, root, is_reg, caption_extension.lower(), cache, problems, masks)
    cache.save()  # before raising: the files that were fine need not be read again after a fix
    if not any(not item.is_reg for item in items):
        problems.add("no training images; add images to <root>/<repeats>_<concept>/", str(root))
    problems.raise_if_any(root)
    return Dataset(name=name, root=root, items=tuple(sorted(items, key=lambda item: item.rel)),
                   skipped=_relative(problems.skipped, root), other_captions=_relative(problems.other_captions, root))


def _relative(found: list[str], root: Path) -> tuple[str, ...]:
    return tuple(sorted(Path(path).relative_to(root).as_posix() for path in found))


def _check_loose_files(root: Path, problems: _Problems) -> None:
    """Files must sit in an image folder; a README or notes in the root are fine."""
    for path in (Path(entry.path) for entry in _visible_entries(root, problems.skipped)):
        if path.is_file() and not (path.name.upper().startswith("README") or path.suffix.lower() == ".md"):
            problems.add("files directly in the dataset root; move them into a <repeats>_<concept> "
                         "folder or delete them", str(path))
    reg = root / REG_FOLDER
    if reg.is_dir():
        for path in (Path(entry.path) for entry in _visible_entries(reg, problems.skipped)):
            if path.is_file():
                problems.add("files directly in reg/; move them into reg/<repeats>_<class>/", str(path))


MAX_REPEATS = 10_000


def _parse_folder_name(folder: Path, problems: _Problems) -> tuple[int, str]:
    match = FOLDER_NAME.fullmatch(folder.name)
    if match is None:
        problems.add("folders not named <repeats>_<concept> as kohya expects",
                     f"{folder} (rename it to 10_{folder.name})")
        return 0, folder.name
    repeats, concept = int(match.group(1)), match.group(2)
    if repeats < 1:
        problems.add("folders with fewer than 1 repeat", f"{folder} (rename it to 1_{concept})")
    if repeats > MAX_REPEATS:  # each repeat is an entry of every epoch: 10^12 of them hang the plan
        problems.add(f"folders with more than {MAX_REPEATS:,} repeats (real datasets use at most a few hundred; "
                     "use more epochs instead)", f"{folder} ({repeats:,} repeats)")
        return 0, concept
    return repeats, concept


@dataclass(frozen=True)
class _MaskFolders:
    names: frozenset[str]  # subfolders of image folders that hold masks, not images
    required: str | None  # the one whose masks this scan pairs with the images


def _scan_folder(folder: Path, root: Path, is_reg: bool, caption_extension: str, cache: ScanCache,
                 problems: _Problems, masks: _MaskFolders) -> list[ImageItem]:
    repeats, concept = _parse_folder_name(folder, problems)
    folder_rel = folder.relative_to(root).as_posix()
    images, captions = _pair_files(folder, caption_extension, problems, masks.names)
    mask_of = _pair_masks(folder, folder_rel, images, masks.required, cache, problems) if masks.required else {}
    items = []
    for image in images:
        rel = f"{folder_rel}/{image.name}"
        facts = _image_facts(image, rel, cache, problems)
        caption_file = captions.get(_stem(image.name))
        caption = (_caption_text(caption_file, f"{folder_rel}/{caption_file.name}", cache, problems)
                   if caption_file else concept)
        mask = mask_of.get(image.name)
        if mask is not None and facts is not None and (mask[1].width, mask[1].height) != (facts.width, facts.height):
            problems.add("masks of another size than their image (a mask must match its image pixel for pixel)",
                         f"{mask[0]} ({mask[1].width}x{mask[1].height}; {image.path} is {facts.width}x{facts.height})")
        if facts is not None and caption is not None:
            caption, cut = _capped(caption, caption_file.path) if caption_file else (caption, False)
            items.append(ImageItem(
                path=Path(image.path), rel=rel, folder=folder_rel,
                repeats=repeats, concept=concept, caption=caption,
                has_caption_file=caption_file is not None, is_reg=is_reg,
                width=facts.width, height=facts.height, caption_cut=cut,
                mask=mask[0] if mask is not None else None))
    return items


def _pair_masks(folder: Path, folder_rel: str, images: list[os.DirEntry], mask_folder: str, cache: ScanCache,
                problems: _Problems) -> dict[str, tuple[Path, ImageFacts]]:
    """Each image's mask in `folder/mask_folder/` (same stem, any image extension) and its facts, by
    the image's name; an image without one, a mask without an image, and anything else there are
    problems."""
    where = folder / mask_folder
    found: dict[str, os.DirEntry] = {}
    if where.is_dir():
        for entry in _visible_entries(where, problems.skipped):
            if entry.is_file() and _is_image_name(entry.name):
                found[_stem(entry.name)] = entry
            else:
                problems.add(f"files in a mask folder that are not images ({', '.join(IMAGE_EXTENSIONS)})", entry.path)
    paired = {}
    for image in images:
        entry = found.pop(_stem(image.name), None)
        if entry is None:
            problems.add(f"images without a mask (loss.masked with mask_source folder reads each image's mask from "
                         f"{mask_folder}/ in its folder, same name; white is trained, black ignored)",
                         f"{image.path} (expected {where / _stem(image.name)}.png)")
            continue
        facts = _image_facts(entry, f"{folder_rel}/{mask_folder}/{entry.name}", cache, problems)
        if facts is not None:
            paired[image.name] = (Path(entry.path), facts)
    for entry in found.values():
        problems.add("masks with no image of the same name; add the image or delete the mask", entry.path)
    return paired


def _pair_files(folder: Path, caption_extension: str, problems: _Problems,
                mask_folders: frozenset[str] = frozenset()) -> tuple[list[os.DirEntry], dict[str, os.DirEntry]]:
    """The folder's images and its captions keyed by stem; anything else is a problem."""
    images, captions = [], {}
    for entry in _visible_entries(folder, problems.skipped):
        is_file = entry.is_file()
        if is_file and _is_image_name(entry.name):
            images.append(entry)
        elif is_file and entry.name.lower().endswith(caption_extension):
            captions[entry.name[: -len(caption_extension)]] = entry
        elif is_file and os.path.splitext(entry.name)[1].lower() in CAPTION_EXTENSIONS:
            problems.other_captions.append(entry.path)
        elif entry.is_dir() and entry.name in mask_folders:
            continue  # loss masks (loss.mask_folder), read by a scan that asks for them
        elif entry.is_dir():
            problems.add("folders inside an image folder, which kohya does not read; move their "
                         "images up or delete them (or name them as loss.mask_folder, if they hold masks)", entry.path)
        elif not _is_image_name(entry.name):
            problems.add(f"unsupported files (images must be {', '.join(IMAGE_EXTENSIONS)}; captions "
                         f"must end in {caption_extension}); convert, rename or delete them", entry.path)
    image_stems = {_stem(entry.name) for entry in images}
    for stem, entry in captions.items():
        if stem not in image_stems:
            problems.add("orphan captions with no image of the same name; add the image or delete "
                         "the caption", entry.path)
    return images, captions


def _image_facts(image: os.DirEntry, rel: str, cache: ScanCache, problems: _Problems) -> ImageFacts | None:
    """Upright size and content hash of a decodable image, remembered or read; a corrupt image is
    recorded as a problem. The stat is taken before the read, so a file changing meanwhile only
    gets read again next time."""
    stat = image.stat()
    facts = cache.image(rel, stat)
    if facts is None:
        try:
            facts = read_image_facts(Path(image.path))
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError … by format
            problems.add("unreadable or corrupt images; re-export or delete them", f"{image.path} ({error})")
            return None
        cache.remember_image(rel, stat, facts)
    return facts


def read_image_facts(path: Path) -> ImageFacts:
    """Decode an image in full and hash its bytes; raise if it is corrupt.

    `verify` checks structure and checksums but not that all pixel data is there, so the image is
    also decoded in full to catch truncated files. Pillow opens the path itself, so its errors
    name the file."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        width, height = upright_size(image)
    return ImageFacts(width, height, store.file_sha256(path))


def upright_size(image: Image.Image) -> tuple[int, int]:
    """Size as displayed: EXIF orientations 5-8 rotate by 90 degrees (latents decode upright too)."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def _caption_text(caption_file: os.DirEntry, rel: str, cache: ScanCache, problems: _Problems) -> str | None:
    """The caption as written (stripped), remembered or read; normalizing is left to the digest.
    At most CAPTION_CHARS + 1 characters are kept (and remembered): one more than the cap, so a
    caption read back from the cache still shows it was longer."""
    stat = caption_file.stat()
    text = cache.caption(rel, stat)
    if text is None:
        try:
            text = Path(caption_file.path).read_text(encoding="utf-8").strip()[:CAPTION_CHARS + 1]
        except UnicodeDecodeError:
            problems.add("captions that are not UTF-8 text; re-save them as UTF-8", caption_file.path)
            return None
        cache.remember_caption(rel, stat, text)
    return text


def _capped(caption: str, path: str) -> tuple[str, bool]:
    """The caption cut to CAPTION_CHARS (at the last tag boundary before it, if there is one), and
    whether it was cut; a cut caption is warned about."""
    if len(caption) <= CAPTION_CHARS:
        return caption, False
    kept = caption[:CAPTION_CHARS]
    if caption[CAPTION_CHARS] != ",":
        kept = kept.rpartition(",")[0] or kept
    warnings.warn(f"{path}: caption longer than {CAPTION_CHARS} characters, cut to its first "
                  f"{len(kept.rstrip())}: no run reads that far (at most 225 CLIP tokens)", stacklevel=2)
    return kept.rstrip(), True


# --------------------------------------------------------------------------------------------
# captions

def with_folder_settings(dataset: Dataset, folders: dict, where: str) -> Dataset:
    """The dataset with each configured folder's settings applied to its images (repeats, caption
    prefix/suffix, keep_tokens, shuffle, loss weight, flip); a folder the dataset lacks is an error naming `where`."""
    if not folders:
        return dataset
    present = {item.folder for item in dataset.items}
    missing = sorted(set(folders) - present)
    if missing:
        raise DatasetError(f"{where}.folders: no folder {', '.join(missing)} in {dataset.root} "
                           f"(its folders: {', '.join(sorted(present))})")

    def applied(item: ImageItem) -> ImageItem:
        own = folders.get(item.folder)
        if own is None:
            return item
        caption = " ".join(part for part in (own.caption_prefix, item.caption, own.caption_suffix) if part)
        return replace(item, repeats=own.num_repeats or item.repeats, caption=caption, keep_tokens=own.keep_tokens,
                       shuffle=own.shuffle, loss_weight=own.loss_weight, flip=own.flip)

    return replace(dataset, items=tuple(applied(item) for item in dataset.items))


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, each stripped with inner whitespace runs collapsed, empties dropped."""
    return [tag for tag in (" ".join(raw.split()) for raw in caption.split(",")) if tag]


def normalize_caption(text: str) -> str:
    """One spelling per tag list, so whitespace-only edits leave a caption unchanged."""
    return ", ".join(split_tags(text))


def caption_digest(dataset: Dataset) -> str:
    """Digest of what training reads from the captions; mtimes and whitespace do not enter it."""
    return store.digest([(item.rel, normalize_caption(item.caption)) for item in dataset.items])


# --------------------------------------------------------------------------------------------
# epochs and steps

def epoch_items(dataset: Dataset, held_out: frozenset[str] = frozenset()) -> list[ImageItem]:
    """Kohya's entries for one epoch, in sorted order (shuffling happens elsewhere).

    Each training image appears `repeats` times (but those in `held_out`, validation images by
    their `rel`, never). Regularization entries (each reg image repeated by its folder's repeats,
    then cycled) are added until they match the training entries in number, which is why kohya
    reports that reg images double the steps."""
    train = [item for item in dataset.train_items if item.rel not in held_out for _ in range(item.repeats)]
    reg_pool = [item for item in dataset.reg_items for _ in range(item.repeats)]
    if not reg_pool:
        return train
    return train + list(itertools.islice(itertools.cycle(reg_pool), len(train)))


def bucket_steps(entries_per_bucket: Counter, batch_size: int, grad_accum: int = 1) -> int:
    """kohya's step count: every batch comes from one bucket, so each bucket gives ceil(entries /
    batch_size) batches, and every `grad_accum` batches make one optimizer step (a last partial group
    still steps, as accelerate does at the end of a dataloader)."""
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size}, {grad_accum}")
    batches = sum(math.ceil(count / batch_size) for count in entries_per_bucket.values())
    return math.ceil(batches / grad_accum)
