"""Atomic writes, content digests and claims: the things every cache in lorabake stands on.

Every artifact is written to a temporary file beside its destination and moved into place with
`os.replace`, so a killed or concurrent job never leaves a half-written file where a reader looks.
A writer holds an `flock` on its temporary until it is in place; a temporary that nobody holds is
what a killed writer left behind, and the first write into that folder removes it. A full disk is
reported with the file, what it needed and what is free, not as a bare errno.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

CHUNK = 1 << 20
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# What atomic_path and build_folder name their temporaries, `.{name}.{random}.tmp`, the `….tmp.old` a
# replaced folder is moved to before it is deleted, and claim files, `.{key}.lock`.
TEMP_NAME = re.compile(r"^\..+\.(?:[A-Za-z0-9_]+\.tmp(?:\.old)?|lock)$")


class DiskFull(OSError):
    """No space (or no quota) left while writing an artifact. Still an OSError with its errno; the
    message names the file, the bytes it needed and the bytes free on that filesystem."""

    def __init__(self, code: int, destination: Path, needed: int | None, written: int):
        super().__init__(code, os.strerror(code), str(destination))
        free = shutil.disk_usage(_existing(destination.parent)).free
        need = f"it needs {_size(needed)}" if needed is not None else \
            f"it wrote {_size(written)} before the disk filled, and needs more"
        self.message = f"{os.strerror(code)} writing {destination}: {need}; {_size(free)} free there"

    def __str__(self) -> str:
        return self.message

    @classmethod
    def raise_for(cls, error: OSError, destination: Path, needed: int | None, temporary: Path | None) -> None:
        """Raise a DiskFull for `error` if it is one (after removing `temporary`, so the free space
        reported is what is really left); otherwise return and let the caller re-raise."""
        if error.errno in DISK_FULL and not isinstance(error, DiskFull):
            written = _remove(temporary)
            raise cls(error.errno, destination, needed, written) from error


def _size(count: int) -> str:
    return f"{count / 2 ** 20:.1f} MiB ({count} bytes)"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; move it into place only if the block succeeds.
    `size`, when known, is what the block will write (a full disk reports it)."""
    destination, tmp = Path(destination), None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(destination.parent)
        fd, tmp = _locked_temp(destination, folder=False)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get ordinary modes
            os.replace(tmp, destination)
        finally:
            os.close(fd)  # ends the lock that tells this temporary from a killed writer's
    except OSError as error:
        DiskFull.raise_for(error, destination, size, tmp)
        raise
    finally:
        _remove(tmp)


def build_folder(destination: str | os.PathLike, build: Callable[[Path], T]) -> T:
    """Build a folder in a sibling temp folder, then swap it in: readers never see a half-built one.
    Returns what `build` returns. (rmtree does not follow symlinks, so a folder of links to a
    user's files never deletes them.)"""
    destination, tmp, old = Path(destination), None, None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(destination.parent)
        fd, tmp = _locked_temp(destination, folder=True)
        old = tmp.with_name(tmp.name + ".old")
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a folder artifact gets an ordinary mode
            result = build(tmp)
            if destination.exists() or destination.is_symlink():
                destination.rename(old)
            tmp.rename(destination)
        finally:
            os.close(fd)
        return result
    except OSError as error:
        DiskFull.raise_for(error, destination, None, tmp)
        raise
    finally:
        _remove(tmp)
        _remove(old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path | None) -> int:
    """Delete a temporary file or folder (never following links); returns the bytes it held."""
    if path is None or not os.path.lexists(path):
        return 0
    if path.is_dir() and not path.is_symlink():
        held = sum(os.lstat(os.path.join(folder, name)).st_size
                   for folder, _, names in os.walk(path) for name in names)
        shutil.rmtree(path, ignore_errors=True)
        return held
    held = path.lstat().st_size
    path.unlink(missing_ok=True)
    return held


# ---------------------------------------------------------------- temporaries of killed writers

def _locked_temp(destination: Path, folder: bool) -> tuple[int, Path]:
    """A new temporary beside `destination` and an open descriptor holding an flock on it until it is
    closed: how `remove_stale_temps` tells a live writer's temporary from a killed writer's."""
    options = dict(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    while True:
        if folder:
            path = Path(tempfile.mkdtemp(**options))
        else:
            made, name = tempfile.mkstemp(**options)
            os.close(made)
            path = Path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another job's sweep removed it before this one could lock it: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: this temporary is then never swept
            return fd, path
        if _same_file(fd, path):
            return fd, path
        os.close(fd)  # a sweep took it for a killed writer's between its creation and the lock: again


_swept: set[str] = set()


def _sweep_once(folder: Path) -> None:
    """Remove the stale temporaries in `folder` at this process's first write there (listing a
    content-addressed store at every write would cost more than the writes)."""
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temps(folder)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries and claim files in `folder` that no live process holds — what killed
    writers left, in a folder several jobs write at once (the latent store) as in a job's own output
    folder — and return them. One whose lock cannot be tested (a filesystem without locks) is kept."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in sorted(filter(TEMP_NAME.match, names)):
        path = Path(folder, name)
        if _remove_if_abandoned(path):
            removed.append(path)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone (renamed into place), a link, or unreadable: not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
        if not _same_file(fd, path):  # its writer renamed it into place after we opened it
            return False
        _remove(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


# ---------------------------------------------------------------- claims between concurrent jobs

@contextlib.contextmanager
def claim(lock_file: str | os.PathLike, wait: bool = True) -> Iterator[bool]:
    """Claim `lock_file` for this process: yields True while held, or False at once when `wait` is
    False and another process holds it. The claim is an flock, so a killed holder's claim ends with
    it (never stale); the file is removed on release. On a filesystem without locks the claim is
    granted unguarded (yields True): concurrent jobs may then repeat work, never corrupt it."""
    lock_file = Path(lock_file)
    fd = _acquire(lock_file, wait)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        if fd >= 0:
            lock_file.unlink(missing_ok=True)  # while still held: a waiter then finds it gone, see _acquire
            os.close(fd)


def _acquire(lock_file: Path, wait: bool) -> int | None:
    """The held lock's descriptor; None when busy and not waiting; -1 when the filesystem has no locks."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # a filesystem without locks
            os.close(fd)
            lock_file.unlink(missing_ok=True)
            return -1
        if _same_file(fd, lock_file):
            return fd
        os.close(fd)  # its holder removed that file as it released it: claim the file there now


def write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination, size=len(data)) as tmp:
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


class NonFiniteWeights(ValueError):
    """Weights holding NaN or inf, refused before they are written: a file other tools would load
    and render as black or noise images (PEFT's safe merge checks the same)."""


def write_safetensors(destination: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                      finite: bool = True) -> None:
    """Write tensors atomically; with `finite` (weights, latents), refuse NaN or inf in any of them."""
    if finite:
        require_finite(tensors, destination)
    write_bytes(destination, safetensors_bytes(tensors, metadata))


def require_finite(tensors: dict, destination: str | os.PathLike) -> None:
    broken = sorted(key for key, tensor in tensors.items()
                    if tensor.is_floating_point() and not bool(tensor.isfinite().all()))
    if broken:
        raise NonFiniteWeights(f"{destination}: not written: {len(broken)} tensor(s) hold NaN or inf, e.g. "
                               f"{broken[:3]}; the run or merge that made them diverged")
