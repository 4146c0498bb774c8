"""Train runs of the demo project in-process, for tests that look at what an option did."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors.torch import load_file

from lorabake import cli, paths, project
from lorabake.models import bases
from lorabake.workspace import Workspace

QUICK = {"training": {"max_steps": 8, "batch_size": 2}, "save": {"precision": "fp32"}}
# The option tests train at 64 px (8×8 latents, every demo image in one 64×64 bucket): a step costs
# a quarter of one at the demo's 128 px, and what an option does shows the same at either size.
RESOLUTION = 64


@contextlib.contextmanager
def working_in(project: Path) -> Iterator["Trainer"]:
    """A Trainer for `project`, with the project root as working directory while inside."""
    cwd = os.getcwd()
    os.chdir(project)
    try:
        yield Trainer(project)
    finally:
        os.chdir(cwd)


class Trainer:
    """A demo project with the tiny base built; `train(name, overrides)` writes configs/runs/<name>.yaml
    (QUICK ⊕ overrides over the project defaults), caches what it needs and trains it."""

    def __init__(self, project: Path, resolution: int = RESOLUTION):
        self.project = project
        config_file = project / "configs/config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["defaults"]["resolution"] = resolution
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.cli("base", "--base", "tiny")

    def cli(self, *args: str) -> None:
        assert cli.main(["--config", str(self.project / "configs/config.yaml"), *args]) == 0

    def write_run(self, name: str, overrides: dict, quick: bool = True) -> None:
        data = project.deep_merge(QUICK, overrides) if quick else overrides
        (self.project / "configs/runs" / f"{name}.yaml").write_text(yaml.safe_dump(data))

    def prepare(self, name: str, overrides: dict | None = None, quick: bool = True) -> None:
        """Write the run's config and cache the latents it needs."""
        self.write_run(name, overrides or {}, quick)
        ws = Workspace.load(self.project / "configs/config.yaml")
        for (dataset, spec), job in ws.latent_jobs.items():
            if not Path(paths.latent_index(dataset, spec)).exists():
                self.cli("cache-latents", "--dataset", dataset, "--spec", spec)

    def train(self, name: str, overrides: dict | None = None, quick: bool = True) -> "Result":
        self.prepare(name, overrides, quick)
        self.cli("train", "--run", name)
        return Result(self.project, name)


class Result:
    def __init__(self, project: Path, name: str):
        self.project, self.name = project, name

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in Path(paths.train_log(self.name)).read_text().splitlines()]

    @property
    def lora(self) -> Path:
        return Path(paths.run_lora(self.name))

    def weights(self, path: str | Path | None = None) -> dict[str, torch.Tensor]:
        return load_file(str(path or self.lora))

    def metadata(self) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(self.lora), "pt") as f:
            return f.metadata()


def fixed_batch(base: bases.Base, project: Path, count: int = 4):
    """A fixed evaluation batch: cached demo latents, their captions' encodings, noise and timesteps."""
    from lorabake.data import latents as latent_cache

    index_path = sorted((project / "results/latents/demo").glob("*/index.json"))[0]
    index = latent_cache.read_index(index_path)
    same_bucket = [e for e in index["entries"] if e["bucket"] == index["entries"][0]["bucket"]][:count]
    stacked = torch.stack([latent_cache.load_latents(index, e) for e in same_bucket])
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(stacked.shape, generator=generator)
    timesteps = torch.randint(100, 900, (len(same_bucket),), generator=generator)
    ids = base.tokenizer(["lbk_circle, lbk_square"] * len(same_bucket), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    return stacked, noise, timesteps, ids


@torch.no_grad()
def eval_loss(base: bases.Base, batch) -> float:
    latents, noise, timesteps, ids = batch
    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = base.unet(noisy, timesteps, base.text_encoder(ids)[0]).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()
