"""Training state on disk, so a killed run resumes and ends with the same bytes it would have made.

A state is a directory `step-000120/` holding two files and nothing else:

    tensors.safetensors   every tensor of the state (LoRA weights, optimizer moments, RNG states)
    state.json            everything else, as a skeleton that restores exact Python types

No pickle (lorabake refuses pickles): `flatten` splits any tree of tensors, numbers, strings, bools,
None, lists, tuples and dicts into a flat name → tensor dict and a JSON skeleton in which tensors are
placeholders. Optimizer state dicts need the care: their `state` has int keys, betas and Adafactor's eps
are tuples, Prodigy keeps `d` and an infinite `growth_rate` in its param groups, and bitsandbytes nests
its quantization tensors under `__bnb_optimizer_quant_state__`. The JSON keeps all of it exact: ints
stay ints, tuples stay tuples, floats are written with `repr` (shortest round-tripping spelling).

A state directory is written into a temporary directory beside it and renamed into place, so it
appears whole or not at all; temporary names start with a dot and never look like a state. A resume
takes the newest state whose files are whole, so a state damaged after it was saved (a truncated copy,
a full disk, a deleted file) costs the steps since the state before it, not the run.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorabake import store

FORMAT = "lorabake-training-state"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "state.json"
STATE_NAME = re.compile(r"^step-(\d+)$")

# Skeleton tags: a JSON object with exactly one of these keys stands for a value JSON cannot spell.
TENSOR, TUPLE, PAIRS, FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
TAGS = frozenset({TENSOR, TUPLE, PAIRS, FLOAT})


class StateError(ValueError):
    """A training state that cannot be resumed from; the message names the directory or file."""


@dataclass
class TrainingState:
    network: dict[str, torch.Tensor]
    step: int
    epoch: int
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- tensors out, exact JSON skeleton

class _TensorNames:
    """Names tensors by where they sit in the tree; one tensor object reached twice is stored once
    (bitsandbytes shares one quantization map between all parameters)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.name_of: dict[int, str] = {}

    def add(self, tensor: torch.Tensor, path: tuple) -> str:
        if id(tensor) in self.name_of:
            return self.name_of[id(tensor)]
        name = base = "/".join(map(str, path)) or "tensor"
        copies = 1
        # "__metadata__" is the one name safetensors reserves for itself.
        while name in self.tensors or name == "__metadata__":
            copies += 1
            name = f"{base}~{copies}"
        self.tensors[name], self.name_of[id(tensor)] = tensor, name
        return name


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split `tree` into its tensors (name → tensor) and a JSON-able skeleton naming them."""
    names = _TensorNames()
    skeleton = _encode(tree, (), names)
    return names.tensors, skeleton


def _encode(value: Any, path: tuple, names: _TensorNames) -> Any:
    if isinstance(value, torch.Tensor):
        return {TENSOR: names.add(value, path)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # JSON has no inf or nan (Prodigy's growth_rate is inf); repr spells them so float() reads them.
        return float(value) if math.isfinite(value) else {FLOAT: repr(float(value))}
    if isinstance(value, list):
        return [_encode(item, path + (i,), names) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {TUPLE: [_encode(item, path + (i,), names) for i, item in enumerate(value)]}
    if isinstance(value, dict):
        return _encode_dict(value, path, names)
    raise TypeError(f"cannot save a {type(value).__name__} in a training state (at {_where(path)}); "
                    "only tensors, numbers, strings, bools, None, lists, tuples and dicts are kept")


def _encode_dict(mapping: dict, path: tuple, names: _TensorNames) -> Any:
    for key in mapping:
        if type(key) not in (str, int):
            raise TypeError(f"cannot save a dict key of type {type(key).__name__} ({key!r} at {_where(path)}); "
                            "keys must be str or int")
    items = [(key, _encode(value, path + (key,), names)) for key, value in mapping.items()]
    looks_tagged = len(mapping) == 1 and next(iter(mapping)) in TAGS
    if all(type(key) is str for key in mapping) and not looks_tagged:
        return dict(items)
    # Int keys (optimizer state is keyed by parameter index) need pairs: JSON objects have str keys.
    return {PAIRS: [[key, value] for key, value in items]}


def _where(path: tuple) -> str:
    return "/".join(map(str, path)) or "the top level"


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The tree `flatten` split: placeholders replaced by `tensors`, tuples, int keys and floats restored."""
    if isinstance(skeleton, list):
        return [unflatten(tensors, item) for item in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1 and next(iter(skeleton)) in TAGS:
        ((tag, body),) = skeleton.items()
        if tag == TENSOR:
            if body not in tensors:
                raise KeyError(f"the skeleton names tensor {body!r}, which is not among the saved tensors")
            return tensors[body]
        if tag == TUPLE:
            return tuple(unflatten(tensors, item) for item in body)
        if tag == PAIRS:
            return {key: unflatten(tensors, value) for key, value in body}
        return float(body)
    return {key: unflatten(tensors, value) for key, value in skeleton.items()}


def _for_disk(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: it refuses tensors sharing memory and non-contiguous views,
    so a tensor that is not the sole, whole owner of its storage is written as a copy."""
    seen_storages, ready = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.numel() * tensor.element_size() == storage.nbytes()
        key = storage.data_ptr()
        if not whole or (key and key in seen_storages):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add(key)
        ready[name] = tensor
    return ready


# ---------------------------------------------------------------- save and load

def state_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_state(directory: Path, *, network: dict[str, torch.Tensor], optimizer, scheduler, step: int,
               epoch: int, extra: dict | None = None) -> None:
    """Write everything a resume needs to `directory`, atomically (whole or not at all).

    The network is kept at its own dtype, not at `save.precision`: resuming from rounded weights would
    not end on the same bytes."""
    extra = dict(extra or {})
    tree = {"network": dict(network), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "extra": extra}
    tensors, skeleton = flatten(tree)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "epoch": epoch,
                "digest": extra.get("digest"), "tree": skeleton}
    def write(folder: Path) -> None:
        store.write_safetensors(folder / TENSORS_FILE, _for_disk(tensors), finite=False)  # as they were
        # The manifest goes last: even inside the temporary directory, it marks a complete state.
        store.write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, allow_nan=False) + "\n")

    # Whole or not at all; a state saved again for its step (a rerun after its successor was
    # refused) replaces the old one whole.
    store.build_folder(directory, write)


def load_state(directory: Path, optimizer, scheduler) -> TrainingState:
    """Read the state in `directory`, restore `optimizer` and `scheduler` in place, return the rest.

    Tensors are read to the CPU and placed by the optimizer's own `load_state_dict`, which moves the
    moments to each parameter's device and keeps torch's `step` counters where torch keeps them."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    tensors = _read_tensors(directory / TENSORS_FILE)
    try:
        tree = unflatten(tensors, manifest["tree"])
        network, optimizer_state, scheduler_state, extra = (
            tree["network"], tree["optimizer"], tree["scheduler"], tree["extra"])
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"training state {directory} is corrupt: {error}") from error
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"training state {directory} does not fit this optimizer or scheduler "
                         f"({type(optimizer).__name__}, {type(scheduler).__name__}): {error}") from error
    return TrainingState(network=network, step=manifest["step"], epoch=manifest["epoch"], extra=extra)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise StateError(f"training state {directory} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"training state {directory} is incomplete: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"training state {directory} is corrupt: cannot read {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{path} is not a lorabake training state")
    if manifest.get("version") != VERSION:
        raise StateError(f"training state {directory} has format version {manifest.get('version')}, this "
                         f"lorabake reads version {VERSION}; delete the directory to train from scratch")
    missing = [key for key in ("step", "epoch", "digest", "tree") if key not in manifest]
    if missing:
        raise StateError(f"training state {directory} is corrupt: {path} lacks {', '.join(missing)}")
    return manifest


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise StateError(f"training state {path.parent} is incomplete: {path} is missing")
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError, among others
        raise StateError(f"training state {path.parent} is corrupt: cannot read {path}: {error}") from error


# ---------------------------------------------------------------- the states of a run

def state_dirs(run_state_root: Path) -> list[Path]:
    """The state directories under `run_state_root`, oldest step first; temporary ones never count."""
    root = Path(run_state_root)
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir()
             if (match := STATE_NAME.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def latest_state(run_state_root: Path, digest: str) -> Path | None:
    """The newest whole state saved under the config `digest`; states of another config are never
    resumed, and a damaged one (unreadable manifest, missing or truncated tensors) is skipped with a
    warning for the one before it."""
    for directory in reversed(state_dirs(run_state_root)):
        try:
            if _read_manifest(directory)["digest"] != digest:
                continue
            _check_tensors(directory / TENSORS_FILE)
        except StateError as error:
            warnings.warn(f"skipping unreadable training state: {error}", stacklevel=2)
            continue
        return directory
    return None


def _check_tensors(path: Path) -> None:
    """Refuse a tensors file that is missing or not whole (safetensors checks that the header's
    offsets cover the file exactly). Reads the header only; a flipped bit in the data passes here,
    and load_state names the file when it cannot read it."""
    from lorabake.models import keys

    try:
        keys.read_header(path)
    except keys.HeaderError as error:
        raise StateError(f"training state {path.parent} is damaged: {error}") from error


def prune(run_state_root: Path, keep_last: int | None) -> None:
    """Keep only the newest `keep_last` states (all when None), and clear debris of killed saves
    (temporary directories no live save holds)."""
    root = Path(run_state_root)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 or None, not {keep_last}")
    store.remove_stale_temps(root)
    if keep_last is not None:
        for directory in state_dirs(root)[:-keep_last]:
            shutil.rmtree(directory)
