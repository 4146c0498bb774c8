# Config loading and input functions. All logic lives in the lorabake package; these only ask it.
import os
import sys

from snakemake.exceptions import WorkflowError

from lorabake import paths
from lorabake.config import ConfigError
from lorabake.dataset import DatasetError
from lorabake.workspace import Workspace

# Rules call the `lorabake` command of the Python that runs Snakemake (a venv needs no activation).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

PROJECT = config.get("project", "configs/config.yaml")
LORABAKE = f"lorabake --config {PROJECT}"

try:
    WS = Workspace.load(PROJECT)
    for _ds in WS.project.file.datasets:
        WS.dataset(_ds)  # every dataset is checked before any job runs
    for _run in WS.project.runs:
        WS.run_datasets(_run)
except (ConfigError, DatasetError) as error:
    raise WorkflowError(f"lorabake: {error}") from None
for _warning in WS.project.warnings:
    print(f"lorabake: warning: {_warning}", file=sys.stderr)

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
    targets += [paths.merged(m.name) for m in f.merges]
    targets += [paths.merged_diffusers(m.name) for m in f.merges if m.diffusers]
    targets += [paths.extracted(e.name) for e in f.extracts]
    targets += [paths.resized(r.name) for r in f.resizes]
    targets += [paths.svd_merged(m.name) for m in f.svd_merges]
    return targets


def get_image_digest(wildcards):
    return WS.image_digest(wildcards.ds)


def get_latent_base(wildcards):
    job = WS.latent_jobs.get((wildcards.ds, wildcards.spec))
    if job is None:
        raise WorkflowError(f"no run uses dataset {wildcards.ds} with latent spec {wildcards.spec}")
    return paths.base_json(job.base)


def get_train_inputs(wildcards):
    run = WS.run(wildcards.run)
    inputs = {"base": paths.base_json(run.base), "latents": list(WS.latent_indexes(wildcards.run).values()),
}
    if run.network.init_weights:
        inputs["init_weights"] = run.network.init_weights
    return inputs


def get_train_params(wildcards):
    return WS.train_params(wildcards.run)


def get_report_params(wildcards):
    return WS.report_params(wildcards.ds)


def get_sample_params(wildcards):
    samples = WS.project.file.samples
    return {"samples": samples.model_dump(mode="json"), "size": list(WS.run(wildcards.run).size)}


def get_run_base(wildcards):
    return paths.base_json(WS.run(wildcards.run).base)


def get_merge(wildcards):
    return next(m for m in WS.project.file.merges if m.name == wildcards.name)


def get_merge_inputs(wildcards):
    merge = get_merge(wildcards)
    return {"base": paths.base_json(merge.base), "loras": [paths.run_lora(l.run) for l in merge.loras]}


def get_extract(wildcards):
    return next(e for e in WS.project.file.extracts if e.name == wildcards.name)


def get_extract_inputs(wildcards):
    extract = get_extract(wildcards)
    return {"base": paths.base_json(extract.base), "tuned": get_tuned_checkpoint(extract.tuned)}


def get_tuned_checkpoint(tuned):
    """An extract's tuned model: a merge's checkpoint, or a base's base.json (its weights are there)."""
    if tuned in WS.project.file.bases:
        return paths.base_json(tuned)
    return paths.merged(tuned)


def get_train_threads(wildcards):
    return WS.run(wildcards.run).resources.threads


def get_latent_gpu(wildcards):
    """One GPU for encoding when any run using this cache trains on GPUs; none otherwise."""
    users = [run for run, cfg in WS.project.runs.items()
             if wildcards.ds in cfg.datasets and WS.latent_job(run, wildcards.ds).name == wildcards.spec]
    return min(1, max((WS.run(run).resources.gpu for run in users), default=0))


def get_resize(wildcards):
    return next(r for r in WS.project.file.resizes if r.name == wildcards.name)


def get_svd_merge(wildcards):
    return next(m for m in WS.project.file.svd_merges if m.name == wildcards.name)
