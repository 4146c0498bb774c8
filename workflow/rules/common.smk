# Config loading and input functions. All logic lives in the lorabake package; these only ask it.
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

from lorabake import paths
from lorabake.config import ConfigError
from lorabake.data.dataset import DatasetError
from lorabake.workspace import Workspace

# `--config project=…` is relative to where snakemake starts (`workdir:` below has not moved yet).
PROJECT = Path(config.get("project", "configs/config.yaml")).resolve()

try:
    WS = Workspace.load(PROJECT)
    for _ds in WS.project.file.datasets:
        WS.dataset(_ds)  # every dataset is checked before any job runs
    for _run in WS.project.runs:
        WS.plan(_run)  # and every run's step count is within bounds
    WS.check_comparisons()
    WS.check_emas()
except (ConfigError, DatasetError) as error:
    raise WorkflowError(f"lorabake: {error}") from None
for _warning in WS.project.warnings:
    print(f"lorabake: warning: {_warning}", file=sys.stderr)


# Jobs run in the project root (the folder above configs/): the rules' relative paths, and the
# results/ of the `lorabake` commands they run, land in that project wherever snakemake starts.
workdir: WS.project.root


# What every rule runs on. With `--sdm conda` (clusters) a job runs in this env and its `lorabake`.
CONDA_ENV = "../envs/lorabake.yaml"


def lorabake_cli():
    """The command every rule's shell starts with: `lorabake --config <project config>`.

    It is a param (a rerun trigger), so it names neither the venv nor the project's location (the
    config is relative to where jobs run, the project root): a copied or moved project, or a new
    venv, does not rebuild. Without conda, the `lorabake` found is the one beside the Python that
    runs Snakemake (a venv needs no activation): its folder goes first on the jobs' PATH.
    """
    settings = workflow.deployment_settings
    if settings is None or DeploymentMethod.CONDA not in settings.deployment_method:
        shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")
    return f"lorabake --config {shlex.quote(os.path.relpath(WS.project.config_file))}"


LORABAKE = lorabake_cli()

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


wildcard_constraints:
    base=NAME,
    ds=NAME,
    spec=NAME,
    run=NAME,
    name=NAME,


def get_all_targets():
    f = WS.project.file
    targets = [paths.base_json(b) for b in sorted({r.base for r in WS.project.runs.values()})]
    targets += [paths.dataset_report(ds) for ds in f.datasets]
    for run in WS.project.runs:
        targets += [paths.run_lora(run), paths.loss_plot(run)]
        if f.samples is not None:
            targets.append(paths.sample_grid(run))
    targets += [paths.merged(name) for name in f.merges]
    targets += [paths.merged_diffusers(name) for name, merge in f.merges.items() if merge.diffusers]
    targets += [paths.extracted(name) for name in f.extracts]
    targets += [paths.resized(name) for name in f.resizes]
    targets += [paths.svd_merged(name) for name in f.svd_merges]
    targets += [paths.posthoc_ema(name) for name in f.emas]
    targets += [paths.comparison_dir(name) for name in f.comparisons]
    return targets


# ---------------------------------------------------------------- bases and datasets
def get_base_params(wildcards):
    return WS.base_params(wildcards.base)


def get_image_digest(wildcards):
    return WS.image_digest(wildcards.ds)


def get_latent_params(wildcards):
    return WS.latent_params(wildcards.ds, wildcards.spec)


def get_report_params(wildcards):
    return WS.report_params(wildcards.ds)


def get_latent_base(wildcards):
    job = WS.latent_jobs.get((wildcards.ds, wildcards.spec))
    if job is None:
        raise WorkflowError(f"no run uses dataset {wildcards.ds} with latent spec {wildcards.spec}")
    return paths.base_json(job.base)


def get_latent_gpu(wildcards):
    """One GPU for encoding when any run using this cache trains on GPUs; none otherwise."""
    users = [run for run, cfg in WS.project.runs.items()
             if wildcards.ds in cfg.datasets and WS.latent_job(run, wildcards.ds).name == wildcards.spec]
    return min(1, max((WS.run(run).resources.gpu for run in users), default=0))


# ---------------------------------------------------------------- training and samples
def get_train_inputs(wildcards):
    run = WS.run(wildcards.run)
    inputs = {"base": paths.base_json(run.base), "latents": list(WS.latent_indexes(wildcards.run).values())}
    if run.network.init_weights:
        inputs["init_weights"] = run.network.init_weights
    return inputs


def get_train_params(wildcards):
    return WS.train_params(wildcards.run)


def get_train_threads(wildcards):
    return WS.run(wildcards.run).resources.threads


def get_train_gpu(wildcards):
    return WS.run(wildcards.run).resources.gpu


def get_train_mem_mb(wildcards):
    return WS.run(wildcards.run).resources.mem_mb


def get_train_runtime(wildcards):
    return WS.run(wildcards.run).resources.runtime


def get_run_base(wildcards):
    return paths.base_json(WS.run(wildcards.run).base)


def get_sample_params(wildcards):
    samples = WS.project.file.samples
    return {"samples": samples.model_dump(mode="json"), "size": list(WS.run(wildcards.run).size)}


def get_sample_gpu(wildcards):
    """Sampling needs one GPU at most, even for a run that trains on several."""
    return min(1, WS.run(wildcards.run).resources.gpu)


def get_comparison_inputs(wildcards):
    """The LoRA files (final and epoch files) of every run compared, and the bases rendered on."""
    return WS.comparison_inputs(wildcards.name)


def get_comparison_params(wildcards):
    return WS.comparison_params(wildcards.name)


def get_comparison_gpu(wildcards):
    return min(1, max(WS.run(run).resources.gpu for run in WS.project.comparison_runs(wildcards.name)))


# ---------------------------------------------------------------- merges, extractions, LoRA tools
def get_merge(wildcards):
    return WS.project.file.merges[wildcards.name]


def get_merge_spec(wildcards):
    return get_merge(wildcards).model_dump(mode="json")


def get_merge_inputs(wildcards):
    merge = get_merge(wildcards)
    return {"base": paths.base_json(merge.base), "loras": [paths.run_lora(l.run) for l in merge.loras]}


def get_extract(wildcards):
    return WS.project.file.extracts[wildcards.name]


def get_extract_spec(wildcards):
    return get_extract(wildcards).model_dump(mode="json")


def get_extract_inputs(wildcards):
    extract = get_extract(wildcards)
    return {"base": paths.base_json(extract.base), "tuned": get_tuned_checkpoint(extract.tuned)}


def get_tuned_checkpoint(tuned):
    """An extract's tuned model: a merge's checkpoint, or a base's base.json (its weights are there)."""
    if tuned in WS.project.file.bases:
        return paths.base_json(tuned)
    return paths.merged(tuned)


def get_resize(wildcards):
    return WS.project.file.resizes[wildcards.name]


def get_resize_spec(wildcards):
    return get_resize(wildcards).model_dump(mode="json")


def get_resize_input(wildcards):
    return paths.run_lora(get_resize(wildcards).run)


def get_svd_merge(wildcards):
    return WS.project.file.svd_merges[wildcards.name]


def get_svd_merge_spec(wildcards):
    return get_svd_merge(wildcards).model_dump(mode="json")


def get_svd_merge_inputs(wildcards):
    return [paths.run_lora(lora.run) for lora in get_svd_merge(wildcards).loras]


def get_ema(wildcards):
    return WS.project.file.emas[wildcards.name]


def get_ema_spec(wildcards):
    """The entry and the epochs it resolves to (`epochs` left out means every file the run keeps)."""
    return {**get_ema(wildcards).model_dump(mode="json"), "epochs": WS.ema_epochs(wildcards.name)}


def get_ema_input(wildcards):
    return paths.epochs_dir(get_ema(wildcards).run)
