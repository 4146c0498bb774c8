"""Artifact paths: the contract of DESIGN's table, in one place for the Snakefile and the CLI.

Every name that goes into a path passes `names.safe_name` here, whatever checked it before: a path
under results/ cannot be steered outside it by a config key. A Snakemake wildcard (`"{run}"`) is
let through as it is, so the rules' `output:` patterns come from the same functions.
"""
from __future__ import annotations

import re

from lorabake import names
from lorabake.data.buckets import BucketSpec

WILDCARD = re.compile(r"\{[A-Za-z_]\w*\}")


def safe_name(name: str) -> str:
    """A checked name, or a Snakemake wildcard placeholder."""
    return name if WILDCARD.fullmatch(name) else names.safe_name(name)

RESULTS = "results"
LOGS = "logs"


def base_dir(base: str) -> str:
    return f"{RESULTS}/base/{safe_name(base)}"


def base_id_cache() -> str:
    """Content hashes of user checkpoints, keyed by (path, size, mtime): a 7 GB file is hashed once."""
    return f"{RESULTS}/cache/base-ids.json"


def base_json(base: str) -> str:
    return f"{base_dir(base)}/base.json"


def scan_cache(dataset: str) -> str:
    """What the parse-time dataset scan remembers per file (lorabake.data.scan_cache)."""
    return f"{RESULTS}/cache/scan/{safe_name(dataset)}.json"


def dataset_dir(dataset: str) -> str:
    return f"{RESULTS}/datasets/{safe_name(dataset)}"


def dataset_report(dataset: str) -> str:
    return f"{dataset_dir(dataset)}/report.json"


def dataset_report_md(dataset: str) -> str:
    return f"{dataset_dir(dataset)}/report.md"


def bucket_plot(dataset: str) -> str:
    return f"{dataset_dir(dataset)}/buckets.png"


def geometry(spec: BucketSpec) -> str:
    """The part of a latent spec that changes the pixels the VAE sees."""
    w, h = spec.resolution
    if not spec.enabled:
        return f"{w}x{h}-fixed"
    if spec.no_upscale:
        return f"{w}x{h}-s{spec.step}-noup"
    return f"{w}x{h}-b{spec.min_size}-{spec.max_size}-s{spec.step}"


def latent_spec(base: str, spec: BucketSpec, flip: bool, mask: str | None = None) -> str:
    """`mask`: the index also names loss masks, from the alpha channel ("alpha") or a mask folder."""
    masks = "" if mask is None else "-alphamask" if mask == "alpha" else f"-mask-{re.sub(r'[^A-Za-z0-9_.-]', '-', mask)}"
    return f"{base}-{geometry(spec)}" + ("-flip" if flip else "") + masks


def latent_index(dataset: str, spec: str) -> str:
    return f"{RESULTS}/latents/{safe_name(dataset)}/{safe_name(spec)}/index.json"


def latent_store(vae_id: str, spec: BucketSpec) -> str:
    return f"{RESULTS}/cache/latents/{safe_name(vae_id)}/{geometry(spec)}"


def text_cache(base_id: str) -> str:
    """Text-encoder outputs of a base's frozen encoders, by caption (lorabake.train.text_cache)."""
    return f"{RESULTS}/cache/text/{safe_name(base_id)}"


def run_dir(run: str) -> str:
    return f"{RESULTS}/runs/{safe_name(run)}"


def run_lora(run: str) -> str:
    return f"{run_dir(run)}/{run}.safetensors"


def epochs_dir(run: str) -> str:
    return f"{run_dir(run)}/epochs"


def ema_lora(lora: str) -> str:
    """The EMA copy saved beside a checkpoint: `x.safetensors` → `x-ema.safetensors`."""
    return lora.removesuffix(".safetensors") + "-ema.safetensors"


def epoch_lora(run: str, epoch: int) -> str:
    return f"{epochs_dir(run)}/{run}-e{epoch:04d}.safetensors"


def steps_dir(run: str) -> str:
    return f"{run_dir(run)}/steps"


def step_lora(run: str, step: int) -> str:
    return f"{steps_dir(run)}/{run}-s{step:06d}.safetensors"


def state_root(run: str) -> str:
    """Saved training states (save.state); not a Snakemake output, so a failed job leaves them for resuming."""
    return f"{run_dir(run)}/state"


def embeddings(run: str, token: str) -> str:
    """Pivotal-tuning embeddings, named as webui expects: the file name is the word used in prompts."""
    return f"{run_dir(run)}/embeddings/{safe_name(token)}.safetensors"


def train_log(run: str) -> str:
    return f"{run_dir(run)}/train.jsonl"


def loss_plot(run: str) -> str:
    return f"{run_dir(run)}/loss.png"


def run_config(run: str) -> str:
    return f"{run_dir(run)}/config.json"


def sample_grid(run: str) -> str:
    return f"{run_dir(run)}/grid.png"


def sample_scores(run: str) -> str:
    """Every grid cell's coordinates and image, and its concept score where the base has a scorer."""
    return f"{run_dir(run)}/scores.json"


def sample_dir(run: str) -> str:
    """Every cell of the grid as its own image."""
    return f"{run_dir(run)}/samples"


def merged(name: str) -> str:
    return f"{RESULTS}/merged/{safe_name(name)}.safetensors"


def extracted(name: str) -> str:
    return f"{RESULTS}/extracted/{safe_name(name)}.safetensors"


def merged_diffusers(name: str) -> str:
    return f"{RESULTS}/merged/{safe_name(name)}.diffusers"


def resized(name: str) -> str:
    return f"{RESULTS}/resized/{safe_name(name)}.safetensors"


def resize_report(name: str) -> str:
    return f"{RESULTS}/resized/{safe_name(name)}.json"


def svd_merged(name: str) -> str:
    return f"{RESULTS}/svd-merged/{safe_name(name)}.safetensors"


def posthoc_ema(name: str) -> str:
    """A run's epoch files averaged into one LoRA (not `ema_lora`, the online EMA's copy of a checkpoint)."""
    return f"{RESULTS}/ema/{safe_name(name)}.safetensors"


def job_log(rule: str, *keys: str) -> str:
    """A job's log, `logs/<rule>/<wildcard values>.log`: what `lorabake <stage>` printed."""
    return f"{LOGS}/{safe_name(rule)}/" + "/".join(safe_name(key) for key in keys) + ".log"


def cell_image(key: str) -> str:
    """One rendered grid cell, stored under the hash of everything that decides its pixels."""
    return f"{RESULTS}/cache/cells/{safe_name(key[:2])}/{safe_name(key)}.png"


def comparison_dir(name: str) -> str:
    """A comparison's grid (grid.png, or page-NN.png), cells.json, index.html and its cells' images."""
    return f"{RESULTS}/comparisons/{safe_name(name)}"
