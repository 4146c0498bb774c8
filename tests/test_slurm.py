"""The demo workflow on a real single-node SLURM (scripts/slurm-local.sh + profiles/slurm-local/).

Every job goes through sbatch and slurmd (Slurm's own records say so, with the rule of each job),
a GPU request reaches the scheduler, and the LoRAs are byte-identical to a local `snakemake -j1 all`.
The farm build runs while the session's local reference build (`built_project`) is made, so the
two share the machine's cores instead of taking turns.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_project, planned_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

SCRIPT = REPO / "scripts" / "slurm-local.sh"
PROFILE = REPO / "profiles" / "slurm-local"
# A guard against a hung build, not a speed target: the farm build takes ~3.5 min on an idle 2-core
# machine and ran past 8 min on a busy CI one (its jobs share the cores with the local build).
BUILD_TIMEOUT_S = 1500


def cannot_run_slurm() -> str | None:
    if os.geteuid() != 0:
        return "needs root: scripts/slurm-local.sh installs Slurm with apt-get and starts its daemons"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "needs apt-get to install Debian's slurmctld, slurmd and munge"
    return None


def slurm_local(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM; stopped afterwards unless it was already up before the tests."""
    reason = cannot_run_slurm()
    if reason:
        pytest.skip(reason)
    was_running = slurm_local("status").returncode == 0
    started = slurm_local("start")
    assert started.returncode == 0, f"slurm-local.sh start failed:\n{started.stdout}\n{started.stderr}"
    yield
    if not was_running:
        slurm_local("stop")


# Session scope so that pytest starts it before the session fixture `built_project`.
@pytest.fixture(scope="session")
def farm_build(slurm_cluster, tmp_path_factory):
    """A fresh demo project being built through SLURM in the background:
    (project, snakemake process, its log file, the jobs a dry run plans)."""
    project = make_project(tmp_path_factory.mktemp("slurm") / "project")
    expected = planned_jobs(project)
    log = project.parent / "snakemake.log"
    # train asks for a GPU here whatever the rule declares, so the gpu -> --gpus mapping is exercised.
    command = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "all",
               "--set-resources", "train:gpu=1"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=project, stdout=out, stderr=subprocess.STDOUT)
    yield project, process, log, expected
    if process.poll() is None:
        process.kill()


def finished_build(farm_build) -> tuple[Path, list]:
    project, process, log, expected = farm_build
    try:
        returncode = process.wait(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"farm build still running after {BUILD_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert returncode == 0, f"farm build failed:\n{log.read_text()[-6000:]}"
    return project, expected


def slurm_jobs_of(project: Path) -> dict[str, dict[str, str]]:
    """Slurm's own record (squeue keeps finished jobs for MinJobAge) of the jobs run in `project`:
    job id -> state, GPUs asked, and comment (the plugin writes rule_<rule>_wildcards_<values>)."""
    fields = "JobID:|,State:|,tres-per-job:|,WorkDir:|,Comment:"  # ':|' = no padding, '|' after
    out = subprocess.run(["squeue", "--states=all", "--noheader", "-O", fields],
                         capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, gpus, workdir, comment = line.split("|", 4)
        if workdir == str(project):
            jobs[job_id] = {"state": state, "gpus": gpus, "comment": comment}
    return jobs


def rule_of(comment: str) -> str:
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def completion_records() -> dict[str, str]:
    """jobcomp/filetxt's file (JobCompLoc): job id -> its line, written by slurmctld as jobs end."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True)
    location = next(line.split("=", 1)[1].strip() for line in config.stdout.splitlines()
                    if line.startswith("JobCompLoc"))
    lines = Path(location).read_text().splitlines()
    return {line.split()[0].removeprefix("JobId="): line for line in lines if line.startswith("JobId=")}


def test_every_job_goes_through_slurm(farm_build, built_project):
    project, expected = finished_build(farm_build)
    jobs = slurm_jobs_of(project)
    assert sorted(rule_of(job["comment"]) for job in jobs.values()) == sorted(rule for rule, _ in expected)
    assert all(job["state"] == "COMPLETED" for job in jobs.values()), jobs
    runs = {w["run"] for rule, w in expected if rule == "train"}
    assert {job["comment"] for job in jobs.values() if rule_of(job["comment"]) == "train"} \
        == {f"rule_train_wildcards_{run}" for run in runs}
    assert any(rule_of(job["comment"]) == "cache_latents" for job in jobs.values())
    records = completion_records()
    for job_id in jobs:
        assert "JobState=COMPLETED " in records[job_id] and f" WorkDir={project} " in records[job_id]


def test_gpu_resource_reaches_the_scheduler(farm_build, built_project):
    project, _ = finished_build(farm_build)
    gpus_by_rule = {}
    for job in slurm_jobs_of(project).values():
        gpus_by_rule.setdefault(rule_of(job["comment"]), set()).add(job["gpus"])
    assert gpus_by_rule["train"] == {"gres:gpu:1"}
    assert gpus_by_rule["dataset_report"] == {"N/A"}


def test_farm_loras_are_byte_identical_to_a_local_build(farm_build, built_project):
    project, _ = finished_build(farm_build)
    local = sorted(p.relative_to(built_project) for p in built_project.glob("results/runs/*/*.safetensors"))
    farm = sorted(p.relative_to(project) for p in project.glob("results/runs/*/*.safetensors"))
    assert farm == local and len(local) == 3
    for path in local:
        assert (project / path).read_bytes() == (built_project / path).read_bytes(), path
