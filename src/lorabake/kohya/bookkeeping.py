"""The bookkeeping of one import: the input entries, which of them are handled, the run being built,
and what the import returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorabake.config import RunConfig
from lorabake.kohya.values import Entry, _off, _unset
from lorabake.kohya.vocabulary import (LORABAKE_BEHAVIOUR, NOT_CARRIED, OTHER_FAMILY_PREFIXES, SD_SCRIPTS_DEFAULTS,
                                       SPECIFIC_REASONS)


@dataclass(frozen=True)
class FolderPlan:
    """One kohya image folder and where lorabake wants it: datasets/<dataset>/[reg/]<repeats>_<concept>/."""

    dataset: str
    source: str
    repeats: int
    concept: str
    is_reg: bool = False

    @property
    def target(self) -> str:
        return f"datasets/{self.dataset}/{'reg/' if self.is_reg else ''}{self.repeats}_{self.concept}"


@dataclass
class KohyaImport:
    run: dict[str, Any]  # ready to dump as configs/runs/<name>.yaml
    bases: dict[str, dict[str, Any]]  # suggested configs/config.yaml `bases` entries
    datasets: dict[str, dict[str, Any]]  # suggested configs/config.yaml `datasets` entries
    unmapped: list[tuple[str, Any, str]]  # (kohya key, value, why it is not, or only approximately, carried over)
    notes: list[str]
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)  # (kohya key, lorabake key, value)
    folders: list[FolderPlan] = field(default_factory=list)
    samples: dict[str, Any] | None = None  # a suggested configs/config.yaml `samples` entry
    name: str = "imported"
    sources: tuple[Path, ...] = ()


class _Importer:
    """The input entries, which of them are handled, and the run being built."""

    def __init__(self, entries: dict[str, Entry], flavor: str):
        self.entries = entries  # canonical (sd-scripts) name → entry
        self.flavor = flavor  # "gui" or "sd-scripts"
        self.handled: set[str] = set()  # labels
        self.run: dict[str, Any] = {}
        self.mapped: list[tuple[str, str, Any]] = []
        self.unmapped: list[tuple[str, Any, str]] = []
        self.notes: list[str] = []
        self.bases: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.folders: list[FolderPlan] = []
        self.per_folder: set[str] = {"caption_prefix", "caption_suffix"}  # subset keys kept per folder
        self.samples: dict[str, Any] | None = None
        self.total_steps: int | None = None
        self.name = "imported"

    def take(self, name: str) -> Entry | None:
        """The entry for `name`, now handled; None when absent or empty (an empty one is reported)."""
        entry = self.entries.get(name)
        if entry is None or entry.label in self.handled:
            return None
        self.handled.add(entry.label)
        if _unset(entry.value):
            self.unmapped.append((entry.label, entry.value, "nothing lost: empty, not set in kohya"))
            return None
        return entry

    def take_set(self, name: str, convert: Callable[[Entry], Any]) -> tuple[Entry, Any] | None:
        """Like take, for keys where kohya reads 0 as "not set"."""
        entry = self.take(name)
        if entry is None:
            return None
        value = convert(entry)
        if not value:
            self.skip(entry, "nothing lost: 0, not set in kohya")
            return None
        return entry, value

    def value(self, name: str) -> Any:
        """The raw value of a key without handling it (for decisions that depend on it)."""
        entry = self.entries.get(name)
        return None if entry is None or _unset(entry.value) else entry.value

    def set(self, entry: Entry, dotted: str, value: Any, approximate: str | None = None) -> None:
        _put(self.run, dotted, value)
        self.record(entry, dotted, value, approximate)

    def record(self, entry: Entry, lorabake_key: str, value: Any, approximate: str | None = None) -> None:
        self.handled.add(entry.label)
        self.mapped.append((entry.label, lorabake_key, value))
        if approximate:
            self.unmapped.append((entry.label, entry.value, f"approximate: {approximate}"))

    def skip(self, entry: Entry, reason: str) -> None:
        self.handled.add(entry.label)
        self.unmapped.append((entry.label, entry.value, reason))

    def kohya_default(self, key: str, dotted: str) -> None:
        """A key the TOML leaves out, or either file leaves empty (kohya_ss does not pass empty values):
        sd-scripts' default, written where lorabake's default differs."""
        entry = self.entries.get(key)
        absent = entry is None and self.flavor == "sd-scripts"
        if key in SD_SCRIPTS_DEFAULTS and (absent or (entry is not None and _unset(entry.value))):
            value = SD_SCRIPTS_DEFAULTS[key]
            if value != _lorabake_default(dotted):
                _put(self.run, dotted, value)
                self.mapped.append((f"{key} (not set: sd-scripts default)", dotted, value))

    def finish(self) -> None:
        """Every entry nothing mapped goes to unmapped with the reason."""
        for entry in self.entries.values():
            if entry.label not in self.handled:
                self.skip(entry, _reason_not_carried(entry.label.rsplit(".", 1)[-1], entry.value))


def _reason_not_carried(key: str, value: Any) -> str:
    if _off(value):
        return "nothing lost: off or empty in kohya"
    if key in LORABAKE_BEHAVIOUR and LORABAKE_BEHAVIOUR[key] == value:
        return "nothing lost: lorabake does the same"
    if key in SPECIFIC_REASONS:
        return SPECIFIC_REASONS[key]
    group = next((reason for reason, keys in NOT_CARRIED.items() if key in keys), None)
    if group is None and key.startswith(OTHER_FAMILY_PREFIXES):
        group = "nothing lost: a setting of another model family (FLUX, SD3, …) or kohya_ss tab, unused by a LoRA here"
    return group or "no lorabake equivalent (an option of another kohya_ss tab or model family, or unknown)"


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _lorabake_default(dotted: str) -> Any:
    model: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf].get_default(call_default_factory=True)
