"""End-to-end: `snakemake -j1 all` on the demo project, and DESIGN's rebuild contract row by row."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import planned_jobs, rules_of, runs_of, snakemake

pytestmark = pytest.mark.workflow  # runs Snakemake

EXPECTED = [
    "results/base/tiny/base.json",
    "results/datasets/demo/report.json", "results/datasets/demo/report.md", "results/datasets/demo/buckets.png",
    "results/runs/demo-lora/demo-lora.safetensors", "results/runs/demo-lora/epochs/demo-lora-e0004.safetensors",
    "results/runs/demo-lora/train.jsonl", "results/runs/demo-lora/loss.png", "results/runs/demo-lora/grid.png",
    "results/runs/demo-unet-only/demo-unet-only.safetensors", "results/runs/demo-unet-only/grid.png",
    "results/merged/demo-merged.safetensors", "results/extracted/demo-extracted.safetensors",
    "results/resized/demo-lora-r2.safetensors", "results/resized/demo-lora-r2.json",
    "results/svd-merged/demo-blend.safetensors",
    "results/comparisons/demo-runs/grid.png", "results/comparisons/demo-runs/cells.json",
    "results/comparisons/demo-runs/index.html",
]


def latent_store_files(project: Path) -> set[Path]:
    return set((project / "results" / "cache" / "latents").rglob("*.safetensors"))


def test_all_builds_every_artifact(built_project):
    missing = [p for p in EXPECTED if not (built_project / p).is_file()]
    assert not missing
    indexes = list((built_project / "results" / "latents" / "demo").glob("*/index.json"))
    assert len(indexes) == 2  # demo-lora plain, demo-unet-only with flip


def test_no_change_means_nothing_to_do(built_project):
    out = snakemake(built_project, "-n", "all")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_caption_edit_retrains_only_runs_using_that_dataset(project_copy):
    caption = project_copy / "datasets" / "other" / "2_lbk_other"
    first = sorted(caption.glob("*.txt"))[0]
    first.write_text("lbk_other, square, new tag\n")
    jobs = planned_jobs(project_copy)
    assert "cache_latents" not in rules_of(jobs)
    assert runs_of(jobs) == {"other-run"}


def test_whitespace_edit_and_touch_cost_nothing(project_copy):
    caption = sorted((project_copy / "datasets" / "demo" / "3_lbk_square").glob("*.txt"))[0]
    caption.write_text("  " + caption.read_text().replace(", ", " ,   ") + "\n\n")
    for path in (project_copy / "datasets" / "demo").rglob("*.txt"):
        path.touch()
    assert planned_jobs(project_copy) == []


def test_new_image_is_encoded_alone(project_copy):
    folder = project_copy / "datasets" / "demo" / "5_lbk_circle"
    Image.new("RGB", (128, 128), (200, 30, 30)).save(folder / "new.png")
    (folder / "new.txt").write_text("lbk_circle, red, plain background\n")
    jobs = planned_jobs(project_copy)
    assert {w["ds"] for r, w in jobs if r == "cache_latents"} == {"demo"}
    assert runs_of(jobs) == {"demo-lora", "demo-unet-only"}
    before = latent_store_files(project_copy)
    indexes = [str(p.relative_to(project_copy)) for p in (project_copy / "results/latents/demo").glob("*/index.json")]
    snakemake(project_copy, *indexes)
    added = latent_store_files(project_copy) - before
    assert len(added) == 2  # one entry per flip state: the plain image, and its mirror for the flip run
    assert {p.name.endswith("-flip.safetensors") for p in added} == {True, False}
    logs = " ".join(p.read_text() for p in (project_copy / "logs" / "cache_latents" / "demo").glob("*.log"))
    assert sum(map(int, re.findall(r"encoded (\d+)", logs))) == 2  # whichever job ran first encoded the plain one


def test_lr_change_retrains_one_run(project_copy):
    (project_copy / "configs" / "runs" / "demo-unet-only.yaml").write_text(
        "network: {train_text_encoder: false, dim: 8, alpha: 4}\noptimizer: {lr: 1.0e-3}\n"
        "scheduler: {type: cosine, warmup: 0.1}\naugment: {flip: true}\n")
    jobs = planned_jobs(project_copy)
    assert runs_of(jobs) == {"demo-unet-only"}
    assert rules_of(jobs) == {"train", "sample_grid", "svd_merge", "comparison"}  # the blend and comparison use it


def test_prompt_change_rerenders_grids_only(project_copy):
    config = project_copy / "configs" / "config.yaml"
    config.write_text(config.read_text().replace("red circle, plain background", "red circle, white background"))
    jobs = planned_jobs(project_copy)
    assert rules_of(jobs) == {"sample_grid", "comparison"}
    assert runs_of(jobs, "sample_grid") == {"demo-lora", "demo-unet-only", "other-run"}


def cached_cells(project: Path) -> set[str]:
    return {p.stem for p in (project / "results" / "cache" / "cells").rglob("*.png")}


def test_an_added_prompt_renders_exactly_its_new_cells(project_copy):
    """No training; each grid job renders the pictures of the new prompt the cell cache lacks (its
    strength-0 picture is shared by every run's grid) and reuses every other."""
    config = project_copy / "configs" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["samples"]["prompts"].append("lbk_circle, green circle --d 3")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    jobs = planned_jobs(project_copy)
    assert "train" not in rules_of(jobs) and rules_of(jobs) == {"sample_grid", "comparison"}
    targets = [(f"results/runs/{run}/grid.png", f"results/runs/{run}/scores.json", f"logs/sample_grid/{run}.log")
               for run in sorted(runs_of(jobs, "sample_grid"))]
    targets.append(("results/comparisons/demo-runs", "results/comparisons/demo-runs/cells.json",
                    "logs/comparison/demo-runs.log"))
    for target, listing, log in targets:
        before = cached_cells(project_copy)
        snakemake(project_copy, target)
        cells = json.loads((project_copy / listing).read_text())["cells"]
        keys = {cell["key"] for cell in cells}
        new = {cell["key"] for cell in cells if cell["prompt"].startswith("lbk_circle, green circle")}
        rendered, reused = map(int, re.findall(r"rendered (\d+), reused (\d+)", (project_copy / log).read_text())[-1])
        assert rendered == len(new - before) == len(cached_cells(project_copy) - before), target
        assert reused == len(keys) - rendered and reused >= len(keys - new) > 0, target
    assert planned_jobs(project_copy) == []


def test_comment_edit_rebuilds_nothing(project_copy):
    for path in [project_copy / "Snakefile", *(project_copy / "workflow" / "rules").glob("*.smk"),
                 project_copy / "configs" / "config.yaml", *(project_copy / "configs" / "runs").glob("*.yaml")]:
        path.write_text("# an edited comment\n" + path.read_text())
    assert planned_jobs(project_copy) == []


def test_training_really_learns(built_project):
    records = [json.loads(line) for line in (built_project / "results/runs/demo-lora/train.jsonl").read_text().splitlines()]
    epochs = sorted({r["epoch"] for r in records})
    mean = {e: sum(r["loss"] for r in records if r["epoch"] == e) / sum(r["epoch"] == e for r in records) for e in epochs}
    assert mean[epochs[-1]] < mean[epochs[0]]


def test_lora_strength_changes_samples(built_project):
    samples = built_project / "results/runs/demo-lora/samples"
    base = Image.open(samples / "p0-epoch4-s0.png").tobytes()
    full = Image.open(samples / "p0-epoch4-s1.png").tobytes()
    assert base != full


def test_sweep_adds_one_train_job_per_point_and_pixel_runs_need_no_latents(project_copy):
    (project_copy / "configs/runs/sw.yaml").write_text("sweep: {network.dim: [2, 6]}\n")
    (project_copy / "configs/runs/colors.yaml").write_text("augment: {color: true}\n")
    jobs = planned_jobs(project_copy)
    assert runs_of(jobs) == {"sw-dim_2", "sw-dim_6", "colors"}
    assert "cache_latents" not in rules_of(jobs)  # the sweep reuses the cache; colors reads pixels
