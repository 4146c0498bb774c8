"""Atomic writes and content digests: the two things every cache in lorabake stands on.

Every artifact is written to a temporary file beside its destination and moved into place with
`os.replace`, so a killed or concurrent job never leaves a half-written file where a reader looks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; move it into place only if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get ordinary modes
        os.replace(tmp_path, destination)
    finally:
        tmp_path.unlink(missing_ok=True)


def build_folder(destination: str | os.PathLike, build: Callable[[Path], T]) -> T:
    """Build a folder in a sibling temp folder, then swap it in: readers never see a half-built one.
    Returns what `build` returns. (rmtree does not follow symlinks, so a folder of links to a
    user's files never deletes them.)"""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a folder artifact gets an ordinary mode
        result = build(tmp)
        if destination.exists() or destination.is_symlink():
            destination.rename(old)
        tmp.rename(destination)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def write_text(destination: str | os.PathLike, text: str) -> None:
    write_bytes(destination, text.encode("utf-8"))


def write_json(destination: str | os.PathLike, obj: Any) -> None:
    write_text(destination, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no whitespace. Digests are taken of this."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(obj: Any, length: int = 16) -> str:
    """Short sha256 of a JSON-able value."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: str | os.PathLike) -> str:
    """Content hash of every file under `root` (names and bytes), independent of mtimes."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a canonical header: the library writes metadata in hash-map order,
    which changes from process to process; sorted keys make equal contents equal bytes."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + length :]


def write_safetensors(destination: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    write_bytes(destination, safetensors_bytes(tensors, metadata))
