"""What one training run holds: its inputs (config, base, datasets, latent indexes) and, between
steps, the models, network, optimizer, schedule and what it has saved (`Session`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorabake.config import RunConfig
from lorabake.data.dataset import Dataset
from lorabake.models import bases
from lorabake.train.plan import TrainingPlan
from lorabake.train.text_cache import TextCache


@dataclass
class RunInputs:
    name: str
    run: RunConfig
    base_dir: Path
    datasets: dict[str, Dataset]
    indexes: dict[str, dict]            # dataset name → latent index (latents.read_index); {} without a cache
    facts: dict = field(default_factory=dict)  # extra metadata (digests, tag frequencies)
    root: Path = Path(".")              # project root: network.init_weights is relative to it
    digest: str = ""                    # params digest: a saved state resumes only the run that saved it


@dataclass
class Session:
    """What a run holds between steps."""

    inputs: RunInputs
    plan: TrainingPlan
    base: bases.Base
    net: object                          # lycoris LycorisNetworkKohya
    embeddings: dict[str, torch.nn.Parameter] | None  # pivotal-tuning vectors by file key (pivotal.file_keys)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: object
    latents_of: object                   # CachedLatents or PixelLatents
    prediction: str                      # "epsilon" or "v_prediction"
    records: list[dict] = field(default_factory=list)
    last_saved: str | None = None        # the newest checkpoint written, relative to the project root
    kept: list[str] = field(default_factory=list)  # epoch/step files a resume must find again
    ema: dict[str, torch.Tensor] | None = None  # the network's moving average (run.ema), fp32
    text_cache: TextCache | None = None  # with training.cache_text_encoder_outputs
    unet: object = None                  # the UNet as the steps call it (loop.unet_caller): compiled, channels-last

    @property
    def run(self) -> RunConfig:
        return self.inputs.run

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process
