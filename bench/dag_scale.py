"""How long Snakemake takes to parse and plan a farm-sized lorabake project, and what it replans.

Builds a synthetic project (20,000 tiny images with captions over 5 datasets, 20 runs, samples, a
merge and an extraction) around a copy of the repo's Snakefile and workflow/, puts it in a "built"
state without training anything, then times `snakemake -n` in that state:

- cold: no scan cache (`results/cache/scan/` deleted), so every image is decoded and hashed;
- warm: the scan cache from a previous parse, nothing changed (the no-op dry run a user meets);
- caption edit: one caption's tags changed; the dry run must schedule `train` for exactly the runs
  using that dataset, plus their downstream jobs (samples, merges, extracts) and nothing else;
- caption touch: one caption's mtime changed only; nothing must be scheduled.

"Built" state: every output is created as an empty placeholder (a folder where the name has no
suffix — the workflow's `directory()` outputs — a file otherwise) and then `snakemake --touch all`
touches them in DAG order and records each job's metadata (params, input list, code), exactly as a
finished job would. Snakemake refuses a placeholder of the wrong kind there, so a wrong guess fails
loudly. Dataset files are back-dated by a day, as a real dataset is older than the parse reading it
(the scan cache does not trust files modified within seconds of a scan).

Each time is the wall clock of a whole `snakemake` process (interpreter start, Snakefile parse
with lorabake's dataset scan, DAG build, rerun checks). `parse` is `snakemake --list-rules`, which
parses the Snakefile but builds no DAG; `workspace` is lorabake's own parse-time work measured in
process (Workspace.load and the scans common.smk does).

    .venv/bin/python bench/dag_scale.py [--dir DIR] [--images 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dag_scale.json"
SIZES = [(64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (80, 64), (64, 80), (112, 64)]
DATASETS = [f"set{i}" for i in range(5)]
DAY_NS = 86_400 * 10**9


# --------------------------------------------------------------------------------------------
# the synthetic project

def png_bytes(index: int, rng: random.Random) -> bytes:
    """A tiny PNG whose pixels differ from every other one (colour from the index), size varied."""
    image = Image.new("RGB", rng.choice(SIZES), (index % 256, (index // 256) % 256, (index // 65536) * 40))
    buffer = BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_dataset(root: Path, name: str, count: int, first_index: int, rng: random.Random) -> None:
    """Two concept folders and a small reg folder; most images captioned, some keyword-only."""
    folders = [f"10_{name}_a", f"5_{name}_b", f"reg/1_{name}_class"]
    shares = [count // 2, count - count // 2 - count // 20, count // 20]
    index = first_index
    for folder, share in zip(folders, shares):
        (root / folder).mkdir(parents=True)
        for k in range(share):
            stem = root / folder / f"img_{k:05d}"
            stem.with_suffix(".png").write_bytes(png_bytes(index, rng))
            if k % 10:  # every tenth image trains on its folder's concept alone
                tags = rng.sample(["red", "blue", "square", "round", "plain", "gradient", "small"], 3)
                stem.with_suffix(".txt").write_text(f"{name}, {', '.join(tags)}\n")
            index += 1


def back_date(root: Path, ns_ago: int = DAY_NS) -> None:
    stamp = time.time_ns() - ns_ago
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(stamp, stamp))


def run_configs(count: int) -> dict[str, dict]:
    """Runs over one or two datasets with varied dims, learning rates, sizes and flips; one run
    augments colour, so it reads pixels and takes every image of its dataset as an input."""
    runs = {}
    for i in range(count):
        datasets = [DATASETS[i % 5]] + ([DATASETS[(i + 1) % 5]] if i % 4 == 3 else [])
        run = {"datasets": datasets, "network": {"dim": (4, 8, 16)[i % 3], "alpha": 4},
               "optimizer": {"lr": (1e-4, 2e-4, 5e-4, 1e-3)[i % 4]}, "resolution": (64, 128)[i % 2],
               "augment": {"flip": i % 3 == 0}}
        if i == count - 1:
            run["augment"] = {"color": True}
        runs[f"run{i:02d}"] = run
    return runs


def project_config() -> dict:
    return {
        "bases": {"tiny": {"builtin": "tiny-sd"}},
        "datasets": {name: {"path": f"datasets/{name}"} for name in DATASETS},
        "defaults": {"base": "tiny", "resolution": 128, "buckets": {"enabled": True, "min": 64, "max": 256, "step": 64},
                     "network": {"algo": "lora", "dim": 4, "alpha": 4}, "optimizer": {"type": "adamw", "lr": 1e-4},
                     "training": {"epochs": 2, "batch_size": 4, "seed": 1}, "save": {"every_n_epochs": 1}},
        "samples": {"prompts": ["set0, red square"], "strengths": [0.0, 1.0], "steps": 4},
        "merges": [{"name": "farm-merged", "base": "tiny", "loras": [{"run": "run00"}, {"run": "run01"}]}],
        "extracts": [{"name": "farm-extracted", "tuned": "farm-merged", "base": "tiny", "dim": 4}],
    }


def make_project(dest: Path, images: int, runs: int, seed: int = 0) -> Path:
    """The repo's Snakefile and workflow/ with a synthetic configs/ and datasets/."""
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    shutil.copytree(REPO / "workflow", dest / "workflow")
    (dest / "configs" / "runs").mkdir(parents=True)
    (dest / "configs" / "config.yaml").write_text(yaml.safe_dump(project_config(), sort_keys=False))
    for name, run in run_configs(runs).items():
        (dest / "configs" / "runs" / f"{name}.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    rng = random.Random(seed)
    per_dataset = images // len(DATASETS)
    for i, name in enumerate(DATASETS):
        write_dataset(dest / "datasets" / name, name, per_dataset, i * per_dataset, rng)
    back_date(dest / "datasets")
    return dest


# --------------------------------------------------------------------------------------------
# snakemake

def snakemake_command() -> list[str]:
    venv = REPO / ".venv" / "bin" / "snakemake"
    return [str(venv)] if venv.exists() else [sys.executable, "-m", "snakemake"]


def snakemake(project: Path, *args: str) -> tuple[float, str]:
    """Wall-clock seconds of one snakemake process, and its output; a failure raises."""
    start = time.perf_counter()
    result = subprocess.run([*snakemake_command(), "-j1", *args], cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def planned_jobs(text: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(rule, wildcards, outputs) of every job in a dry run's output, rule `all` left out."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            jobs.append((match[1], {}, []))
        elif jobs and (match := re.fullmatch(r"wildcards: (.*)", line)):
            jobs[-1][1].update(part.split("=", 1) for part in match[1].split(", "))
        elif jobs and (match := re.fullmatch(r"output: (.*)", line)):
            jobs[-1][2].extend(match[1].split(", "))
    return [job for job in jobs if job[0] != "all"]


def settle(project: Path) -> int:
    """Put the project in a built state without running a job (see the module docstring)."""
    _, text = snakemake(project, "-n", "all")
    jobs = planned_jobs(text)
    for _, _, outputs in jobs:
        for output in outputs:
            path = project / output
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
    snakemake(project, "--touch", "all")
    return len(jobs)


# --------------------------------------------------------------------------------------------
# measurements

def workspace_seconds(project: Path) -> float:
    """lorabake's share of a parse: what common.smk does before Snakemake builds the DAG."""
    code = ("import time; t = time.perf_counter()\n"
            "from lorabake.workspace import Workspace\n"
            "ws = Workspace.load('configs/config.yaml')\n"
            "[ws.dataset(d) for d in ws.project.file.datasets]; [ws.run_datasets(r) for r in ws.project.runs]\n"
            "print(time.perf_counter() - t)")
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def timed(label: str, function, repeat: int) -> dict:
    seconds = [function() for _ in range(repeat)]
    return {"label": label, "runs": [round(s, 3) for s in seconds], "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3)}


def no_op_dry_run(project: Path) -> float:
    seconds, text = snakemake(project, "-n", "all")
    if planned_jobs(text):
        raise RuntimeError(f"expected nothing to do, the dry run plans:\n{text[-3000:]}")
    return seconds


def cold_dry_run(project: Path) -> float:
    shutil.rmtree(project / "results" / "cache" / "scan", ignore_errors=True)
    return no_op_dry_run(project)


def edit_caption(project: Path, dataset: str) -> Path:
    caption = next((project / "datasets" / dataset).glob("10_*/*.txt"))
    caption.write_text(caption.read_text().strip() + ", edited\n")
    return caption


def runs_using(dataset: str, runs: int) -> set[str]:
    return {name for name, run in run_configs(runs).items() if dataset in run["datasets"]}


def caption_edit(project: Path, dataset: str, runs: int) -> dict:
    edited = edit_caption(project, dataset)
    seconds, text = snakemake(project, "-n", "all")
    jobs = planned_jobs(text)
    trained = {w["run"] for rule, w, _ in jobs if rule == "train"}
    counts = {rule: sum(1 for r, _, _ in jobs if r == rule) for rule in sorted({r for r, _, _ in jobs})}
    expected = runs_using(dataset, runs)
    return {"seconds": round(seconds, 3), "edited": str(edited.relative_to(project)), "jobs": counts,
            "trained_runs": sorted(trained), "expected_runs": sorted(expected),
            "only_affected_runs": trained == expected,
            "only_train_and_downstream": set(counts) <= {"train", "sample_grid", "merge", "extract"}}


def caption_touch(project: Path) -> dict:
    caption = next((project / "datasets" / DATASETS[0]).glob("5_*/*.txt"))
    os.utime(caption)
    seconds, text = snakemake(project, "-n", "all")
    return {"seconds": round(seconds, 3), "jobs_scheduled": len(planned_jobs(text))}


def measure(project: Path, repeat: int, runs: int) -> dict:
    floor = timed("snakemake --version", lambda: snakemake(project, "--version")[0], repeat)
    cold = timed("cold scan cache, no-op dry run", lambda: cold_dry_run(project), 1)
    warm = timed("warm scan cache, no-op dry run", lambda: no_op_dry_run(project), repeat)
    parse = timed("parse only (--list-rules), warm", lambda: snakemake(project, "--list-rules")[0], repeat)
    workspace = timed("Workspace.load + scans, warm", lambda: workspace_seconds(project), repeat)
    edit = caption_edit(project, DATASETS[2], runs)
    touch = caption_touch(project)
    return {"floor": floor, "cold": cold, "warm": warm, "parse": parse, "workspace": workspace,
            "caption_edit": edit, "caption_touch": touch}


# --------------------------------------------------------------------------------------------
# report

def table(result: dict) -> str:
    rows = [result[key] for key in ("floor", "workspace", "parse", "warm", "cold")]
    lines = [f"{'measurement':<40} {'median s':>9} {'min s':>7}", "-" * 58]
    lines += [f"{row['label']:<40} {row['median_s']:>9.2f} {row['min_s']:>7.2f}" for row in rows]
    edit, touch = result["caption_edit"], result["caption_touch"]
    lines.append(f"{'dry run after one caption edit':<40} {edit['seconds']:>9.2f}")
    lines.append(f"{'dry run after one caption touch':<40} {touch['seconds']:>9.2f}")
    lines.append(f"\ncaption edit in {edit['edited']} schedules {edit['jobs']}")
    lines.append(f"  trains {edit['trained_runs']}; runs using the dataset: {edit['expected_runs']}; "
                 f"exactly those: {edit['only_affected_runs']}")
    lines.append(f"caption touch schedules {touch['jobs_scheduled']} jobs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="build the project here (must not exist); default: a temp dir")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = None if args.dir else tempfile.mkdtemp(prefix="lorabake-dag-scale-")
    project = args.dir or Path(workdir) / "project"
    try:
        start = time.perf_counter()
        make_project(project, args.images, args.runs)
        generated = time.perf_counter() - start
        jobs = settle(project)
        result = {"images": args.images, "datasets": len(DATASETS), "runs": args.runs, "jobs_in_dag": jobs,
                  "generate_s": round(generated, 1), "cpus": os.cpu_count(), "python": platform.python_version(),
                  **measure(project, args.repeat, args.runs)}
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
