"""Artifact paths: the contract of DESIGN's table, in one place for the Snakefile and the CLI.

Every name that goes into a path passes `names.safe_name` here, whatever checked it before: a path
under results/ cannot be steered outside it by a config key.
"""
from __future__ import annotations

from lorabake.buckets import BucketSpec
from lorabake.names import safe_name

RESULTS = "results"


def base_dir(base: str) -> str:
    return f"{RESULTS}/base/{safe_name(base)}"


def base_id_cache() -> str:
    """Content hashes of user checkpoints, keyed by (path, size, mtime): a 7 GB file is hashed once."""
    return f"{RESULTS}/cache/base-ids.json"


def base_json(base: str) -> str:
    return f"{base_dir(base)}/base.json"


def scan_cache(dataset: str) -> str:
    """What the parse-time dataset scan remembers per file (lorabake.scan_cache)."""
    return f"{RESULTS}/cache/scan/{safe_name(dataset)}.json"


def dataset_report(dataset: str) -> str:
    return f"{RESULTS}/datasets/{safe_name(dataset)}/report.json"


def geometry(spec: BucketSpec) -> str:
    """The part of a latent spec that changes the pixels the VAE sees."""
    w, h = spec.resolution
    if not spec.enabled:
        return f"{w}x{h}-fixed"
    if spec.no_upscale:
        return f"{w}x{h}-s{spec.step}-noup"
    return f"{w}x{h}-b{spec.min_size}-{spec.max_size}-s{spec.step}"


def latent_spec(base: str, spec: BucketSpec, flip: bool) -> str:
    return f"{base}-{geometry(spec)}" + ("-flip" if flip else "")


def latent_index(dataset: str, spec: str) -> str:
    return f"{RESULTS}/latents/{safe_name(dataset)}/{safe_name(spec)}/index.json"


def latent_store(vae_id: str, spec: BucketSpec) -> str:
    return f"{RESULTS}/cache/latents/{safe_name(vae_id)}/{geometry(spec)}"


def run_dir(run: str) -> str:
    return f"{RESULTS}/runs/{safe_name(run)}"


def run_lora(run: str) -> str:
    return f"{run_dir(run)}/{run}.safetensors"


def epoch_lora(run: str, epoch: int) -> str:
    return f"{run_dir(run)}/epochs/{run}-e{epoch:04d}.safetensors"


def step_lora(run: str, step: int) -> str:
    return f"{run_dir(run)}/steps/{run}-s{step:06d}.safetensors"


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
