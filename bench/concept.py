"""Which settings teach the demo concept fastest: concept score and loss against steps, on the CPU.

    .venv/bin/python bench/concept.py                    # 4 algos × 2 optimizers × 2 dims, 240 steps each
    .venv/bin/python bench/concept.py --steps 80 --every 40 --algos lora --optimizers adamw   # a smoke run

Every run trains the shipped demo dataset (12 stars, `datasets/demo`) on the `toy-shapes` base, a
base that never saw a star, with the demo's defaults (configs/config.yaml) and one change each:
the network algo (lora: linear layers only; locon, loha, lokr: convs too, at conv_dim = dim), the
optimizer and the dim. A LoRA file is written every `--every` steps; each is
applied at strength 1 to the demo's sample prompts, rendered with a few seeds, and the shipped
concept scorer says how much the images show a star (0..1, the mean over the images). The loss
column is the mean training loss over the steps since the previous file.

Writes bench/results/concept.json (every number, the settings, the wall time of each run) and
bench/results/concept.png (score against steps, one line per run), and prints the table that
bench/README.md shows. Training runs in this process, through lorabake's own CLI entry points.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabake import cli, paths, store  # noqa: E402
from lorabake.prompts import Prompt, parse_prompt  # noqa: E402
from lorabake.render import cells, plots, scorer  # noqa: E402
from lorabake.workspace import Workspace  # noqa: E402

RESULTS = REPO / "bench" / "results"
ALGOS = ("lora", "locon", "loha", "lokr")
OPTIMIZERS = {"adamw": None, "prodigy": 1.0}  # None: the demo's own learning rate
DIMS = (4, 8)
SEEDS = (0, 1, 2)


def make_project(root: Path) -> Path:
    """The shipped demo's bases, dataset, defaults and samples; no runs, merges or extracts."""
    shipped = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    shutil.copytree(REPO / "datasets" / "demo", root / "datasets" / "demo")
    (root / "configs" / "runs").mkdir(parents=True)
    config = {key: shipped[key] for key in ("bases", "datasets", "defaults", "samples")}
    (root / "configs" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "configs" / "config.yaml"


def run_name(algo: str, optimizer: str, dim: int) -> str:
    return f"{algo}-{optimizer}-d{dim}"


def run_overrides(algo: str, optimizer: str, dim: int, steps: int, every: int, lr: float | None) -> dict:
    # lora: linear layers only (kohya's lora without conv_dim); the others train the convs too,
    # at conv_dim = dim (the demo's defaults set conv layers, which every run here replaces)
    net = {"algo": algo, "dim": dim, "alpha": dim, "conv_dim": None if algo == "lora" else dim,
           "conv_alpha": None if algo == "lora" else dim}
    if algo == "lokr":
        net["factor"] = 4
    opt = {"type": optimizer} | ({"lr": lr} if lr is not None else {})
    if optimizer == "prodigy":  # one step size for all parameters: no separate text-encoder lr
        opt["text_encoder_lr"] = None
    return {"network": net, "optimizer": opt, "training": {"max_steps": steps, "epochs": steps},  # steps decide
            "save": {"every_n_epochs": None, "every_n_steps": every, "precision": "fp32"}}


def checkpoint_file(run: str, step: int, steps: int) -> Path:
    """The file written at `step`: a steps/ file, or the run's LoRA for the last step (kohya's rule:
    the final save is the run's file, not a step file)."""
    return Path(paths.run_lora(run) if step == steps else paths.step_lora(run, step))


def mean_losses(records: list[dict], checkpoints: list[int]) -> dict[int, float]:
    """The mean loss over the steps since the previous checkpoint, per checkpoint."""
    found, previous = {}, 0
    for step in checkpoints:
        window = [r["loss"] for r in records if previous < r["step"] <= step and "loss" in r]
        found[step] = round(sum(window) / len(window), 5) if window else None
        previous = step
    return found


class Judge:
    """Renders the demo prompts with a LoRA at strength 1 over SEEDS and scores them."""

    def __init__(self, ws: Workspace):
        samples = ws.project.file.samples
        run_size = next(iter(ws.project.runs.values())).size
        defaults = Prompt("", "", run_size[0], run_size[1], samples.seed, samples.cfg, samples.steps)
        self.prompts = [parse_prompt(line, defaults) for line in samples.prompts]
        self.concept = samples.concept
        self.pipe = cells.load_pipeline(ws.project.root / paths.base_dir(ws.project.file.defaults["base"]),
                                        samples.sampler)

    def score(self, lora: Path | None) -> float:
        images = []
        with cells.lora_applied(self.pipe, lora, 1.0):
            for prompt in self.prompts:
                images += cells.render_batch(self.pipe, [replace(prompt, seed=prompt.seed + seed) for seed in SEEDS])
        values = scorer.scores(images, self.concept)
        return round(sum(values) / len(values), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    parser.add_argument("--lr", type=float, default=None, help="AdamW's learning rate (default: the demo's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the demo's)")
    parser.add_argument("--scheduler", default=None, help="lr scheduler type (default: the demo's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        config = make_project(Path(tmp))
        os.chdir(tmp)
        run = lambda *a: cli.main(["--config", str(config), *a]) == 0 or sys.exit(f"lorabake {' '.join(a)} failed")  # noqa: E731
        combos = [(a, o, d) for a in args.algos for o in args.optimizers for d in args.dims]
        for algo, optimizer, dim in combos:
            lr = args.lr if optimizer == "adamw" and args.lr is not None else OPTIMIZERS[optimizer]
            overrides = run_overrides(algo, optimizer, dim, args.steps, args.every, lr)
            if args.batch:
                overrides["training"]["batch_size"] = args.batch
            if args.scheduler:
                overrides["scheduler"] = {"type": args.scheduler}
            (Path(tmp) / "configs" / "runs" / f"{run_name(algo, optimizer, dim)}.yaml").write_text(yaml.safe_dump(overrides))
        ws = Workspace.load(config)
        run("base", "--base", ws.project.file.defaults["base"])
        for dataset, spec in ws.latent_jobs:
            run("cache-latents", "--dataset", dataset, "--spec", spec)
        judge = Judge(ws)
        baseline = judge.score(None)
        print(f"base alone: {judge.concept} score {baseline:.3f}", flush=True)
        rows = []
        for algo, optimizer, dim in combos:
            name, began = run_name(algo, optimizer, dim), time.monotonic()
            run("train", "--run", name)
            train_s = time.monotonic() - began
            checkpoints = list(range(args.every, args.steps + 1, args.every))
            scores = {0: baseline, **{s: judge.score(checkpoint_file(name, s, args.steps)) for s in checkpoints}}
            records = [json.loads(line) for line in Path(paths.train_log(name)).read_text().splitlines()]
            rows.append({"run": name, "algo": algo, "optimizer": optimizer, "dim": dim, "train_s": round(train_s, 1),
                         "scores": scores, "losses": mean_losses(records, checkpoints)})
            print(f"{name}: scores {scores} ({train_s:.0f} s of training)", flush=True)
    report = {"concept": judge.concept, "steps": args.steps, "every": args.every, "seeds": list(SEEDS),
              "prompts": [p.text for p in judge.prompts], "baseline": baseline, "rows": rows,
              "wall_s": round(time.monotonic() - start, 1), "torch_threads": torch.get_num_threads(),
              "commit": commit()}
    args.out.mkdir(parents=True, exist_ok=True)
    store.write_json(args.out / "concept.json", report)
    plot(report, args.out / "concept.png")
    print(table(report))


def commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def table(report: dict) -> str:
    """The README table (from a fresh report or one read back from concept.json: string step keys)."""
    report = {**report, "rows": [{**row, "scores": {int(k): v for k, v in row["scores"].items()},
                                  "losses": {int(k): v for k, v in row["losses"].items()}} for row in report["rows"]]}
    steps = sorted({s for row in report["rows"] for s in row["scores"]} - {0})
    head = "| run | " + " | ".join(f"score @{s}" for s in steps) + " | loss (last) | train s |"
    lines = [head, "|" + " --- |" * (len(steps) + 3)]
    for row in sorted(report["rows"], key=lambda r: -r["scores"][steps[-1]]):
        last_loss = row["losses"][steps[-1]]
        lines.append(f"| {row['run']} | " + " | ".join(f"{row['scores'][s]:.2f}" for s in steps)
                     + f" | {last_loss:.4f} | {row['train_s']:.0f} |")
    return "\n".join(lines)


ALGO_COLOURS = {"lora": "#4C72B0", "locon": "#DD8452", "loha": "#55A868", "lokr": "#C44E52"}


def plot(report: dict, out: Path) -> None:
    """Score against steps: colour = algo, line = optimizer (solid AdamW, dashed Prodigy), marker = dim."""
    figure, axes = plots.plt.subplots(figsize=(9.0, 4.8))
    dims = sorted({row["dim"] for row in report["rows"]})
    for row in report["rows"]:
        scores = {int(step): value for step, value in row["scores"].items()}
        steps = sorted(scores)
        axes.plot(steps, [scores[s] for s in steps], color=ALGO_COLOURS[row["algo"]], label=row["run"],
                  linestyle="-" if row["optimizer"] == "adamw" else "--",
                  marker="os^D"[dims.index(row["dim"]) % 4], markersize=4)
    axes.set_xlabel("training step")
    axes.set_ylabel(f"{report['concept']} score at strength 1")
    axes.set_ylim(0, 1)
    axes.set_title(f"demo concept '{report['concept']}' on toy-shapes (mean of {len(report['prompts'])} prompts "
                   f"x {len(report['seeds'])} seeds)", fontsize=10)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    plots._save(figure, out)


if __name__ == "__main__":
    main()
