"""Datasets: the per-dataset settings sd-scripts layers (subset > dataset > general > main config) and
the kohya image folders lorabake wants as datasets/<dataset>/[reg/]<repeats>_<concept>/.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from lorabake.kohya.bookkeeping import FolderPlan, _Importer, _put
from lorabake.kohya.readers import _Subset
from lorabake.kohya.values import Entry, _boolean, _integer, _number, _resolution, _text, _unset
from lorabake.kohya.vocabulary import DATASET_DEFAULTS, DATASET_SETTINGS, MAIN_NAME


def _dataset_names(imp: _Importer, subsets: list[_Subset]) -> list[str]:
    count = max(s.dataset for s in subsets) + 1
    return [imp.name] if count == 1 else [f"{imp.name}-{i + 1}" for i in range(count)]


def _map_datasets(imp: _Importer, subsets: list[_Subset], base_dir: Path, from_toml: bool) -> None:
    names = _dataset_names(imp, subsets)
    for name in names:
        imp.datasets[name] = {"path": f"datasets/{name}"}
    imp.run["datasets"] = names
    for key, dotted in DATASET_SETTINGS.items():
        _map_dataset_setting(imp, subsets, key, dotted)
    if from_toml:
        for key in ("train_data_dir", "reg_data_dir"):
            entry = imp.take(key)
            if entry is not None:
                imp.skip(entry, "nothing lost: sd-scripts ignores it when a dataset config is given")
        _plan_subset_folders(imp, subsets, names)
    else:
        _plan_kohya_folders(imp, names[0], base_dir)
    _map_masks(imp, subsets)


def _map_masks(imp: _Importer, subsets: list[_Subset]) -> None:
    """kohya masks the loss when any subset has alpha_mask (the others get all-ones masks), or with
    --masked_loss from each subset's conditioning_data_dir; lorabake's loss.masked reads one source
    for the whole run: the alpha channel, or mask files in masks/ inside each image folder."""
    masked = imp.take("masked_loss")
    alphas = [_layered(s, "alpha_mask") for s in subsets]
    on = [e for e in alphas if e is not None and _boolean(e)]
    folders = [e for e in (_layered(s, "conditioning_data_dir") for s in subsets) if e is not None]
    if on:
        partly = None if len(on) == len(subsets) else ("kohya reads the alpha channel of the alpha_mask subsets only; "
                                                       "lorabake reads every image's (an image without one trains "
                                                       "everywhere, as kohya's other subsets do)")
        _put(imp.run, "loss.masked", True)
        for entry in {e.label: e for e in on}.values():
            imp.set(entry, "loss.mask_source", "alpha", partly)
        if masked is not None and _boolean(masked):
            imp.record(masked, "loss.masked", True)
        elif masked is not None:
            imp.skip(masked, "nothing lost: kohya masks the loss of alpha_mask subsets whatever masked_loss says")
        for entry in folders:
            imp.skip(entry, "lorabake reads one mask source per run: the alpha channel (alpha_mask) was kept")
    elif masked is not None and _boolean(masked) and folders:
        imp.set(masked, "loss.masked", True)
        _put(imp.run, "loss.mask_source", "folder")
        for entry in {e.label: e for e in folders}.values():
            imp.record(entry, "loss.mask_folder", "masks")
        imp.notes.append("loss.masked reads each image's mask from masks/ inside its image folder (same name): copy "
                         "every conditioning_data_dir's images into masks/ of its subset's folder.")
    elif masked is not None and _boolean(masked):
        imp.skip(masked, "nothing lost: kohya's masked_loss masks nothing without alpha_mask or conditioning_data_dir")


def _in_layers(subset: _Subset, key: str) -> list[Entry]:
    """The subset's entries for `key`, most specific first (the main config spells some keys differently)."""
    names = [key, key, key, MAIN_NAME.get(key, key)]
    return [layer[name] for layer, name in zip(subset.layers, names) if name in layer]


def _layered(subset: _Subset, key: str) -> Entry | None:
    """The entry sd-scripts would use for `key` in this subset: the most specific layer that sets it."""
    return next((entry for entry in _in_layers(subset, key) if not _unset(entry.value)), None)


def _map_dataset_setting(imp: _Importer, subsets: list[_Subset], key: str, dotted: str) -> None:
    """One run-level setting from per-subset values: carried over when every subset agrees on it."""
    convert = _SETTING_CONVERTERS.get(key, _boolean)
    chosen = [_layered(s, key) for s in subsets]
    present = {e.label: e for subset in subsets for e in _in_layers(subset, key)}
    used = {e.label: e for e in chosen if e is not None}
    values = [convert(e) if e is not None else DATASET_DEFAULTS.get(key) for e in chosen]
    distinct = list(dict.fromkeys(json.dumps(v) for v in values))
    if not used:
        imp.kohya_default(key, dotted)
    elif len(distinct) == 1:
        value, approximate = _fit(key, values[0])
        for entry in used.values():
            imp.set(entry, dotted, value, approximate)
    elif key in FOLDER_SETTINGS and all(s.own.get("image_dir") is not None for s in subsets):
        imp.per_folder.add(key)  # the subsets disagree: each one's value goes to its folder
        return
    else:
        shown = ", ".join(distinct)
        for entry in used.values():
            imp.skip(entry, f"the subsets disagree ({shown}); lorabake applies one {dotted} to the whole run, "
                            "left at its default: set it in the run file")
    for label, entry in present.items():
        if label not in used and label not in imp.handled:
            imp.skip(entry, "nothing lost: empty, not set in kohya" if _unset(entry.value)
                     else "nothing lost: every subset takes this from a more specific table")


def _fit(key: str, value: Any) -> tuple[Any, str | None]:
    """lorabake's latents are 1/8 of the image, so it wants resolutions in multiples of 8; kohya resizes."""
    if key != "resolution":
        return value, None
    sides = [value] if isinstance(value, int) else value
    fitted = [max(64, side - side % 8) for side in sides]
    if fitted == sides:
        return value, None
    return (fitted[0] if len(fitted) == 1 else fitted), f"rounded down to multiples of 8: {fitted}"


def _caption_extension(entry: Entry) -> str:
    value = _text(entry)
    return value if value.startswith(".") else f".{value}"


_SETTING_CONVERTERS: dict[str, Callable[[Entry], Any]] = {
    "resolution": _resolution, "batch_size": _integer, "min_bucket_reso": _integer, "max_bucket_reso": _integer,
    "bucket_reso_steps": _integer, "caption_extension": _caption_extension, "keep_tokens": _integer,
    "caption_separator": _text, "caption_dropout_rate": _number, "caption_dropout_every_n_epochs": _integer,
    "caption_tag_dropout_rate": _number,
}


def _concept(image_dir: str) -> str:
    """The folder's name without a kohya `<repeats>_` prefix."""
    last = re.split(r"[\\/]", image_dir.strip().rstrip("\\/"))[-1]
    match = re.fullmatch(r"\d+_(.+)", last)
    return match.group(1) if match else last


# Subset settings lorabake keeps per folder (datasets.<ds>.folders.<folder>.<key>): the prefix and
# suffix always, keep_tokens, shuffle and flip when the subsets disagree on them (imp.per_folder).
FOLDER_SETTINGS = {"keep_tokens": ("keep_tokens", _integer), "shuffle_caption": ("shuffle", _boolean),
                   "flip_aug": ("flip", _boolean)}
FOLDER_KEYS = {"caption_prefix": ("caption_prefix", _text), "caption_suffix": ("caption_suffix", _text),
               **FOLDER_SETTINGS}


def _map_folder_settings(imp: _Importer, subset: _Subset, plan: FolderPlan) -> None:
    """The subset's own prefix/suffix (and disputed keep_tokens/shuffle) on its folder; an entry of a
    shared layer ([general], the dataset's table) goes to every folder that inherits it."""
    folder = plan.target.removeprefix(f"datasets/{plan.dataset}/")
    for key in sorted(imp.per_folder):
        name, convert = FOLDER_KEYS[key]
        entry = _layered(subset, key)
        if entry is None:
            continue
        value = convert(entry)
        imp.datasets[plan.dataset].setdefault("folders", {}).setdefault(folder, {})[name] = value
        imp.record(entry, f"datasets.{plan.dataset}.folders.{folder}.{name}", value)


def _plan_subset_folders(imp: _Importer, subsets: list[_Subset], names: list[str]) -> None:
    for subset in subsets:
        image_dir = subset.own.get("image_dir")
        if image_dir is None or _unset(image_dir.value):
            if "metadata_file" in subset.own:
                imp.skip(subset.own["metadata_file"], "fine-tuning datasets (captions in a metadata JSON) are not "
                         "supported: lorabake reads <repeats>_<concept>/ folders with caption files beside the images")
            continue
        repeats, tokens = _layered(subset, "num_repeats"), _layered(subset, "class_tokens")
        is_reg = subset.own.get("is_reg")
        plan = FolderPlan(names[subset.dataset], _text(image_dir),
                          _integer(repeats) if repeats else 1,  # sd-scripts' default num_repeats
                          _text(tokens) if tokens else _concept(_text(image_dir)),
                          bool(is_reg and _boolean(is_reg)))
        imp.folders.append(plan)
        imp.record(image_dir, "folder", plan.target)
        _map_folder_settings(imp, subset, plan)
        for entry, what in ((repeats, "<repeats> of"), (tokens, "<concept> of")):
            if entry is not None:
                imp.record(entry, f"{what} {plan.target}", entry.value)
        if is_reg is not None and plan.is_reg:
            imp.record(is_reg, "reg/ folder", plan.target)
        elif is_reg is not None:
            imp.skip(is_reg, "nothing lost: off in kohya")


def _local_dir(text: str, base_dir: Path) -> Path | None:
    """A kohya path as a folder on this machine: as given, or relative to the config's folder."""
    for candidate in (Path(text), base_dir / text):
        if candidate.is_dir():
            return candidate
    return None


def _plan_kohya_folders(imp: _Importer, dataset: str, base_dir: Path) -> None:
    """train_data_dir / reg_data_dir are parents of kohya's <repeats>_<concept> folders already."""
    for key, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
        entry = imp.take(key)
        if entry is None:
            if not is_reg:
                imp.notes.append(f"The config names no train_data_dir: put the images into datasets/{dataset}/"
                                 "<repeats>_<concept>/ folders.")
            continue
        where = f"datasets/{dataset}/reg/" if is_reg else f"datasets/{dataset}/"
        imp.record(entry, f"datasets.{dataset}.path" if not is_reg else where, where)
        folder = _local_dir(_text(entry), base_dir)
        if folder is None:
            imp.notes.append(f"{key} {_text(entry)} is not on this machine: copy its <repeats>_<concept> folders "
                             f"into {where}")
            continue
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            match = re.fullmatch(r"(\d+)_(.+)", sub.name)
            if match:
                imp.folders.append(FolderPlan(dataset, str(sub), int(match.group(1)), match.group(2), is_reg))
            else:
                imp.notes.append(f"{sub}: kohya skips folders without a <repeats>_ prefix; so does this import")
