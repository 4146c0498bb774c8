"""A project read from disk: config.yaml and every runs/*.yaml, merged, validated, cross-checked.

Each run is `defaults` ⊕ its file ⊕ its sweep point; every error names the file it came from and
the dotted key path there. Nothing here opens a checkpoint or imports torch: `lorabake.checks`
adds the checks that read files' headers, and `Workspace.load` runs both before any job.
"""
from __future__ import annotations

import copy
import itertools
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lorabake import names
from lorabake.config import ConfigError, RunConfig
from lorabake.project_file import ProjectFile


class Project(BaseModel):
    """Everything the workflow needs, resolved: paths are absolute, runs are merged with defaults."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    root: Path
    config_file: Path
    file: ProjectFile
    runs: dict[str, RunConfig]
    run_files: dict[str, Path]
    warnings: tuple[str, ...] = ()

    def dataset_root(self, name: str) -> Path:
        return self.root / self.file.datasets[name].path

    def base_path(self, name: str) -> Path | None:
        path = self.file.bases[name].path
        return None if path is None else self.root / path

    def runs_using(self, dataset: str) -> list[str]:
        return [name for name, run in self.runs.items() if dataset in run.datasets]

    def comparison_runs(self, name: str) -> list[str]:
        """A comparison's `runs`: each a run name, or a run file's name standing for all its sweep points."""
        runs: list[str] = []
        for entry in self.file.comparisons[name].runs:
            points = [entry] if entry in self.runs else [run for run, file in self.run_files.items() if file.stem == entry]
            runs += [run for run in points if run not in runs]
        return runs


# ---------------------------------------------------------------- loading

def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, recursively for nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    if _expanded_size(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors and aliases "
                          "repeating each other, a 'billion laughs'); a real config holds a few hundred")
    return data


# YAML aliases share one object: a few lines can stand for 10^9 values, which validation and
# merging would walk one by one. Real configs hold a few hundred values; sweeps a few thousand.
MAX_CONFIG_VALUES = 100_000


def _expanded_size(data: Any, cap: int) -> int:
    """How many values `data` holds with every alias expanded, counting no further than past `cap`."""
    count, stack = 0, [data]
    while stack and count <= cap:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            stack += value
    return count


def _spelled(data: Any, loc: tuple) -> tuple[int, bool]:
    """How many leading parts of `loc` the data spells, and whether it ends at a plain value (then
    the rest of `loc` names pydantic's union branches, e.g. `resolution.int`, not keys)."""
    for depth, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return depth, depth > 0 and not isinstance(data, (dict, list))
    return len(loc), True


Source = tuple[Path, dict[str, Any], str]  # file, the data it contributed, key prefix inside it


def format_errors(error: ValidationError, sources: list[Source]) -> str:
    """One line per problem: the file it came from, the dotted key path there, and pydantic's message.
    The source that spells most of the key is blamed, the first of equals (a run file before the
    defaults under it): a bad value written in `defaults` names config.yaml, not a run file."""
    lines = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        is_key = loc[-1:] == ("[key]",)  # a mapping's key was refused, not its value
        if is_key:
            loc = loc[:-2]
        spelled = [_spelled(data, loc) for _, data, _ in sources]
        best = max(range(len(sources)), key=lambda i: (spelled[i][0], -i))
        path, _, prefix = sources[best]
        depth, at_value = spelled[best]
        key = ".".join(str(part) for part in (loc[:depth] if at_value else loc)) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {prefix}{key}: {'key ' if is_key else ''}{message}")
    return "\n".join(lines)


def _validated(model: type[BaseModel], data: dict[str, Any], sources: list[Source]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = model.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_errors(e, sources)) from None
    return value, [f"{sources[0][0]}: {w.message}" for w in caught]


def load_project(config_file: str | Path, runs_dir: str | Path | None = None) -> Project:
    """Read config.yaml and every runs/*.yaml, validate them and check cross-references."""
    config_file = Path(config_file).resolve()
    root = config_file.parent.parent if config_file.parent.name == "configs" else config_file.parent
    runs_dir = Path(runs_dir).resolve() if runs_dir else config_file.parent / "runs"
    raw = read_yaml(config_file)
    project_file, notes = _validated(ProjectFile, raw, [(config_file, raw, "")])
    runs, run_files = {}, {}
    for run_file in sorted(runs_dir.glob("*.yaml")):
        name = run_file.stem
        if names.name_problem(name):
            raise ConfigError(f"{run_file}: the run name (the file's name) {names.name_problem(name)}")
        run_raw = read_yaml(run_file)
        for point_name, point in expand_sweep(name, run_raw, run_file):
            if names.name_problem(point_name):
                raise ConfigError(f"{run_file}: sweep: the run name of a point {names.name_problem(point_name)}; "
                                  "use shorter or plainer values, or split the sweep")
            if point_name in runs:
                raise ConfigError(f"{run_file}: sweep: run name '{point_name}' is also the name of another run")
            merged = deep_merge(deep_merge(project_file.defaults, run_raw), point)
            sources = [(run_file, point, "sweep point "), (run_file, run_raw, ""),
                       (config_file, project_file.defaults, "defaults.")]
            runs[point_name], run_notes = _validated(RunConfig, merged, sources)
            run_files[point_name] = run_file
            notes += run_notes
    project = Project(root=root, config_file=config_file, file=_default_bases(project_file, runs, config_file),
                      runs=runs, run_files=run_files, warnings=tuple(notes))
    check_references(project)
    return project


def _default_bases(f: ProjectFile, runs: dict[str, RunConfig], where: Path) -> ProjectFile:
    """A merge without `base` merges into the base its LoRAs' runs trained on; an extract without one
    compares with the base of the merge it extracts from."""
    problems, merges, extracts = [], {}, {}
    for name, merge in f.merges.items():
        if merge.base is None:
            trained = sorted({runs[lora.run].base for lora in merge.loras if lora.run in runs})
            if len(trained) > 1:
                problems.append(f"{where}: merges.{name}.base: its LoRAs' runs trained on different bases "
                                f"({', '.join(trained)}): say which one to merge into")
            merge = merge.model_copy(update={"base": trained[0] if len(trained) == 1 else None})
        merges[name] = merge
    for name, extract in f.extracts.items():
        if extract.base is None:
            if extract.tuned not in merges:
                problems.append(f"{where}: extracts.{name}.base: required when `tuned` ('{extract.tuned}') is not a "
                                "merge: the key of bases it was fine-tuned from")
            else:
                extract = extract.model_copy(update={"base": merges[extract.tuned].base})
        extracts[name] = extract
    if problems:
        raise ConfigError("\n".join(problems))
    return f.model_copy(update={"merges": merges, "extracts": extracts})


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _name_part(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def expand_sweep(name: str, run_raw: dict[str, Any], run_file: Path) -> list[tuple[str, dict[str, Any]]]:
    """`sweep: {network.dim: [4, 8], optimizer.type: [adamw, prodigy]}` → the cartesian product, one run
    per point, named `{file stem}-{last key part}_{value}-…` (e.g. `style-dim_4-type_prodigy`).
    Without a sweep the file is one run named after the file. `sweep` is removed from run_raw."""
    sweep = run_raw.pop("sweep", None)
    if sweep is None:
        return [(name, {})]
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{run_file}: sweep: must be a mapping of dotted keys to lists of values, "
                          "e.g. {{network.dim: [4, 8]}}")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{run_file}: sweep.{key}: must be a non-empty list of values")
    points = []
    for combo in itertools.product(*sweep.values()):
        point: dict[str, Any] = {}
        for key, value in zip(sweep, combo):
            point = deep_merge(point, _nested(key, value))
        suffix = "-".join(f"{key.rsplit('.', 1)[-1]}_{_name_part(v)}" for key, v in zip(sweep, combo))
        points.append((f"{name}-{suffix}", point))
    return points


def check_references(project: Project) -> None:
    """Names that point at other entries must exist; dataset folders must exist."""
    f = project.file
    problems = []
    for name, path in sorted(f.datasets.items()):
        if not project.dataset_root(name).is_dir():
            problems.append(f"{project.config_file}: datasets.{name}.path: folder {project.dataset_root(name)} does not exist")
    for name, run in project.runs.items():
        where = project.run_files[name]
        if run.base not in f.bases:
            problems.append(f"{where}: base: '{run.base}' is not a key of bases in {project.config_file.name} ({sorted(f.bases)})")
        for ds in run.datasets:
            if ds not in f.datasets:
                problems.append(f"{where}: datasets: '{ds}' is not a key of datasets in {project.config_file.name} ({sorted(f.datasets)})")
    where = project.config_file
    for name, merge in f.merges.items():
        if merge.base is not None and merge.base not in f.bases:  # None: none of its runs exists (below)
            problems.append(f"{where}: merges.{name}.base: '{merge.base}' is not a key of bases")
        for j, lora in enumerate(merge.loras):
            if lora.run not in project.runs:
                problems.append(f"{where}: merges.{name}.loras.{j}.run: no run named '{lora.run}' in {where.parent / 'runs'}")
    for name, extract in f.extracts.items():
        if extract.tuned not in f.merges and extract.tuned not in f.bases:
            problems.append(f"{where}: extracts.{name}.tuned: '{extract.tuned}' is neither a merge "
                            f"({sorted(f.merges)}) nor a key of bases ({sorted(f.bases)})")
        if extract.base is not None and extract.base not in f.bases:
            problems.append(f"{where}: extracts.{name}.base: '{extract.base}' is not a key of bases")
    for kind, entries in (("resizes", f.resizes), ("svd_merges", f.svd_merges), ("emas", f.emas)):
        for name, entry in entries.items():
            runs = [lora.run for lora in entry.loras] if kind == "svd_merges" else [entry.run]
            problems += [f"{where}: {kind}.{name}: no run named '{run}' in {where.parent / 'runs'}"
                         for run in runs if run not in project.runs]
    problems += _comparison_problems(project)
    if problems:
        raise ConfigError("\n".join(problems))


def _comparison_problems(project: Project) -> list[str]:
    f, where, problems = project.file, project.config_file, []
    stems = {file.stem for file in project.run_files.values()}
    for name, comparison in f.comparisons.items():
        problems += [f"{where}: comparisons.{name}.runs: no run or run file named '{run}' in {where.parent / 'runs'}"
                     for run in comparison.runs if run not in project.runs and run not in stems]
        problems += [f"{where}: comparisons.{name}.bases: '{base}' is not a key of bases ({sorted(f.bases)})"
                     for base in comparison.bases or [] if base not in f.bases]
        if f.samples is None:
            problems += [f"{where}: comparisons.{name}.{key}: needed, as there is no samples: section to take it from"
                         for key in ("prompts", "strengths") if getattr(comparison, key) is None]
    return problems
