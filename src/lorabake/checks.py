"""Checks that open files a config names, before any job runs: each path base's header (or its
folder's configs and component headers), pickles without the opt-in, each run's
`network.init_weights`, and the options that depend on the base's architecture.

Above the config floor (it reads checkpoint headers through lorabake.models.keys, still without
torch); `Workspace.load` runs it after `project.load_project`, so the Snakefile's parse and
`lorabake validate` refuse a bad file with the key that names it.
"""
from __future__ import annotations

from pathlib import Path

from lorabake import block_weights as lbw
from lorabake.config import BUILTIN_ARCHITECTURES, SCORED_BUILTINS, ConfigError
from lorabake.models import keys
from lorabake.models.keys import PICKLE_SUFFIXES, HeaderError
from lorabake.project import Project
from lorabake.unet_blocks import block_list_problem


def check_project(project: Project) -> Project:
    """`project` itself, or one ConfigError listing every problem found in the files it names."""
    f, problems, architectures = project.file, [], {}
    for name in sorted(f.bases):
        base_problems, architectures[name] = _check_base(project, name)
        problems += base_problems
    for name, run in project.runs.items():
        problems += _check_init_weights(project, name)
        problems += [f"{project.run_files[name]}: {p} (base {run.base} is {architectures[run.base]})"
                     for p in run.unsupported_on(architectures.get(run.base, ""))]
    for name, merge in f.merges.items():
        arch = architectures.get(merge.base, "")
        for j, lora in enumerate(merge.loras):
            problem = block_list_problem(lora.block_weights, f"merges.{name}.loras.{j}.block_weights", arch)
            if problem:
                problems.append(f"{project.config_file}: {problem} (base {merge.base})")
    problems += _check_concept(project)
    problems += _check_comparisons(project, architectures)
    if problems:
        raise ConfigError("\n".join(problems))
    return project


def _check_comparisons(project: Project, architectures: dict[str, str]) -> list[str]:
    """Block weights must be in the vocabulary of each base they are applied on (SD1/SD2's or SDXL's),
    and every base a run is rendered on must be the run's architecture (its LoRA keys must fit)."""
    problems = []
    for name, comparison in project.file.comparisons.items():
        runs = project.comparison_runs(name)
        for run in runs:
            own = project.runs[run].base
            for base in comparison.bases or [own]:
                arch, run_arch = architectures.get(base, ""), architectures.get(own, "")
                for value in (comparison.block_weights or []) if arch else []:
                    try:
                        lbw.resolve(value, arch)
                    except ValueError as error:
                        problems.append(f"{project.config_file}: comparisons.{name}.block_weights: {error} "
                                        f"(base {base} is {arch})")
                if arch and run_arch and arch != run_arch:
                    problems.append(f"{project.config_file}: comparisons.{name}.bases: run {run} trained on {own} "
                                    f"({run_arch}); its LoRA does not fit {base} ({arch})")
    return sorted(set(problems))


def _check_concept(project: Project) -> list[str]:
    """`samples.concept` and each comparison's `concept` must be a word the scorer knows; for samples,
    some run's base must have a scorer."""
    f = project.file
    given = [("samples.concept", f.samples.concept if f.samples else None)]
    given += [(f"comparisons.{name}.concept", c.concept) for name, c in f.comparisons.items()]
    given = [(key, concept) for key, concept in given if concept is not None]
    if not given:
        return []
    from lorabake.models import toy_world

    words = toy_world.concept_words()
    problems = [f"{project.config_file}: {key}: {concept!r} is not a concept the scorer knows; give one of "
                f"{', '.join(words)}" for key, concept in given if concept not in words]
    if (f.samples and f.samples.concept and project.runs
            and not any(f.bases[run.base].builtin in SCORED_BUILTINS for run in project.runs.values())):
        problems.append(f"{project.config_file}: samples.concept: no run's base has a concept scorer (builtins with "
                        f"one: {', '.join(SCORED_BUILTINS)}); remove the key or train on such a base")
    return problems


def _check_base(project: Project, name: str) -> tuple[list[str], str]:
    """(problems, architecture) of a base: a path base must exist, a pickle needs the opt-in, and a
    safetensors file must have a sound header of a Stable Diffusion checkpoint — all before any job."""
    path, spec = project.base_path(name), project.file.bases[name]
    where = f"{project.config_file}: bases.{name}.path"
    if path is not None and not path.exists():
        return [f"{where}: {path} does not exist (a diffusers folder or a .safetensors file; relative paths "
                "start at the project root)"], ""
    if path is not None and path.suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
        return [f"{where}: {path} is a pickled checkpoint, and loading a pickle can run arbitrary code. "
                f"Convert it to .safetensors, or, if you trust its source, set `allow_pickle: true` under "
                f"bases.{name} in {project.config_file.name} (pickles are then read with torch's "
                "restricted loader, which refuses files that need more than tensors)"], ""
    try:
        return [], architecture(project, name)
    except HeaderError as e:
        return [f"{where}: {e}"], ""


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers folder's components (one level down)."""
    return sorted(p for p in folder.glob("*/*.safetensors") if p.is_file())


def architecture(project: Project, name: str) -> str:
    """sd1 | sd2 | sdxl, from the builtin's name, a folder's configs or a checkpoint's header; ""
    for a pickle (only the base_model job can read it). HeaderError when the file is unusable."""
    spec = project.file.bases[name]
    if spec.builtin is not None:
        return BUILTIN_ARCHITECTURES[spec.builtin]
    path = project.base_path(name)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ""
    if path.is_dir():
        for weights in _weight_files(path):
            keys.read_header(weights)
        return keys.folder_architecture(path)
    arch = keys.architecture_of(keys.read_header(path).shapes)
    if arch is None:
        raise HeaderError(f"{path}: not a Stable Diffusion 1/2/XL checkpoint in the original single-file "
                          f"layout (looked for keys starting with {keys.describe_markers()}); "
                          "a diffusers folder can be given as `path:` instead")
    return arch


def _check_init_weights(project: Project, run: str) -> list[str]:
    """network.init_weights must be a kohya-keyed safetensors network file whose ranks fit the run."""
    network, where = project.runs[run].network, f"{project.run_files[run]}: network.init_weights"
    if network.init_weights is None:
        return []
    path = project.root / network.init_weights
    if not path.is_file():
        return [f"{where}: file {path} does not exist (paths are relative to the project root)"]
    if path.suffix.lower() != ".safetensors":
        return [f"{where}: {path} is not a .safetensors file; a LoRA to continue from is read with safetensors "
                "only (convert a pickled one first)"]
    try:
        shapes = keys.read_header(path).shapes
    except HeaderError as e:
        return [f"{where}: {e}"]
    foreign = sorted(k for k in shapes if not k.startswith(keys.NETWORK_PREFIXES))
    if not shapes or foreign:
        return [f"{where}: {path} is not a LoRA/LyCORIS file in kohya's key layout (keys "
                f"{', '.join(keys.NETWORK_PREFIXES)}…); e.g. {foreign[:3] or 'no keys at all'}"]
    if network.algo in ("lora", "locon") and network.block_dims is None:
        allowed = {network.dim, network.conv_dim or network.dim}
        ranks = sorted({shape[0] for key, shape in shapes.items() if key.endswith(".lora_down.weight")})
        if not ranks or not set(ranks) <= allowed:
            return [f"{where}: {path} has ranks {ranks or 'none (no lora_down weights)'}, but this run trains "
                    f"algo {network.algo} with dim {network.dim}" + (f", conv_dim {network.conv_dim}" if network.conv_dim else "")
                    + ": set network.dim (and conv_dim) to the file's, or start without init_weights"]
    return []
