"""The import: `import_kohya` reads the kohya config (and its dataset TOML), maps it section by section
into a lorabake run and validates that run (the overview is in lorabake.kohya).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lorabake.config import RunConfig
from lorabake.kohya.bases import _entry_name, _map_model, _run_name
from lorabake.kohya.bookkeeping import KohyaImport, _Importer
from lorabake.kohya.datasets import _map_datasets
from lorabake.kohya.network import _map_network
from lorabake.kohya.optimizer import _map_optimizer, _map_schedule
from lorabake.kohya.readers import _all_dataset_entries, _existing_file, _read_config, _read_dataset_toml, _Subset
from lorabake.kohya.training import (_map_attention, _map_duration, _map_noise, _map_samples, _map_simple,
                                     _map_stop_text_encoder)
from lorabake.kohya.values import KohyaImportError, _text


def _dataset_config(imp: _Importer, config: Path, given: Path | None) -> Path | None:
    """The dataset TOML: the one given, else the config's dataset_config when it exists here."""
    entry = imp.take("dataset_config")
    if given is not None:
        if entry is not None:
            imp.skip(entry, f"nothing lost: replaced by the dataset config given to the import ({given})")
        return Path(given)
    if entry is None:
        return None
    found = _existing_file(_text(entry), config.parent)
    if found is None:
        imp.skip(entry, "the file is not on this machine: pass it with --dataset")
        return None
    imp.record(entry, "datasets, folders and per-dataset settings (read with it)", str(found))
    return found


def _ordered(data: dict[str, Any], model: Any = RunConfig) -> dict[str, Any]:
    """Keys in the order the config models declare them (the order docs/options.md lists them in)."""
    ordered = {}
    for key, info in model.model_fields.items():
        if key in data:
            nested = isinstance(data[key], dict) and hasattr(info.annotation, "model_fields")
            ordered[key] = _ordered(data[key], info.annotation) if nested else data[key]
    return ordered


def _validated(imp: _Importer, config: Path) -> dict[str, Any]:
    """The run, validated; a carried-over value lorabake refuses is taken out and reported instead."""
    while True:
        run = _ordered(imp.run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                RunConfig.model_validate(run)
            except ValidationError as e:
                if not _drop_refused(imp, e):
                    problems = "\n".join(f"  {'.'.join(map(str, p['loc'])) or 'run'}: {p['msg']}" for p in e.errors())
                    raise KohyaImportError(f"{config}: the imported settings are not a valid lorabake run (kohya "
                                           f"may have refused them too):\n{problems}") from None
                continue
        imp.notes += [f"lorabake warns: {w.message}" for w in caught]
        return run


def _drop_refused(imp: _Importer, error: ValidationError) -> bool:
    """Take each refused single value out of the run and report it; False when a problem names no value
    (a check across fields), which the user has to settle."""
    dropped = False
    for problem in error.errors():
        parts = [str(part) for part in problem["loc"] if isinstance(part, str)]
        parent = imp.run
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not parts or not isinstance(parent, dict) or isinstance(parent.get(parts[-1]), dict) or parts[-1] not in parent:
            return False
        dotted, value = ".".join(parts), parent.pop(parts[-1])
        rows = [row for row in imp.mapped if row[1] == dotted]
        imp.mapped = [row for row in imp.mapped if row[1] != dotted]
        for label, _, _ in rows or [(dotted, dotted, value)]:
            imp.unmapped.append((label, value, f"lorabake refuses {value!r} for {dotted} ({problem['msg']}): "
                                               "lorabake's default applies"))
        dropped = True
    return dropped


def import_kohya(config: Path, dataset_toml: Path | None = None, *, name: str | None = None) -> KohyaImport:
    """Read a kohya_ss GUI JSON or sd-scripts TOML (and optionally a dataset TOML) into a lorabake run."""
    config = Path(config)
    imp = _read_config(config)
    imp.name = _run_name(imp, config)
    imp.name = _entry_name(name, imp.name) if name else imp.name
    dataset_path = _dataset_config(imp, config, dataset_toml)
    main_layer = imp.entries
    subsets = _read_dataset_toml(dataset_path, main_layer) if dataset_path else [_Subset(0, [{}, {}, {}, main_layer], {})]
    if dataset_path:
        imp.entries = {**main_layer, **_all_dataset_entries(subsets)}
    _map_model(imp)
    _map_datasets(imp, subsets, config.parent, dataset_path is not None)
    _map_network(imp)
    _map_duration(imp)
    _map_optimizer(imp)
    _map_schedule(imp)
    _map_simple(imp)
    _map_attention(imp)
    _map_noise(imp)
    _map_stop_text_encoder(imp)
    _map_samples(imp, config.parent)
    imp.finish()
    run = _validated(imp, config)
    sources = (config,) + ((dataset_path,) if dataset_path else ())
    return KohyaImport(run, imp.bases, imp.datasets, imp.unmapped, imp.notes, imp.mapped, imp.folders, imp.samples,
                       imp.name, sources)
