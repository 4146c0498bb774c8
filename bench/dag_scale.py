"""How long Snakemake takes to parse and plan a farm-sized lorabake project, and what it replans.

Builds a synthetic project (20,000 tiny images with captions over 5 datasets, 20 runs, samples, a
merge and an extraction) around a copy of the repo's Snakefile and workflow/, puts it in a "built"
state without training anything, then times `snakemake -n all` in that state:

- warm: nothing changed since the last parse, the scan cache is there (what a user meets);
- cold: the scan cache (`results/cache/scan/`) deleted, so every image is decoded and hashed again
  (the OS page cache stays warm: this is a cold scan cache, not a cold disk);
- caption edit: one caption's tags changed; the dry run must plan exactly the dataset's report and
  each run using the dataset with its downstream jobs (samples, merges, extracts), nothing else;
- caption touch: one caption's mtime changed only; nothing must be planned.
Besides: `snakemake --version` (interpreter start and Snakemake's imports, the floor under every
time), `snakemake --list-rules` (parses the Snakefile, lorabake's scans included, builds no DAG),
and lorabake's own parse work in process (Workspace.load and the scans common.smk does).

"Built" state: every output is created as an empty placeholder (a folder where the name has no
suffix — the workflow's `directory()` outputs — a file otherwise), then `snakemake --touch
--forceall all` touches them in DAG order and records each job's metadata (params, input list,
code) as a finished job would. Snakemake refuses a placeholder of the wrong kind there, so a wrong
guess fails loudly. Dataset files are back-dated by a day, as a real dataset is older than the
parse reading it (the scan cache does not trust files modified within seconds of a scan).

Each time is a whole `snakemake` process, as wall-clock and as CPU seconds (user + system): other
work on the machine inflates the first, hardly the second. The load average is recorded per row.

    .venv/bin/python bench/dag_scale.py [--dir DIR] [--images 20000] [--runs 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
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
MARKER = ".dag-scale-project"  # in a project this script built, which it may reuse


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


def copy_workflow(dest: Path, source: Path = REPO) -> None:
    shutil.copy2(source / "Snakefile", dest / "Snakefile")
    shutil.rmtree(dest / "workflow", ignore_errors=True)
    shutil.copytree(source / "workflow", dest / "workflow")


def make_project(dest: Path, images: int, runs: int, workflow: Path = REPO, seed: int = 0) -> Path:
    """A Snakefile and workflow/ (the repo's) with a synthetic configs/ and datasets/."""
    dest.mkdir(parents=True)
    copy_workflow(dest, workflow)
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


def venv_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def timed_process(command: list[str], cwd: Path) -> tuple[dict, str]:
    """Wall-clock and CPU seconds of one process, and its output; a failure raises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}, result.stdout + result.stderr


def snakemake(project: Path, *args: str) -> tuple[dict, str]:
    return timed_process([*snakemake_command(), "-j1", *args], project)


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
    _, text = snakemake(project, "-n", "--forceall", "all")  # every job, done or not
    jobs = planned_jobs(text)
    for _, _, outputs in jobs:
        for output in outputs:
            path = project / output
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
    snakemake(project, "--touch", "--forceall", "all")
    no_op_dry_run(project)
    return len(jobs)


# --------------------------------------------------------------------------------------------
# measurements

WORKSPACE_LOAD = """
import time; start, cpu = time.perf_counter(), time.process_time()
from lorabake.workspace import Workspace
ws = Workspace.load("configs/config.yaml")
for name in ws.project.file.datasets: ws.dataset(name)
for run in ws.project.runs: ws.run_datasets(run)
print(time.perf_counter() - start, time.process_time() - cpu)
"""


def workspace_load(project: Path) -> tuple[dict, str]:
    """lorabake's share of a parse, timed inside the process: what common.smk does first."""
    _, text = timed_process([venv_python(), "-c", WORKSPACE_LOAD], project)
    wall, cpu = map(float, text.split()[-2:])
    return {"wall_s": wall, "cpu_s": cpu}, text


def timed(label: str, measurement, repeat: int) -> dict:
    """Run `measurement` (giving ({wall_s, cpu_s}, output)) `repeat` times: each time, medians, minima."""
    times = [measurement()[0] for _ in range(repeat)]
    row = {"label": label, "load_average": round(os.getloadavg()[0], 2)}
    for key in ("wall_s", "cpu_s"):
        values = [t[key] for t in times]
        row[key] = [round(v, 3) for v in values]
        row[f"median_{key}"] = round(statistics.median(values), 3)
        row[f"min_{key}"] = round(min(values), 3)
    return row


def no_op_dry_run(project: Path) -> tuple[dict, str]:
    times, text = snakemake(project, "-n", "all")
    if planned_jobs(text):
        raise RuntimeError(f"expected nothing to do, the dry run plans:\n{text[-3000:]}")
    return times, text


def cold_dry_run(project: Path) -> tuple[dict, str]:
    shutil.rmtree(project / "results" / "cache" / "scan", ignore_errors=True)
    return no_op_dry_run(project)


def expected_after_caption_edit(dataset: str, runs: int) -> set[tuple[str, str]]:
    """What a caption edit in `dataset` must replan: its report (which shows the tags), and each run
    using it with everything downstream (its samples, merges of it, extracts of those)."""
    trained = {name for name, run in run_configs(runs).items() if dataset in run["datasets"]}
    config = project_config()
    merged = {m["name"] for m in config["merges"] if trained & {lora["run"] for lora in m["loras"]}}
    extracted = {e["name"] for e in config["extracts"] if e["tuned"] in merged}
    return ({("dataset_report", dataset)} | {("train", run) for run in trained}
            | {("sample_grid", run) for run in trained} | {("merge", name) for name in merged}
            | {("extract", name) for name in extracted})


def rounded(times: dict) -> dict:
    return {key: round(value, 3) for key, value in times.items()}


def caption_edit(project: Path, dataset: str, runs: int) -> dict:
    """Add a tag to one caption, dry-run, and put the caption back (the project stays built)."""
    edited = next((project / "datasets" / dataset).glob("10_*/*.txt"))
    original = edited.read_text()
    edited.write_text(original.strip() + ", edited\n")
    try:
        times, text = snakemake(project, "-n", "all")
    finally:
        edited.write_text(original)
    planned = {(rule, next(iter(wildcards.values()), "")) for rule, wildcards, _ in planned_jobs(text)}
    expected = expected_after_caption_edit(dataset, runs)
    return {**rounded(times), "edited": str(edited.relative_to(project)), "planned": sorted(map(list, planned)),
            "exactly_the_affected_jobs": planned == expected,
            "missing": sorted(map(list, expected - planned)), "unexpected": sorted(map(list, planned - expected))}


def caption_touch(project: Path) -> dict:
    os.utime(next((project / "datasets" / DATASETS[0]).glob("5_*/*.txt")))
    times, text = snakemake(project, "-n", "all")
    return {**rounded(times), "jobs_planned": len(planned_jobs(text))}


def measure(project: Path, repeat: int, runs: int) -> dict:
    return {
        "floor": timed("snakemake --version", lambda: snakemake(project, "--version"), repeat),
        "workspace": timed("Workspace.load + scans (warm cache)", lambda: workspace_load(project), repeat),
        "parse": timed("snakemake --list-rules (warm cache)", lambda: snakemake(project, "--list-rules"), repeat),
        "warm": timed("no-op dry run, warm scan cache", lambda: no_op_dry_run(project), repeat),
        "cold": timed("no-op dry run, cold scan cache", lambda: cold_dry_run(project), 1),
        "caption_edit": caption_edit(project, DATASETS[2], runs),
        "caption_touch": caption_touch(project),
    }


# --------------------------------------------------------------------------------------------
# report

def table(result: dict) -> str:
    header = f"{'measurement':<40} {'wall s':>7} {'cpu s':>7}  (medians; load avg)"
    lines = [header, "-" * len(header)]
    for key in ("floor", "workspace", "parse", "warm", "cold"):
        row = result[key]
        lines.append(f"{row['label']:<40} {row['median_wall_s']:>7.2f} {row['median_cpu_s']:>7.2f}"
                     f"  ({row['load_average']})")
    edit, touch = result["caption_edit"], result["caption_touch"]
    lines.append(f"{'dry run after one caption edit':<40} {edit['wall_s']:>7.2f} {edit['cpu_s']:>7.2f}")
    lines.append(f"{'dry run after one caption touch':<40} {touch['wall_s']:>7.2f} {touch['cpu_s']:>7.2f}")
    planned = ", ".join(f"{rule}({key})" for rule, key in edit["planned"])
    verdict = "yes" if edit["exactly_the_affected_jobs"] else f"NO: missing {edit['missing']}, unexpected {edit['unexpected']}"
    lines.append(f"\ncaption edit in {edit['edited']} plans: {planned}")
    lines.append(f"  exactly the affected jobs: {verdict}")
    lines.append(f"caption touch plans {touch['jobs_planned']} jobs")
    return "\n".join(lines)


def prepare(project: Path, images: int, runs: int, workflow: Path) -> dict:
    """Build the synthetic project (or refresh the workflow of one built before) and settle it."""
    start = time.perf_counter()
    reused = (project / MARKER).exists()
    if reused:
        copy_workflow(project, workflow)
        shape = json.loads((project / MARKER).read_text())
    else:
        make_project(project, images, runs, workflow)
        shape = {"images": images, "runs": runs}
        (project / MARKER).write_text(json.dumps(shape))
    generated = None if reused else round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    jobs = settle(project)
    return {**shape, "datasets": len(DATASETS), "jobs_in_dag": jobs, "reused_project": reused,
            "generate_s": generated, "settle_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="build the project here and keep it, or reuse the one a previous "
                        "run built there (its Snakefile and workflow/ are refreshed); default: a temp dir")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workflow", type=Path, default=REPO,
                        help="take Snakefile and workflow/ from here, to try a change to the rules (default: the repo)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = None if args.dir else tempfile.mkdtemp(prefix="lorabake-dag-scale-")
    project = args.dir or Path(workdir) / "project"
    try:
        shape = prepare(project, args.images, args.runs, args.workflow.resolve())
        result = {**shape, "workflow": str(args.workflow.resolve()), "cpus": os.cpu_count(), "python": platform.python_version(),
                  "snakemake": snakemake(project, "--version")[1].strip(),
                  "lorabake_commit": subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                                    capture_output=True, text=True).stdout.strip(),
                  **measure(project, args.repeat, shape["runs"])}
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
