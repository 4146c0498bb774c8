"""Sample grids: kohya-syntax prompts rendered with the LoRA at several strengths and epochs.

A prompt line reads `a red circle --n blurry --w 128 --h 128 --d 7 --l 7.5 --s 20` (kohya's syntax:
negative prompt, width, height, seed, CFG scale, steps; parsed by lorabake.prompts, without torch,
so the config check reads prompts as this module does). Every cell of a prompt's block uses the same
seed, so what differs between cells is the LoRA alone. Cells come from the cell cache
(lorabake.render.cells): a grid renders only pictures no grid has rendered before.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from lorabake import store
from lorabake.config import Pivotal
from lorabake.project_file import Samples
from lorabake.prompts import Prompt, parse_prompt
from lorabake.render import grid
from lorabake.render.cells import Cell, copy_out, render_cells, with_pivotal


def sample_grid(base_dir: Path, checkpoints: list[tuple[str, Path]], samples: Samples,
                size: tuple[int, int], out_grid: Path, out_dir: Path, title: str, clip_skip: int = 1,
                embeddings: tuple[Pivotal, Path] | None = None, scores: Path | None = None,
                scorer_concept: str | None = None, epochs: list[int] | None = None,
                cache_root: Path | None = None) -> None:
    """Render prompts × checkpoints × strengths through the cell cache of the project at `cache_root`
    (default: a cache beside `out_dir`, for callers outside a project), save each cell and the labelled grid. With pivotal embeddings, the
    placeholder word in prompts means the trained tokens. With `scores`, every cell is listed there
    (prompt, epoch, strength, seed, image); with `scorer_concept` too (the base has a concept scorer),
    each cell gets its score, printed under it in the grid."""
    defaults = Prompt("", "", size[0], size[1], samples.seed, samples.cfg, samples.steps)
    prompts = [parse_prompt(line, defaults) for line in samples.prompts]
    grid_cells = [[[Cell(Path(base_dir), with_pivotal(prompt, embeddings), samples.sampler, clip_skip, lora, strength,
                         embeddings=embeddings) for strength in samples.strengths]
                   for _, lora in checkpoints] for prompt in prompts]
    flat = [cell for block in grid_cells for row in block for cell in row]
    cached = render_cells(flat, Path(cache_root or Path(out_dir).parent), samples.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks, cells, images = [], [], []  # images: as rendered, in the order of `cells`
    for p, (prompt, block) in enumerate(zip(prompts, grid_cells)):
        rows = []
        for c, ((label, _), row_cells) in enumerate(zip(checkpoints, block)):
            row = []
            for strength, cell in zip(samples.strengths, row_cells):
                name = f"p{p}-{label.replace(' ', '')}-s{strength:g}.png"
                copy_out(cached[cell.key], out_dir / name)
                image = Image.open(cached[cell.key]).convert("RGB")
                row.append(grid.readable(image))
                images.append(image)
                cells.append({"prompt": samples.prompts[p], "epoch": epochs[c] if epochs else None,
                              "checkpoint": label, "strength": strength, "seed": prompt.seed,
                              "image": name, "key": cell.key, "score": None})
            rows.append(row)
        blocks.append(grid.GridBlock(
            title=f"{prompt.text}" + (f"  [neg: {prompt.negative}]" if prompt.negative else ""),
            row_labels=[label for label, _ in checkpoints],
            col_labels=[f"strength {s:g}" for s in samples.strengths], images=rows))
    footer = fixed_settings(prompts, samples.sampler)
    if scorer_concept is not None:
        score_cells(blocks, cells, images, scorer_concept)
        footer = f"under each cell: the scorer's {scorer_concept} score (0..1) | " + footer
    if scores is not None:
        store.write_json(scores, {"concept": scorer_concept, "cells": cells})
    grid.save_png(grid.render_grid(blocks, title=title, footer=footer), out_grid)


def fixed_settings(prompts: list[Prompt], sampler: str) -> str:
    """The footer: the seeds, sampler, steps and CFG the cells were rendered with."""
    seeds = sorted({prompt.seed for prompt in prompts})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds)) + " (one per prompt)"
    steps = sorted({prompt.steps for prompt in prompts})
    cfgs = sorted({prompt.cfg for prompt in prompts})
    return f"{seed_text} | {sampler}, {'/'.join(map(str, steps))} steps, cfg {'/'.join(f'{c:g}' for c in cfgs)} | lorabake"


def score_cells(blocks: list[grid.GridBlock], cells: list[dict], images: list[Image.Image], concept: str) -> None:
    """Each cell's concept score, into its `cells` entry and as the caption under it in its block."""
    from lorabake.render import scorer

    found = scorer.scores(images, concept)
    for cell, value in zip(cells, found):
        cell["score"] = round(value, 4)
    values = iter(found)
    for block in blocks:
        block.captions = [[f"{concept} {next(values):.2f}" for _ in row] for row in block.images]
