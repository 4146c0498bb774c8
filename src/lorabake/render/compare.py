"""Comparisons: X/Y/Z grids across runs, epochs, strengths, prompts, seeds, bases, samplers, CFG, steps and
block weights, as tracked artifacts.

`plan_comparison` turns a `comparisons:` entry into axes (each value with its label) and every cell's
coordinates; axes with several values go to rows, columns or pages as the entry says, the others with
several values stack as sections of a page, and single-valued ones are the fixed settings of the
footer. `build_comparison` renders the cells through the cell cache (only pictures no grid rendered
before) and writes `results/comparisons/{name}/`: grid.png (or page-NN.png), cells/ (each cell's
image), cells.json (every cell's coordinates, settings, image and score) and index.html (a static
page with the grid, the axes and the runs' differing settings).
"""
from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from lorabake import block_weights as lbw, paths, store
from lorabake.config import ConfigError
from lorabake.project_file import AXES, Comparison, Samples, placement
from lorabake.prompts import Prompt, parse_prompt
from lorabake.render import grid
from lorabake.render.cells import Cell, copy_out, render_cells, with_pivotal

LAST = "final"  # the label of `epochs: last`: the run's final LoRA file
PARSE_ONLY = Prompt("", "", 512, 512, 0, 0.0, 1)  # defaults for reading a prompt's text and negative


@dataclass(frozen=True)
class Axis:
    name: str
    values: list[Any]  # None means "the run's or prompt's own" (a run's base, a prompt's --d …)
    labels: list[str]


@dataclass
class PlannedCell:
    coords: dict[str, int]  # axis → index into that axis' values
    settings: dict[str, Any]  # the resolved values, as cells.json lists them
    cell: Cell | None  # None: this run has no such epoch file
    image: Path | None = None
    score: float | None = None


@dataclass
class ComparisonPlan:
    name: str
    axes: dict[str, Axis]
    rows: list[str]
    columns: list[str]
    pages: list[str]
    sections: list[str]  # unplaced axes with several values: stacked blocks on each page
    cells: list[PlannedCell] = field(default_factory=list)
    concept: str | None = None
    batch_size: int = 4

    @property
    def placed(self) -> list[str]:
        return self.rows + self.columns + self.pages + self.sections


# ---------------------------------------------------------------- axes

def _samples(ws, comparison: Comparison) -> Samples:
    samples = ws.project.file.samples
    if samples is not None:
        return samples
    return Samples(prompts=comparison.prompts, strengths=comparison.strengths)  # both given: checked with the config


def _epochs_axis(ws, comparison: Comparison, runs: list[str]) -> Axis:
    if comparison.epochs == "last":
        return Axis("epochs", [None], [LAST])
    kept = {run: _kept(ws, run) for run in runs}
    if comparison.epochs == "all":
        epochs = sorted({e for values in kept.values() for e in values})
    else:
        epochs = list(comparison.epochs)
        unknown = [e for e in epochs if not any(e in values for values in kept.values())]
        if unknown:
            raise ConfigError(f"{ws.project.config_file}: comparisons.{comparison.name}.epochs: no run of {runs} keeps "
                              f"an epoch file for epoch(s) {unknown}; kept: {kept}")
    return Axis("epochs", epochs, [f"epoch {e}" for e in epochs])


def _axis(name: str, values: list | None, label, own: str) -> Axis:
    if values is None:
        return Axis(name, [None], [own])
    return Axis(name, list(values), [label(v) for v in values])


def comparison_axes(ws, comparison: Comparison) -> dict[str, Axis]:
    samples = _samples(ws, comparison)
    runs = ws.project.comparison_runs(comparison.name)
    prompts = comparison.prompts or samples.prompts
    axes = [
        Axis("runs", runs, runs),
        _epochs_axis(ws, comparison, runs),
        _axis("strengths", comparison.strengths or samples.strengths, lambda v: f"strength {v:g}", ""),
        _axis("te_strengths", comparison.te_strengths, lambda v: f"TE {v:g}", "TE = strength"),
        Axis("prompts", prompts, [parse_prompt(line, PARSE_ONLY).text for line in prompts]),
        _axis("seeds", comparison.seeds, lambda v: f"seed {v}", f"seed {samples.seed} (or --d)"),
        _axis("bases", comparison.bases, lambda v: f"on {v}", "each run's own base"),
        _axis("samplers", comparison.samplers, str, samples.sampler),
        _axis("cfg", comparison.cfg, lambda v: f"cfg {v:g}", f"cfg {samples.cfg:g} (or --l)"),
        _axis("steps", comparison.steps, lambda v: f"{v} steps", f"{samples.steps} steps (or --s)"),
        _axis("block_weights", comparison.block_weights, lambda v: f"blocks {lbw.label(v)}", "all blocks"),
    ]
    return {axis.name: axis for axis in axes}


# ---------------------------------------------------------------- cells

def plan_comparison(ws, name: str) -> ComparisonPlan:
    """Every cell of the comparison, with its coordinates and the Cell that names its picture."""
    comparison = ws.project.file.comparisons[name]
    samples = _samples(ws, comparison)
    axes = comparison_axes(ws, comparison)
    rows, columns, pages = (placement(where) for where in (comparison.rows, comparison.columns, comparison.pages))
    placed = set(rows + columns + pages)
    sections = [axis for axis in AXES if axis not in placed and len(axes[axis].values) > 1]
    plan = ComparisonPlan(name, axes, rows, columns, pages, sections, concept=comparison.concept or samples.concept,
                          batch_size=samples.batch_size)
    for index in itertools.product(*(range(len(axes[axis].values)) for axis in AXES)):
        coords = dict(zip(AXES, index))
        plan.cells.append(_planned_cell(ws, samples, axes, coords))
    return plan


def _planned_cell(ws, samples: Samples, axes: dict[str, Axis], coords: dict[str, int]) -> PlannedCell:
    value = {axis: axes[axis].values[i] for axis, i in coords.items()}
    root, run = ws.project.root, value["runs"]
    cfg = ws.run(run)
    base = value["bases"] or cfg.base
    epoch = value["epochs"]
    lora = root / (paths.run_lora(run) if epoch is None else paths.epoch_lora(run, epoch))
    prompt = parse_prompt(value["prompts"], Prompt("", "", *cfg.size, samples.seed, samples.cfg, samples.steps))
    prompt = replace(prompt, **{key: value[axis] for axis, key in (("seeds", "seed"), ("cfg", "cfg"), ("steps", "steps"))
                                if value[axis] is not None})
    embeddings = (cfg.pivotal, root / paths.embeddings(run, cfg.pivotal.token)) if cfg.pivotal else None
    blocks = None if value["block_weights"] is None else lbw.resolve(value["block_weights"], _arch(ws, base))
    sampler = value["samplers"] or samples.sampler
    settings = {"run": run, "epoch": epoch if epoch is not None else LAST, "strength": value["strengths"],
                "te_strength": value["te_strengths"] if value["te_strengths"] is not None else value["strengths"],
                "prompt": prompt.text, "negative": prompt.negative, "seed": prompt.seed, "base": base,
                "sampler": sampler, "cfg": prompt.cfg, "steps": prompt.steps, "size": [prompt.width, prompt.height],
                "block_weights": None if blocks is None else lbw.label(value["block_weights"])}
    if epoch is not None and epoch not in _kept(ws, run):
        return PlannedCell(coords, settings, None)
    cell = Cell(root / paths.base_dir(base), with_pivotal(prompt, embeddings), sampler, cfg.training.clip_skip, lora,
                value["strengths"], value["te_strengths"], blocks, embeddings)
    return PlannedCell(coords, settings, cell)


def _arch(ws, base: str) -> str:
    """The base's architecture, which decides its block vocabulary (read from its config or header)."""
    from lorabake.checks import architecture

    return architecture(ws.project, base)


def _kept(ws, run: str) -> list[int]:
    from lorabake.train.plan import kept_epochs

    return kept_epochs(ws.run(run), ws.plan(run))


# ---------------------------------------------------------------- building

def build_comparison(ws, name: str) -> ComparisonPlan:
    """Render what the cell cache lacks and write the comparison's folder in one atomic swap."""
    plan = plan_comparison(ws, name)
    root = ws.project.root
    drawn = [c for c in plan.cells if c.cell is not None]
    cached = render_cells([c.cell for c in drawn], root, plan.batch_size)
    for planned in drawn:
        planned.image = cached[planned.cell.key]
    scored = plan.concept is not None and any(_has_scorer(ws, c.settings["base"]) for c in drawn)
    if scored:
        _score(plan, drawn)
    store.build_folder(root / paths.comparison_dir(name), lambda folder: _write(plan, folder, ws))
    return plan


def _has_scorer(ws, base: str) -> bool:
    from lorabake.config import SCORED_BUILTINS

    return ws.project.file.bases[base].builtin in SCORED_BUILTINS


def _score(plan: ComparisonPlan, drawn: list[PlannedCell]) -> None:
    from lorabake.render import scorer

    values = scorer.scores([Image.open(c.image).convert("RGB") for c in drawn], plan.concept)
    for planned, value in zip(drawn, values):
        planned.score = round(value, 4)


def _combos(plan: ComparisonPlan, names: list[str]) -> list[dict[str, int]]:
    ranges = [range(len(plan.axes[axis].values)) for axis in names]
    return [dict(zip(names, index)) for index in itertools.product(*ranges)]


def _label(plan: ComparisonPlan, coords: dict[str, int], separator: str = ", ") -> str:
    return separator.join(plan.axes[axis].labels[i] for axis, i in coords.items())


def page_files(plan: ComparisonPlan) -> list[str]:
    pages = _combos(plan, plan.pages)
    return ["grid.png"] if len(pages) == 1 and not plan.pages else [f"page-{n:02d}.png" for n in range(1, len(pages) + 1)]


def _write(plan: ComparisonPlan, folder: Path, ws) -> None:
    by_coords = {tuple(c.coords[axis] for axis in AXES): c for c in plan.cells}
    for planned in plan.cells:
        if planned.image is not None:
            planned.settings["image"] = f"cells/{planned.cell.key}.png"
            copy_out(planned.image, folder / planned.settings["image"])
    fixed = {axis: _fixed_text(plan, axis) for axis in AXES if axis not in plan.placed and axis != "prompts"}
    fixed = {axis: text for axis, text in fixed.items() if text}
    footer = " | ".join(fixed.values()) + " | lorabake"
    if plan.concept is not None and any(c.score is not None for c in plan.cells):
        footer = f"under each cell: the scorer's {plan.concept} score (0..1) | " + footer
    files = page_files(plan)
    for number, (page, file) in enumerate(zip(_combos(plan, plan.pages), files), start=1):
        blocks = [_block(plan, by_coords, {**page, **section}) for section in _combos(plan, plan.sections)]
        title = f"{plan.name}: {' × '.join(', '.join(axes) for axes in (plan.rows, plan.columns) if axes)}"
        title += f" | {_label(plan, page)}" if plan.pages else ""
        grid.save_png(grid.render_grid(blocks, title=title, footer=footer), folder / file)
    for planned in plan.cells:
        planned.settings["page"] = files[_page_index(plan, planned)]
    listing = {"name": plan.name, "concept": plan.concept,
               "layout": {"rows": plan.rows, "columns": plan.columns, "pages": plan.pages, "sections": plan.sections},
               "axes": {axis: plan.axes[axis].labels for axis in AXES}, "fixed": fixed, "pages": files,
               "cells": [{**c.settings, "key": c.cell.key if c.cell else None, "score": c.score,
                          "coords": c.coords} for c in plan.cells]}
    store.write_json(folder / "cells.json", listing)
    store.write_text(folder / "index.html", index_html(plan, listing, run_settings(ws, plan.axes["runs"].values)))


def _page_index(plan: ComparisonPlan, planned: PlannedCell) -> int:
    index = 0
    for axis in plan.pages:
        index = index * len(plan.axes[axis].values) + planned.coords[axis]
    return index


def _block(plan: ComparisonPlan, by_coords: dict, at: dict[str, int]) -> grid.GridBlock:
    rows, columns = _combos(plan, plan.rows), _combos(plan, plan.columns)
    images, captions = [], []
    for row in rows:
        images.append([]), captions.append([])
        for column in columns:
            coords = {axis: 0 for axis in AXES} | at | row | column
            planned = by_coords[tuple(coords[axis] for axis in AXES)]
            images[-1].append(_cell_image(planned))
            captions[-1].append(_caption(plan, planned))
    titles = [plan.axes[axis].labels[i] for axis, i in at.items() if axis in plan.sections]
    if "prompts" not in plan.placed:  # one prompt for the whole block: it is the block's title
        prompt = parse_prompt(plan.axes["prompts"].values[at.get("prompts", 0)], PARSE_ONLY)
        titles.insert(0, prompt.text + (f"  [neg: {prompt.negative}]" if prompt.negative else ""))
    return grid.GridBlock(title=" | ".join(titles), row_labels=[_label(plan, r) for r in rows],
                          col_labels=[_label(plan, c) for c in columns], images=images,
                          captions=captions if any(any(row) for row in captions) else None)


SETTING = {"runs": "run", "epochs": "epoch", "strengths": "strength", "te_strengths": "te_strength", "seeds": "seed",
           "bases": "base", "samplers": "sampler", "cfg": "cfg", "steps": "steps", "block_weights": "block_weights"}
FIXED_TEXT = {"runs": "{}", "epochs": "epoch {}", "strengths": "strength {}", "te_strengths": "TE {}",
              "seeds": "seed {}", "bases": "base {}", "samplers": "{}", "cfg": "cfg {}", "steps": "{} steps",
              "block_weights": "blocks {}"}


def _fixed_text(plan: ComparisonPlan, axis: str) -> str:
    """A fixed setting as the footer states it: the values the cells really used (seeds 7/11 when
    each prompt has its own --d)."""
    if axis in ("te_strengths", "block_weights") and plan.axes[axis].values == [None]:
        return ""  # TE = strength, all blocks: nothing to state
    values = sorted({_show(c.settings[SETTING[axis]]) for c in plan.cells}, key=lambda v: (len(v), v))
    return FIXED_TEXT[axis].format("/".join(values))


def _cell_image(planned: PlannedCell) -> Image.Image:
    if planned.image is None:  # a run without this epoch: a grey square of the run's size
        return grid.readable(Image.new("RGB", tuple(planned.settings["size"]), (200, 200, 200)))
    return grid.readable(Image.open(planned.image).convert("RGB"))


def _caption(plan: ComparisonPlan, planned: PlannedCell) -> str:
    if planned.cell is None:
        return "not saved"
    return f"{plan.concept} {planned.score:.2f}" if planned.score is not None else ""


# ---------------------------------------------------------------- the page

def run_settings(ws, runs: list[str]) -> dict[str, dict[str, Any]]:
    """The settings that differ between the runs (dotted keys), like DVC's `exp show`."""
    flat = {run: _flatten(ws.run(run).identity()) for run in runs}
    keys = sorted({key for values in flat.values() for key in values})
    return {key: {run: flat[run].get(key) for run in runs} for key in keys
            if len({store.canonical_json(flat[run].get(key)) for run in runs}) > 1}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def index_html(plan: ComparisonPlan, listing: dict, differing: dict[str, dict[str, Any]]) -> str:
    """A static page: the grid pages, the axes, the fixed settings, the runs' differing settings and
    every cell (image, coordinates, score)."""
    e = html.escape
    runs = plan.axes["runs"].values
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(plan.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "img.grid{max-width:100%;border:1px solid #eee}img.cell{width:96px;image-rendering:pixelated}</style>",
             f"</head><body><h1>Comparison {e(plan.name)}</h1>"]
    parts += [f"<p><a href='{e(f)}'><img class='grid' src='{e(f)}' alt='{e(f)}'></a></p>" for f in listing["pages"]]
    parts.append("<h2>Axes</h2><table><tr><th>axis</th><th>placed</th><th>values</th></tr>")
    for axis in AXES:
        where = next((k for k, names in listing["layout"].items() if axis in names), "fixed")
        parts.append(f"<tr><td>{e(axis)}</td><td>{e(where)}</td><td>{e(' · '.join(plan.axes[axis].labels))}</td></tr>")
    parts.append("</table><h2>Runs: settings that differ</h2>")
    if differing:
        parts.append("<table><tr><th>setting</th>" + "".join(f"<th>{e(r)}</th>" for r in runs) + "</tr>")
        parts += ["<tr><td>" + e(key) + "</td>" + "".join(f"<td>{e(_show(values[r]))}</td>" for r in runs) + "</tr>"
                  for key, values in differing.items()]
        parts.append("</table>")
    else:
        parts.append("<p>" + ("One run." if len(runs) == 1 else "The runs' resolved configs are the same.") + "</p>")
    parts.append("<h2>Cells</h2><table><tr><th>image</th><th>run</th><th>epoch</th><th>strength</th><th>TE</th>"
                 "<th>prompt</th><th>seed</th><th>base</th><th>sampler</th><th>steps</th><th>cfg</th><th>blocks</th>"
                 "<th>score</th></tr>")
    for cell in listing["cells"]:
        image = f"<img class='cell' src='{e(cell['image'])}'>" if cell.get("image") else "not saved"
        values = [cell[k] for k in ("run", "epoch", "strength", "te_strength", "prompt", "seed", "base", "sampler",
                                    "steps", "cfg", "block_weights", "score")]
        parts.append(f"<tr><td>{image}</td>" + "".join(f"<td>{e(_show(v))}</td>" for v in values) + "</tr>")
    parts.append("</table><p>Written by lorabake; cells.json lists the same cells.</p></body></html>")
    return "\n".join(parts)


def _show(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
