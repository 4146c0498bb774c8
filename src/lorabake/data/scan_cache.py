"""What a dataset scan read from each file, remembered while the file stays the same.

Snakemake parses the project on every invocation and the parse scans every dataset, decoding each
image for its upright size and reading each caption. At farm scale (tens of thousands of images)
that alone is longer than anyone should wait for `snakemake -n`. This cache keeps, per file, what
the scan got from it — an image's upright size and the sha256 of its bytes, a caption's text —
keyed by (path, size, mtime_ns), the test make, rsync and git's index use for "unchanged". A file
whose size or mtime differs is read again; a file the scan no longer meets drops out.

One JSON file per dataset (`results/cache/scan/<dataset>.json`), written only when something
changed, and replaced atomically (lorabake.store): concurrent Snakemake processes each read a
whole file and the last writer wins, which is safe because every version holds only true facts
about the keys it names. A missing, corrupt, other-version or other-root file is rebuilt.

A file modified within RACY_NS of the scan reading it is read but not remembered. Its mtime can
stay the same through a second edit in the same timestamp tick, so a cached entry could go stale
unseen — git's "racy clean" problem (Documentation/technical/racy-git.txt), solved the same way.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lorabake import store

CACHE_VERSION = 1
RACY_NS = 2 * 10**9  # FAT and some network filesystems keep 2-second timestamps


@dataclass(frozen=True)
class ImageFacts:
    width: int  # upright (EXIF orientation applied), as training sees the image
    height: int
    sha256: str  # of the file's bytes: the key of the content-addressed latent cache


# Every image fact met in this process, by absolute path: (size, mtime_ns, sha256). Snakemake's
# input functions run in the process that parsed (scanned) the project, so `image_sha256` finds
# each image here instead of reading it again.
_known_hashes: dict[str, tuple[int, int, str]] = {}


def image_sha256(path: str | os.PathLike) -> str:
    """sha256 of an image file's bytes, served from the scan cache while the file is unchanged.

    Pass `ImageItem.path` (absolute, as the scan saw it); any other spelling of the same file is
    hashed from disk, which gives the same answer more slowly."""
    key = os.path.abspath(path)
    stat = os.stat(key)
    known = _known_hashes.get(key)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    digest = store.file_sha256(key)
    _known_hashes[key] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


class ScanCache:
    """One dataset's remembered file facts. Without a file it remembers nothing across processes
    but still feeds `image_sha256`."""

    def __init__(self, root: Path, file: Path | None, images: dict[str, list], captions: dict[str, list]):
        self.root = root
        self.file = file
        self._root_text = str(root)
        self.started_ns = time.time_ns()
        self._images, self._captions = images, captions
        self._seen: set[str] = set()
        self._changed = False

    @classmethod
    def open(cls, root: Path, file: Path | None) -> "ScanCache":
        """The cache stored in `file` for the dataset at `root`; empty if there is none to trust."""
        images, captions = _load(file, root) if file is not None else ({}, {})
        return cls(root, file, images, captions)

    # ------------------------------------------------------------ images
    def image(self, rel: str, stat: os.stat_result) -> ImageFacts | None:
        """The facts remembered for the image at `rel` (posix, relative to root) if it is unchanged."""
        self._seen.add(rel)
        record = self._images.get(rel)
        if record is None or record[0] != stat.st_size or record[1] != stat.st_mtime_ns:
            return None
        self._register(rel, stat, record[4])
        return ImageFacts(record[2], record[3], record[4])

    def remember_image(self, rel: str, stat: os.stat_result, facts: ImageFacts) -> None:
        self._register(rel, stat, facts.sha256)
        self._remember(self._images, rel, stat, [facts.width, facts.height, facts.sha256])

    def _register(self, rel: str, stat: os.stat_result, sha256: str) -> None:
        _known_hashes[os.path.join(self._root_text, rel)] = (stat.st_size, stat.st_mtime_ns, sha256)

    # ------------------------------------------------------------ captions
    def caption(self, rel: str, stat: os.stat_result) -> str | None:
        """The text remembered for the caption file at `rel` if it is unchanged."""
        self._seen.add(rel)
        record = self._captions.get(rel)
        if record is None or record[0] != stat.st_size or record[1] != stat.st_mtime_ns:
            return None
        return record[2]

    def remember_caption(self, rel: str, stat: os.stat_result, text: str) -> None:
        self._remember(self._captions, rel, stat, [text])

    # ------------------------------------------------------------ storing
    def _remember(self, records: dict[str, list], rel: str, stat: os.stat_result, facts: list) -> None:
        self._seen.add(rel)
        if stat.st_mtime_ns >= self.started_ns - RACY_NS:  # racy: read this time, read again next time
            self._changed |= records.pop(rel, None) is not None
        else:
            records[rel] = [stat.st_size, stat.st_mtime_ns, *facts]
            self._changed = True

    def save(self) -> None:
        """Write the cache if this scan changed it; files the scan did not meet drop out."""
        for records in (self._images, self._captions):
            for rel in records.keys() - self._seen:
                del records[rel]
                self._changed = True
        if self.file is None or not self._changed:
            return
        data = {"version": CACHE_VERSION, "root": str(self.root), "images": self._images, "captions": self._captions}
        try:
            store.write_text(self.file, json.dumps(data, separators=(",", ":"), ensure_ascii=False))
        except OSError:
            return  # a read-only or full results/ only costs speed: the next scan reads the files again
        self._changed = False


def _load(file: Path, root: Path) -> tuple[dict[str, list], dict[str, list]]:
    """The stored records, or empty ones if the file is missing, corrupt or not for this root."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        images, captions = data["images"], data["captions"]
        trusted = (data["version"] == CACHE_VERSION and data["root"] == str(root)
                   and _well_formed(images, 5) and _well_formed(captions, 3))
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}
    return (images, captions) if trusted else ({}, {})


def _well_formed(records: object, length: int) -> bool:
    """Records of the right shape. Values are not type-checked one by one: the file is only ever
    written whole by this module, so damage shows as unparsable JSON or a wrong shape."""
    return isinstance(records, dict) and all(type(record) is list and len(record) == length
                                             for record in records.values())
