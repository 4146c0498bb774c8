"""Reading the files: a kohya_ss GUI JSON or sd-scripts TOML as entries under sd-scripts' names, an
sd-scripts dataset TOML as layered subsets, and finding a file a config names on this machine.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabake.kohya.bookkeeping import _Importer
from lorabake.kohya.values import Entry, KohyaImportError
from lorabake.kohya.vocabulary import GUI_NAMES, GUI_ONLY_KEYS, KOHYA_TELLTALES, NETWORK_KEYS, SD_SCRIPTS_NAMES


def _parse(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KohyaImportError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KohyaImportError(f"{path}: not a text file (expected kohya JSON or TOML)") from None
    suffix = path.suffix.lower()
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text) if suffix == ".toml" else None
    except json.JSONDecodeError as e:
        raise KohyaImportError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except tomllib.TOMLDecodeError as e:
        raise KohyaImportError(f"{path}: not valid TOML ({e})") from None
    if data is None:
        raise KohyaImportError(f"{path}: expected a kohya_ss GUI config (.json) or an sd-scripts config (.toml)")
    if not isinstance(data, dict):
        raise KohyaImportError(f"{path}: the top level must be an object of settings, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> _Importer:
    """The main config as entries under sd-scripts' names (the label keeps the file's own key)."""
    # sd-scripts' read_config_from_file flattens one level of tables away; kohya_ss's TOML settings too
    data = {k: v for key, value in _parse(path).items()
            for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}
    flavor = "gui" if any(key in data for key in GUI_ONLY_KEYS) else "sd-scripts"
    if not any(key in data for key in KOHYA_TELLTALES):
        raise KohyaImportError(f"{path}: does not look like a kohya config: it has none of "
                               f"{', '.join(KOHYA_TELLTALES)}")
    if not any(key in data for key in NETWORK_KEYS):
        raise KohyaImportError(f"{path}: not a LoRA config (it has none of {', '.join(NETWORK_KEYS)}): a DreamBooth, "
                               "fine-tuning or textual-inversion config? lorabake trains LoRA / LyCORIS networks; "
                               "import the config of kohya_ss's LoRA tab or of train_network.py")
    family = next((key for key, value in data.items() if key.endswith("_checkbox") and value is True), None)
    if family is not None:
        raise KohyaImportError(f"{path}: {family} is on: that model family is not one lorabake trains (SD1, SD2, SDXL)")
    renames = GUI_NAMES if flavor == "gui" else SD_SCRIPTS_NAMES
    entries: dict[str, Entry] = {}
    for key, value in data.items():
        name = renames.get(key, key)
        entries[key if name in entries else name] = Entry(key, value, path)
    return _Importer(entries, flavor)


@dataclass
class _Subset:
    """One sd-scripts subset: its layers, most specific first (subset, dataset, general, main config)."""

    dataset: int
    layers: list[dict[str, Entry]]
    own: dict[str, Entry]


def _table_entries(table: dict[str, Any], prefix: str, path: Path, skip: str = "") -> dict[str, Entry]:
    return {key: Entry(f"{prefix}{key}", value, path) for key, value in table.items() if key != skip}


def _read_dataset_toml(path: Path, main: dict[str, Entry]) -> list[_Subset]:
    data = _parse(path)
    if path.suffix.lower() != ".toml":
        raise KohyaImportError(f"{path}: a dataset config is a TOML file (sd-scripts --dataset_config)")
    general = data.get("general", {})
    datasets = data.get("datasets")
    if not isinstance(general, dict):
        raise KohyaImportError(f"{path}: general: must be a table ([general])")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise KohyaImportError(f"{path}: datasets: needs at least one [[datasets]] table")
    general_layer = _table_entries(general, "general.", path)
    subsets = []
    for i, dataset in enumerate(datasets):
        members = dataset.get("subsets")
        if not isinstance(members, list) or not members or not all(isinstance(s, dict) for s in members):
            raise KohyaImportError(f"{path}: datasets[{i}].subsets: needs at least one [[datasets.subsets]] table")
        dataset_layer = _table_entries(dataset, f"datasets[{i}].", path, skip="subsets")
        for j, subset in enumerate(members):
            own = _table_entries(subset, f"datasets[{i}].subsets[{j}].", path)
            subsets.append(_Subset(i, [own, dataset_layer, general_layer, main], own))
    return subsets


def _all_dataset_entries(subsets: list[_Subset]) -> dict[str, Entry]:
    """Every entry of the dataset TOML (the main-config layer left out), by label."""
    return {e.label: e for subset in subsets for layer in subset.layers[:3] for e in layer.values()}


def _existing_file(text: str, base_dir: Path) -> Path | None:
    """`text` as a file on this machine (as given, or relative to the config), if it names one."""
    for candidate in (Path(text), base_dir / text):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # prompt text, not a path: a name too long for the file system
            return None
    return None
