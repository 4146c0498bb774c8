"""The cell cache: one image per grid cell, stored under a key made of everything that decides its pixels.

A `Cell` names a picture: the base (by its content id), the LoRA (by its content hash) at a UNet
strength, a text-encoder strength and block weights, the prompt and negative, seed, sampler, steps,
CFG, size, clip skip and pivotal embeddings. Its `key` hashes exactly those, so the same picture asked
for by two grids, or by the same grid after a prompt was added, is rendered once:
`results/cache/cells/{key[:2]}/{key}.png` (like the latent store). `render_cells` renders only the
keys the cache lacks, batching cells that share a pipeline state, and says `rendered N, reused M`.

A cell whose LoRA contributes nothing (strength 0 on the UNet, or every block weighted 0, and a text
encoder strength of 0) *is* the base's picture: its key names no LoRA, so every run's strength-0 column
shares one image. Cells rendered in one batch use one generator each (the same latents as alone), so
a batch changes the pixels no more than float summation order does.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from lorabake import paths, store
from lorabake.block_weights import BlockWeights
from lorabake.config import Pivotal
from lorabake.prompts import Prompt
from lorabake.unet_blocks import block_names

CELL_VERSION = 1  # bump when rendering changes pixels for the same key: every cell renders again


@functools.lru_cache(maxsize=None)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    return store.file_sha256(path)


def content_hash(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in a process."""
    stat = os.stat(path)
    return _file_hash(str(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Cell:
    base_dir: Path  # a built base (results/base/{base}); its content id goes into the key
    prompt: Prompt  # text (after pivotal substitution), negative, size, seed, cfg, steps
    sampler: str = "euler_a"
    clip_skip: int = 1
    lora: Path | None = None
    strength: float = 0.0  # on the UNet
    te_strength: float | None = None  # None: the same as `strength`
    block_weights: BlockWeights | None = None
    embeddings: tuple[Pivotal, Path] | None = None  # pivotal-tuning tokens the prompt's placeholder means

    @property
    def text_encoder_multiplier(self) -> float:
        te = self.strength if self.te_strength is None else self.te_strength
        return te * (self.block_weights.text_encoder if self.block_weights else 1.0)

    @property
    def unet_blocks(self) -> tuple[float, ...] | None:
        """The UNet blocks' weights, or None when all are 1."""
        if self.block_weights is None or all(w == 1.0 for w in self.block_weights.blocks):
            return None
        return self.block_weights.blocks

    @property
    def applies_lora(self) -> bool:
        if self.lora is None:
            return False
        unet = self.strength != 0.0 and any(w != 0.0 for w in (self.unet_blocks or (1.0,)))
        return unet or self.text_encoder_multiplier != 0.0

    def identity(self) -> dict:
        """Everything that decides the cell's pixels, and nothing else."""
        p = self.prompt
        identity = {"version": CELL_VERSION, "base": _base_id(self.base_dir), "prompt": p.text, "negative": p.negative,
                    "width": p.width, "height": p.height, "seed": p.seed, "cfg": p.cfg, "steps": p.steps,
                    "sampler": self.sampler, "clip_skip": self.clip_skip, "lora": None}
        if self.embeddings is not None:
            cfg, path = self.embeddings
            identity["embeddings"] = {"file": content_hash(path), "token": cfg.token, "count": cfg.num_new_tokens}
        if self.applies_lora:
            identity["lora"] = {"file": content_hash(self.lora), "unet": self.strength,
                                "text_encoder": self.text_encoder_multiplier, "blocks": self.unet_blocks}
        return identity

    @functools.cached_property
    def key(self) -> str:
        return store.digest(self.identity(), length=32)


def _base_id(base_dir: Path) -> str:
    from lorabake.models import bases

    return bases.base_id(base_dir)


def cache_file(root: Path, key: str) -> Path:
    return root / paths.cell_image(key)


# ---------------------------------------------------------------- rendering what the cache lacks

def load_pipeline(base_dir: Path, sampler: str):
    """The base's own pipeline class (model_index.json says which: SD1/SD2 or SDXL), offline."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" bars, in every job log
    pipe = diffusers.DiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_sampler(pipe, sampler: str) -> None:
    import diffusers

    from lorabake.samplers import SAMPLERS, canonical

    class_name, settings = SAMPLERS[canonical(sampler)]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)


def pipeline_text_encoders(pipe):
    """One text encoder, or SDXL's two as a list (as networks and key names take them)."""
    second = getattr(pipe, "text_encoder_2", None)
    return [pipe.text_encoder, second] if second is not None else pipe.text_encoder


@contextlib.contextmanager
def lora_applied(pipe, lora: Path | None, strength: float, te_strength: float | None = None,
                 block_weights: BlockWeights | None = None) -> Iterator[None]:
    """The pipeline with the LoRA applied at run time while inside; its models exactly as before after."""
    cell = Cell(Path(), Prompt("", "", 8, 8, 0, 0.0, 1), lora=lora, strength=strength, te_strength=te_strength,
                block_weights=block_weights)
    if not cell.applies_lora:
        yield
        return
    from lorabake.models import network

    blocks = None if cell.unet_blocks is None else block_weights.as_dict()
    if blocks is not None and block_weights.names != block_names(network.unet_arch(pipe.unet)):
        raise ValueError(f"{lora}: block weights of {len(block_weights.names)} blocks do not fit this UNet "
                         f"({network.unet_arch(pipe.unet)})")
    net = network.apply_weights(lora, pipe.unet, pipeline_text_encoders(pipe), strength,
                                cell.text_encoder_multiplier, blocks)
    try:
        yield
    finally:
        for module in net.applied:
            module.restore()


def render_batch(pipe, prompts: list[Prompt], clip_skip: int = 1) -> list[Image.Image]:
    """Prompts of one size, step count and CFG in one pipeline call, each with its own generator."""
    import torch

    first = prompts[0]
    seeds = [p.seed for p in prompts]
    if hasattr(pipe.scheduler, "noise_sampler_seed"):  # SDE samplers draw their Brownian noise from this
        pipe.scheduler.noise_sampler_seed = seeds
    negatives = [p.negative for p in prompts]
    # diffusers counts skipped layers (0 = last layer); kohya counts from the end (1 = last layer)
    return pipe([p.text for p in prompts], negative_prompt=negatives if any(negatives) else None,
                width=first.width, height=first.height, num_inference_steps=first.steps, guidance_scale=first.cfg,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds], clip_skip=clip_skip - 1 or None).images


def _pipeline_group(cell: Cell) -> tuple:
    """Cells that can share one loaded pipeline."""
    embeddings = None if cell.embeddings is None else str(cell.embeddings[1])
    return str(cell.base_dir), embeddings


def _lora_group(cell: Cell) -> tuple:
    """Cells that share one applied LoRA state (and sampler and clip skip)."""
    if not cell.applies_lora:
        return cell.sampler, cell.clip_skip, None
    return cell.sampler, cell.clip_skip, str(cell.lora), cell.strength, cell.text_encoder_multiplier, cell.unet_blocks


def _call_group(cell: Cell) -> tuple:
    """Cells one pipeline call can render together."""
    p = cell.prompt
    return p.width, p.height, p.steps, p.cfg, bool(p.negative)


def render_cells(cells: list[Cell], root: Path, batch_size: int = 4,
                 log: Callable[[str], None] = print) -> dict[str, Path]:
    """Render the cells the cache under `root` lacks; return {key: cached image} for every cell."""
    from lorabake.progress import progress

    unique = {cell.key: cell for cell in cells}
    missing = [cell for key, cell in unique.items() if not cache_file(root, key).is_file()]
    log(f"cells: {len(cells)} ({len(unique)} distinct images); {len(missing)} to render, "
        f"{len(unique) - len(missing)} in the cell cache")
    with progress(len(missing), "cells", unit="img") as bar:
        for cells_of_pipe in _grouped(missing, _pipeline_group).values():
            _render_with_one_pipeline(cells_of_pipe, root, batch_size, bar.update)
    log(f"rendered {len(missing)}, reused {len(unique) - len(missing)}")
    return {key: cache_file(root, key) for key in unique}


def _grouped(cells: list[Cell], by: Callable[[Cell], tuple]) -> dict[tuple, list[Cell]]:
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[by(cell)].append(cell)
    return groups


def _render_with_one_pipeline(cells: list[Cell], root: Path, batch_size: int, done: Callable[[int], None]) -> None:
    from lorabake.train import pivotal

    first = cells[0]
    pipe = load_pipeline(first.base_dir, first.sampler)
    if first.embeddings is not None:
        cfg, path = first.embeddings
        second = getattr(pipe, "text_encoder_2", None)
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if second is not None else pipe.tokenizer
        pivotal.load_embeddings(path, tokenizers, pipeline_text_encoders(pipe), cfg)
    for state, group in _grouped(cells, _lora_group).items():
        use_sampler(pipe, state[0])
        lead = group[0]
        with lora_applied(pipe, lead.lora, lead.strength, lead.te_strength, lead.block_weights):
            for calls in _grouped(group, _call_group).values():
                for start in range(0, len(calls), batch_size):
                    chunk = calls[start:start + batch_size]
                    for cell, image in zip(chunk, render_batch(pipe, [c.prompt for c in chunk], lead.clip_skip)):
                        save_png(image, cache_file(root, cell.key))
                    done(len(chunk))


def save_png(image: Image.Image, path: Path) -> None:
    from lorabake.render import grid

    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save_png(image, path)


def with_pivotal(prompt: Prompt, embeddings: tuple[Pivotal, Path] | None) -> Prompt:
    """The prompt as the pipeline reads it: a pivotal run's placeholder word means its trained tokens."""
    if embeddings is None:
        return prompt
    from lorabake.train import pivotal

    return replace(prompt, text=pivotal.substitute(prompt.text, embeddings[0]))


def copy_out(source: Path, destination: Path) -> None:
    """A cached image into an output folder (a copy: editing the output never changes the cache)."""
    store.write_bytes(destination, source.read_bytes())
