"""Sample grids: kohya-syntax prompts rendered with the LoRA at several strengths and epochs.

A prompt line reads `a red circle --n blurry --w 128 --h 128 --d 7 --l 7.5 --s 20` (kohya's syntax:
negative prompt, width, height, seed, CFG scale, steps; parsed by lorabake.prompts, without torch,
so the config check reads prompts as this module does). Every cell of a prompt's block uses the same
seed, so what differs between cells is the LoRA alone.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from lorabake import store
from lorabake.config import Pivotal
from lorabake.models import network
from lorabake.progress import progress as progress_bar
from lorabake.project_file import Samples
from lorabake.prompts import Prompt, parse_prompt
from lorabake.render import grid
from lorabake.samplers import SAMPLERS, canonical
from lorabake.train import pivotal


def load_pipeline(base_dir: Path, sampler: str):
    """The base's own pipeline class (model_index.json says which: SD1/SD2 or SDXL), offline."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    class_name, settings = SAMPLERS[canonical(sampler)]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: Prompt, clip_skip: int = 1) -> Image.Image:
    generator = torch.Generator().manual_seed(prompt.seed)
    # diffusers counts skipped layers (0 = last layer); kohya counts from the end (1 = last layer)
    return pipe(prompt.text, negative_prompt=prompt.negative or None, width=prompt.width, height=prompt.height,
                num_inference_steps=prompt.steps, guidance_scale=prompt.cfg, generator=generator,
                clip_skip=clip_skip - 1 or None).images[0]


def pipeline_text_encoders(pipe):
    """One text encoder, or SDXL's two as a list (as networks and key names take them)."""
    second = getattr(pipe, "text_encoder_2", None)
    return [pipe.text_encoder, second] if second is not None else pipe.text_encoder


def render_with_lora(pipe, lora: Path, strength: float, prompt: Prompt, clip_skip: int = 1) -> Image.Image:
    """Apply the LoRA at `strength` for one image, then take it off again."""
    if strength == 0.0:
        return render(pipe, prompt, clip_skip)
    net = network.apply_weights(lora, pipe.unet, pipeline_text_encoders(pipe), strength)
    try:
        return render(pipe, prompt, clip_skip)
    finally:
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()


def sample_grid(base_dir: Path, checkpoints: list[tuple[str, Path]], samples: Samples,
                size: tuple[int, int], out_grid: Path, out_dir: Path, title: str, clip_skip: int = 1,
                embeddings: tuple[Pivotal, Path] | None = None, scores: Path | None = None,
                scorer_concept: str | None = None, epochs: list[int] | None = None) -> None:
    """Render prompts × checkpoints × strengths, save each cell and the labelled grid. With pivotal
    embeddings, the placeholder word in prompts means the trained tokens. With `scores`, every cell
    is listed there (prompt, epoch, strength, seed, image); with `scorer_concept` too (the base has a
    concept scorer), each cell gets its score, printed under it in the grid."""
    defaults = Prompt("", "", size[0], size[1], samples.seed, samples.cfg, samples.steps)
    prompts = [parse_prompt(line, defaults) for line in samples.prompts]
    pipe = load_pipeline(base_dir, samples.sampler)
    if embeddings is not None:
        cfg, path = embeddings
        pivotal.load_embeddings(path, pipe.tokenizer, pipe.text_encoder, cfg)
        prompts = [replace(p, text=pivotal.substitute(p.text, cfg)) for p in prompts]
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks, cells, images = [], [], []  # images: as rendered, in the order of `cells`
    with progress_bar(len(prompts) * len(checkpoints) * len(samples.strengths), "samples", unit="img") as progress:
        for p, prompt in enumerate(prompts):
            baseline = None
            rows = []
            for c, (label, lora) in enumerate(checkpoints):
                row = []
                for strength in samples.strengths:
                    if strength == 0.0:  # the base model: the same picture in every row
                        baseline = baseline or render(pipe, prompt, clip_skip)
                        image = baseline
                    else:
                        image = render_with_lora(pipe, lora, strength, prompt, clip_skip)
                    name = f"p{p}-{label.replace(' ', '')}-s{strength:g}.png"
                    grid.save_png(image, out_dir / name)
                    row.append(grid.readable(image))
                    images.append(image)
                    cells.append({"prompt": samples.prompts[p], "epoch": epochs[c] if epochs else None,
                                  "checkpoint": label, "strength": strength, "seed": prompt.seed,
                                  "image": name, "score": None})
                    progress.update()
                rows.append(row)
            blocks.append(grid.GridBlock(
                title=f"{prompt.text}" + (f"  [neg: {prompt.negative}]" if prompt.negative else ""),
                row_labels=[label for label, _ in checkpoints],
                col_labels=[f"strength {s:g}" for s in samples.strengths], images=rows))
    seeds = sorted({prompt.seed for prompt in prompts})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds)) + " (one per prompt)"
    steps = sorted({prompt.steps for prompt in prompts})
    cfgs = sorted({prompt.cfg for prompt in prompts})
    footer = (f"{seed_text} | {samples.sampler}, {'/'.join(map(str, steps))} steps, "
              f"cfg {'/'.join(f'{c:g}' for c in cfgs)} | lorabake")
    if scorer_concept is not None:
        score_cells(blocks, cells, images, scorer_concept)
        footer = f"under each cell: the scorer's {scorer_concept} score (0..1) | " + footer
    if scores is not None:
        store.write_json(scores, {"concept": scorer_concept, "cells": cells})
    grid.save_png(grid.render_grid(blocks, title=title, footer=footer), out_grid)


def score_cells(blocks: list[grid.GridBlock], cells: list[dict], images: list[Image.Image], concept: str) -> None:
    """Each cell's concept score, into its `cells` entry and as the caption under it in its block."""
    from lorabake.render import scorer

    found = scorer.scores(images, concept)
    for cell, value in zip(cells, found):
        cell["score"] = round(value, 4)
    values = iter(found)
    for block in blocks:
        block.captions = [[f"{concept} {next(values):.2f}" for _ in row] for row in block.images]
