"""The project config: YAML in, validated pydantic models out, before any job runs.

`configs/config.yaml` holds `bases`, `datasets`, `defaults` (merged under every run), `samples`,
`merges` and `extracts`; each `configs/runs/<name>.yaml` is one run (defaults ⊕ file). Field names
follow kohya's vocabulary. Unknown keys are refused, and every error names the file and key path.
"""
from __future__ import annotations

import copy
import inspect
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorabake.buckets import BucketSpec

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- project-level entries

class BaseSpec(Strict):
    """A base model. Only the embedded tiny model exists so far; checkpoints by path come later."""

    builtin: Literal["tiny-sd"]


class DatasetSpec(Strict):
    path: str = Field(description="dataset folder, relative to the project root")


# ---------------------------------------------------------------- one training run

class Buckets(Strict):
    enabled: bool = True
    min: int = Field(256, ge=64)
    max: int = Field(1024, ge=64)
    step: int = Field(64, ge=8)
    no_upscale: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Buckets":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        if self.step % 8:
            raise ValueError(f"step ({self.step}) must be a multiple of 8 (latents are 1/8 of the image)")
        return self


class Network(Strict):
    algo: Literal["lora"] = "lora"
    dim: int = Field(8, ge=1)
    alpha: float = Field(1.0, gt=0)
    train_unet: bool = True
    train_text_encoder: bool = True

    @model_validator(mode="after")
    def _something_to_train(self) -> "Network":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet and train_text_encoder are both false: nothing would be trained")
        if self.alpha > self.dim:
            warnings.warn(
                f"network.alpha ({self.alpha:g}) > network.dim ({self.dim}): the LoRA update is scaled "
                f"up by {self.alpha / self.dim:g}, which usually makes training unstable",
                stacklevel=2,
            )
        return self


def _adamw_arguments() -> set[str]:
    import torch

    return set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "lr"}


class Optimizer(Strict):
    type: Literal["adamw"] = "adamw"
    lr: float = Field(1.0e-4, gt=0)
    unet_lr: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0)
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _known_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(args) - _adamw_arguments())
        if unknown:
            raise ValueError(f"unknown AdamW argument(s) {unknown}; known: {sorted(_adamw_arguments())}")
        return args


class Scheduler(Strict):
    type: Literal["constant", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of total steps")


class Training(Strict):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    seed: int = 42


class Captions(Strict):
    extension: str = ".txt"

    @field_validator("extension")
    @classmethod
    def _dotted(cls, extension: str) -> str:
        if not extension.startswith(".") or "/" in extension:
            raise ValueError(f"extension must look like '.txt', got {extension!r}")
        return extension


class Augment(Strict):
    flip: bool = False


class Save(Strict):
    every_n_epochs: int | None = Field(1, ge=1)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class RunConfig(Strict):
    base: str = "tiny"
    datasets: list[str] = Field(min_length=1)
    resolution: int | tuple[int, int] = 512
    buckets: Buckets = Buckets()
    network: Network = Network()
    optimizer: Optimizer = Optimizer()
    scheduler: Scheduler = Scheduler()
    training: Training = Training()
    captions: Captions = Captions()
    augment: Augment = Augment()
    save: Save = Save()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, resolution: int | tuple[int, int]) -> int | tuple[int, int]:
        for side in (resolution,) if isinstance(resolution, int) else resolution:
            if side < 64 or side % 8:
                raise ValueError(f"resolution sides must be multiples of 8 and >= 64, got {resolution}")
        return resolution

    @property
    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    def bucket_spec(self) -> BucketSpec:
        b = self.buckets
        return BucketSpec(self.size, b.enabled, b.min, b.max, b.step, b.no_upscale)


# ---------------------------------------------------------------- samples, merges, extracts

class Samples(Strict):
    prompts: list[str] = Field(min_length=1, description="kohya syntax: prompt --n neg --w --h --d seed --l cfg --s steps")
    strengths: list[float] = Field([0.0, 0.5, 1.0], min_length=1)
    sampler: Literal["euler_a", "euler", "ddim"] = "euler_a"
    steps: int = Field(20, ge=1)
    cfg: float = 7.5
    seed: int = 42


class MergeLora(Strict):
    run: str
    ratio: float = 1.0


class Merge(Strict):
    name: str
    base: str = "tiny"
    loras: list[MergeLora] = Field(min_length=1)
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"


class Extract(Strict):
    name: str
    tuned: str = Field(description="name of a merge whose checkpoint is the tuned model")
    base: str = "tiny"
    dim: int = Field(8, ge=1)
    conv_dim: int | None = Field(None, ge=1)
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"


class ProjectFile(Strict):
    bases: dict[str, BaseSpec]
    datasets: dict[str, DatasetSpec]
    defaults: dict[str, Any] = Field(default_factory=dict)
    samples: Samples | None = None
    merges: list[Merge] = Field(default_factory=list)
    extracts: list[Extract] = Field(default_factory=list)
    trainer_version: int = Field(1, description="bump by hand when training semantics change")


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

    def runs_using(self, dataset: str) -> list[str]:
        return [name for name, run in self.runs.items() if dataset in run.datasets]


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
    return data


def _has_key(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


Source = tuple[Path, dict[str, Any], str]  # file, the data it contributed, key prefix inside it


def format_errors(error: ValidationError, sources: list[Source]) -> str:
    """One line per problem: the file it came from, the dotted key path there, and pydantic's message.
    The first source that spells the key is blamed (a run file before the defaults under it)."""
    lines = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        path, _, prefix = next((s for s in sources if _has_key(s[1], loc)), sources[0])
        key = ".".join(str(part) for part in loc) or "(top level)"
        lines.append(f"{path}: {prefix}{key}: {problem['msg']}")
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
        if not NAME_PATTERN.match(name):
            raise ConfigError(f"{run_file}: run names may use letters, digits, '_', '-', '.' only")
        run_raw = read_yaml(run_file)
        merged = deep_merge(project_file.defaults, run_raw)
        sources = [(run_file, run_raw, ""), (config_file, project_file.defaults, "defaults.")]
        runs[name], run_notes = _validated(RunConfig, merged, sources)
        run_files[name] = run_file
        notes += run_notes
    project = Project(root=root, config_file=config_file, file=project_file, runs=runs,
                      run_files=run_files, warnings=tuple(notes))
    check_references(project)
    return project


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
    merge_names = [m.name for m in f.merges]
    for i, merge in enumerate(f.merges):
        problems += _check_name(project, f"merges.{i}.name", merge.name)
        if merge.base not in f.bases:
            problems.append(f"{project.config_file}: merges.{i}.base: '{merge.base}' is not a key of bases")
        for j, lora in enumerate(merge.loras):
            if lora.run not in project.runs:
                problems.append(f"{project.config_file}: merges.{i}.loras.{j}.run: no run named '{lora.run}' in {project.config_file.parent / 'runs'}")
    for i, extract in enumerate(f.extracts):
        problems += _check_name(project, f"extracts.{i}.name", extract.name)
        if extract.tuned not in merge_names:
            problems.append(f"{project.config_file}: extracts.{i}.tuned: '{extract.tuned}' is not the name of a merge ({merge_names})")
        if extract.base not in f.bases:
            problems.append(f"{project.config_file}: extracts.{i}.base: '{extract.base}' is not a key of bases")
    for kind, names in (("merges", merge_names), ("extracts", [e.name for e in f.extracts])):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            problems.append(f"{project.config_file}: {kind}: names used twice: {duplicated}")
    if problems:
        raise ConfigError("\n".join(problems))


def _check_name(project: Project, key: str, name: str) -> list[str]:
    if NAME_PATTERN.match(name):
        return []
    return [f"{project.config_file}: {key}: '{name}' may use letters, digits, '_', '-', '.' only (it becomes a file name)"]
