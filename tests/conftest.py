"""Shared fixtures: a copy of the demo project built once per session, and Snakemake helpers."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The tests' project: the tiny-sd demo (circles and squares at 128 px) that the suite's assertions are
# written against. The shipped demo (configs/, datasets/ at the repo root) is the toy-shapes one.
FIXTURE = REPO / "tests" / "fixtures" / "project"


# The files of the tests that run Snakemake (marker `workflow`), in two groups. With pytest-xdist each
# group goes to one worker, which builds the session's demo project once (the farm build of
# test_slurm.py overlaps that build); every other test goes to whichever worker is free. One group
# of all five took 15 min on 2 cores, the suite's whole wall time, while the other worker idled.
# (xdist's own `loadgroup` does not group under pytest 9.2, which ignores the node ids it edits.)
WORKFLOW_GROUPS = {"tests/test_slurm.py": "workflow-farm", "tests/test_artifacts.py": "workflow-farm",
                   "tests/test_workflow.py": "workflow-local", "tests/test_bad_input.py": "workflow-local",
                   "tests/test_faults.py": "workflow-local"}
WORKFLOW_FILES = frozenset(WORKFLOW_GROUPS)
# Files whose module fixture trains or builds for a minute: each goes to one worker whole, so that the
# fixture is made once, not once per worker its tests would spread over.
MODULE_GROUPS = frozenset({"tests/models/test_checkpoints.py", "tests/tools/test_ema.py",
                           "tests/train/test_masked_training.py", "tests/models/test_sdxl_blocks.py"})


def pytest_collection_modifyitems(items):
    """A `workflow` test outside WORKFLOW_GROUPS would build the demo project on yet another worker.
    The farm tests go first, so that the farm build (minutes, in the background) starts with the
    session and overlaps the local build instead of following the other farm-group tests."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if item.get_closest_marker("workflow") and path not in WORKFLOW_FILES:
            raise pytest.UsageError(f"{item.nodeid} runs Snakemake: add {path} to WORKFLOW_GROUPS in tests/conftest.py")
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_slurm.py"))


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class WorkflowTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return WORKFLOW_GROUPS.get(path, path if path in MODULE_GROUPS else nodeid)

    return WorkflowTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process tests run torch on one thread: the tiny models' ops are too small to share, and on
    two busy cores OpenMP's waiting threads made a 4-step run take 40 s instead of 1 s (measured).
    Workflow tests run `lorabake` under Snakemake, which pins OMP_NUM_THREADS per rule itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_project(dest: Path) -> Path:
    """A self-contained copy of the repo's demo project (its own Snakefile, rules, configs, datasets)
    plus a second dataset `other` used by one extra run, so "only the runs using A" is observable."""
    dest.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "configs", "datasets"):
        src = (FIXTURE if name in ("configs", "datasets") else REPO) / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    other = dest / "datasets" / "other" / "2_lbk_other"
    other.mkdir(parents=True)
    for image in sorted((FIXTURE / "datasets" / "demo" / "3_lbk_square").glob("*.png"))[:2]:
        shutil.copy2(image, other / image.name)
        (other / image.with_suffix(".txt").name).write_text("lbk_other, square\n")
    config = yaml.safe_load((dest / "configs" / "config.yaml").read_text())
    config["datasets"]["other"] = {"path": "datasets/other"}
    (dest / "configs" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dest / "configs" / "runs" / "other-run.yaml").write_text(
        "datasets: [other]\ntraining: {epochs: 2, batch_size: 1}\n")
    return dest


_running: list = []  # the test now running (set by the autouse fixture below)


@pytest.fixture(autouse=True)
def _current_test(request):
    _running[:] = [request.node]
    yield
    _running.clear()


def snakemake(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run Snakemake in `project`. Only tests marked `workflow` may: `pytest -m "not workflow"` is the
    fast suite, and a test that forgets the marker fails here instead of slowing it down."""
    if _running and _running[0].get_closest_marker("workflow") is None:
        raise AssertionError(f"{_running[0].nodeid} runs Snakemake: mark it with pytest.mark.workflow")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-j1", *args], cwd=project,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(project: Path, *targets: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run of `all` would run, rule `all` excluded."""
    out = snakemake(project, "-n", *(targets or ("all",)))
    text = out.stdout + out.stderr
    jobs, rule = [], None
    for line in text.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if match:
            rule = match[1]
            if rule != "all":
                jobs.append((rule, {}))
            continue
        match = re.match(r"^wildcards: (.*)$", line.strip())
        if match and rule != "all" and jobs:
            jobs[-1][1].update(dict(part.split("=", 1) for part in match[1].split(", ")))
    return jobs


def rules_of(jobs) -> set[str]:
    return {rule for rule, _ in jobs}


def runs_of(jobs, rule: str = "train") -> set[str]:
    return {w["run"] for r, w in jobs if r == rule}


@pytest.fixture(scope="session")
def built_project(tmp_path_factory, worker_id) -> Path:
    """The demo project (+ `other`), built with `snakemake -j1 all` once for the whole test run.
    Under pytest-xdist every worker has its own session: the first to ask builds the project in the
    run's shared temporary folder while the others wait on a lock, so it is built once, not per worker
    (each build is ~2.5 min of CPU). Tests only read it; `project_copy` gives one to edit."""
    from filelock import FileLock

    if worker_id == "master":  # no xdist: this session is the whole run
        shared = tmp_path_factory.getbasetemp()
    else:
        shared = tmp_path_factory.getbasetemp().parent
    project, done = shared / "built" / "project", shared / "built" / "done"
    with FileLock(str(shared / "built.lock")):
        if not done.is_file():
            if project.parent.exists():  # an earlier build that failed: start again, cleanly
                shutil.rmtree(project.parent)
            make_project(project)
            snakemake(project, "all")
            done.write_text("built\n")
    return project


@pytest.fixture
def project_copy(built_project, tmp_path) -> Path:
    """A private copy of the built project (mtimes and Snakemake metadata kept) to edit freely."""
    dest = tmp_path / "project"
    shutil.copytree(built_project, dest, symlinks=True)
    return dest


@pytest.fixture
def fresh_project(tmp_path) -> Path:
    """An unbuilt copy of the project, for parse-time checks."""
    return make_project(tmp_path / "fresh")
