"""Faults: a killed Snakemake, killed writers' temporaries, a full disk, concurrent latent jobs.

Each test makes the fault really happen (a kill -9, a process holding a file, a write that fails
with ENOSPC, two processes on one store) and checks what a user would look at afterwards."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorabake import cli, store
from lorabake.data import latents
from lorabake.data.buckets import BucketSpec
from lorabake.data.dataset import image_files
from lorabake.train.state import save_state, state_dirs

from conftest import FIXTURE, snakemake

LORABAKE = str(Path(sys.executable).with_name("lorabake"))


def wait_for(condition, what: str, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------- 1. resuming after kill -9

RESUMABLE = "training: {max_steps: 24, batch_size: 1}\nsave: {every_n_steps: 4, state: true, precision: fp32}\n"


@pytest.mark.workflow
def test_resume_after_kill_9_of_snakemake_unlocks_and_ends_on_the_uninterrupted_bytes(fresh_project):
    project, run = fresh_project, "resumable"
    (project / "configs/runs/resumable.yaml").write_text(RESUMABLE)
    target = f"results/runs/{run}/{run}.safetensors"
    snakemake(project, target)  # the uninterrupted run (and the base and latents it needs)
    expected = (project / target).read_bytes()
    shutil.rmtree(project / "results/runs" / run)

    killed = subprocess.Popen([sys.executable, "-m", "snakemake", "-j1", target], cwd=project,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_root = project / "results/runs" / run / "state"
    wait_for(lambda: state_dirs(state_root) or killed.poll() is not None, "the first training state")
    killed.kill()  # kill -9 of Snakemake alone: its train job lives on, orphaned, as after a real kill
    assert killed.wait() == -signal.SIGKILL
    # Freeze the orphan (after Snakemake died: a group orphaned with stopped members gets SIGHUP),
    # so that it is still there, however slowly the next command starts.
    os.killpg(killed.pid, signal.SIGSTOP)
    assert list((project / ".snakemake/locks").glob("*.lock")), "the killed run left no lock"

    refused = subprocess.run([LORABAKE, "resume", "-j1", target], cwd=project, capture_output=True, text=True)
    assert refused.returncode != 0
    assert f"train --run {run}" in refused.stderr  # names the orphaned job that still writes the run
    assert list((project / ".snakemake/locks").glob("*.lock")), "unlocked while a job still runs"

    os.killpg(killed.pid, signal.SIGKILL)  # now the orphaned train job too
    wait_for(lambda: not cli.project_processes(project), "the orphaned train job to die")
    saved = [p.name for p in state_dirs(state_root)]
    assert saved and saved[-1] != "step-000024", "killed too late: nothing left to resume"
    stale = project / "results/runs" / run / f".{run}.safetensors.k1ll3d00.tmp"  # a killed write's leftover
    stale.write_bytes(b"\0" * 4096)

    resumed = subprocess.run([LORABAKE, "resume", "-j1", target], cwd=project, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = (project / "logs/train" / f"{run}.log").read_text()
    assert f"resuming from {state_root.relative_to(project)}/{saved[-1]}" in log.replace(str(project) + "/", "")
    assert (project / target).read_bytes() == expected
    assert not stale.exists()
    assert not (project / ".snakemake/locks").exists() or not list((project / ".snakemake/locks").glob("*.lock"))


def test_project_processes_sees_a_lorabake_process_in_the_folder_only(tmp_path):
    inside, outside = tmp_path / "project", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(60)", "lorabake", "train"]
    jobs = [subprocess.Popen(sleeper, cwd=folder) for folder in (inside, outside)]
    try:
        wait_for(lambda: cli.project_processes(inside), "the process to show up", timeout=10)
        assert [pid for pid, _ in cli.project_processes(inside)] == [jobs[0].pid]
        assert "lorabake train" in cli.project_processes(inside)[0][1]
    finally:
        for job in jobs:
            job.kill()
            job.wait()
    assert cli.project_processes(inside) == []  # a reaped process is gone; so is a zombie's cwd


# ---------------------------------------------------------------- 2. temporaries of killed writers

WRITER = textwrap.dedent("""
    import sys
    from lorabake import store
    with store.atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"from the live writer")
        print(tmp, flush=True)
        sys.stdin.readline()  # hold the temporary until told to finish
""")


def start_writer(destination: Path) -> tuple[subprocess.Popen, Path]:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(destination)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    return writer, Path(writer.stdout.readline().strip())


def test_stale_temporaries_beside_an_output_are_removed_by_its_next_write(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    stale_file = merged / ".demo-merged.safetensors.k1ll3d00.tmp"
    stale_file.write_bytes(b"\0" * (1 << 20))
    stale_folder = merged / ".demo-merged.diffusers.abcdefgh.tmp"  # a killed build_folder
    (stale_folder / "unet").mkdir(parents=True)
    (stale_folder / "unet/weights.safetensors").write_bytes(b"\0" * 1024)
    stale_swap = merged / ".demo-merged.diffusers.abcdefgh.tmp.old"
    stale_swap.mkdir()
    (merged / ".0123abcd.lock").touch()  # the claim file of a killed holder
    kept = [merged / ".keep", merged / "notes.tmp", merged / "other.safetensors"]
    for path in kept:
        path.write_text("the user's")

    store.write_bytes(merged / "demo-merged.safetensors", b"merged")

    assert sorted(p.name for p in merged.iterdir()) == sorted([p.name for p in kept] + ["demo-merged.safetensors"])


def test_a_temporary_swept_before_it_is_locked_is_made_again(tmp_path, monkeypatch):
    """Another job's sweep can take a temporary for a killed writer's in the instant between its
    creation and its lock (seen on CI: FileNotFoundError in a concurrent latent cache). The writer
    then makes a new one instead of failing."""
    import tempfile

    made, swept = tempfile.mkstemp, []

    def swept_at_once(*args, **kwargs):
        fd, name = made(*args, **kwargs)
        if not swept:  # the first one vanishes before the writer opens it
            swept.append(name)
            os.unlink(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", swept_at_once)
    store.write_text(tmp_path / "index.json", "{}\n")
    assert swept and (tmp_path / "index.json").read_text() == "{}\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_live_writers_temporary_is_kept_and_a_killed_writers_removed(tmp_path):
    destination = tmp_path / "shared" / "key.safetensors"
    live, live_tmp = start_writer(destination)
    killed, killed_tmp = start_writer(destination)
    try:
        killed.kill()
        killed.wait()
        assert live_tmp.exists() and killed_tmp.exists()
        assert store.remove_stale_temps(destination.parent) == [killed_tmp]
        assert live_tmp.exists()
        live.communicate("go\n", timeout=30)
        assert live.returncode == 0
        assert destination.read_bytes() == b"from the live writer"
        assert not live_tmp.exists()
    finally:
        for writer in (live, killed):
            writer.kill()
            writer.wait()


# ---------------------------------------------------------------- 4. a full disk

def full_disk_after(monkeypatch, written: int, code: int = errno.ENOSPC) -> None:
    """Every Path.write_bytes writes `written` bytes, then fails as a full disk does."""
    def write_until_full(path, data):
        with open(path, "wb") as f:
            f.write(data[:written])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", write_until_full)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=0, free=4096))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_names_the_file_the_bytes_needed_and_free(tmp_path, monkeypatch, code):
    destination = tmp_path / "runs" / "r" / "r-e0004.safetensors"
    full_disk_after(monkeypatch, written=1000, code=code)
    with pytest.raises(store.DiskFull) as error:
        store.write_bytes(destination, b"\0" * 3 * 2 ** 20)
    monkeypatch.undo()
    message = str(error.value)
    assert str(destination) in message
    assert "needs 3.0 MiB (3145728 bytes)" in message and "0.0 MiB (4096 bytes) free" in message
    assert os.strerror(code) in message
    assert isinstance(error.value, OSError) and error.value.errno == code
    assert error.value.filename == str(destination)
    assert list(destination.parent.iterdir()) == []  # the temporary is gone


def test_full_disk_while_building_a_folder_says_what_it_wrote(tmp_path, monkeypatch):
    def build(folder: Path) -> None:
        (folder / "model_index.json").write_text("{}")
        (folder / "unet.safetensors").write_bytes(b"\0" * 5000)

    full_disk_after(monkeypatch, written=2000)
    with pytest.raises(store.DiskFull, match=r"writing .*base/tiny: it wrote 0.0 MiB \(2002 bytes\) before"):
        store.build_folder(tmp_path / "base" / "tiny", build)
    monkeypatch.undo()
    assert list((tmp_path / "base").iterdir()) == []


def test_full_disk_during_a_state_save_leaves_no_half_state(tmp_path, monkeypatch):
    optimizer = SimpleNamespace(state_dict=lambda: {"state": {0: {"exp_avg": torch.zeros(64)}}})
    scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 4})
    full_disk_after(monkeypatch, written=100)
    with pytest.raises(store.DiskFull, match=r"step-000004\.\w+\.tmp/tensors\.safetensors: it needs"):
        save_state(tmp_path / "step-000004", network={"w": torch.ones(8, 8)}, optimizer=optimizer,
                   scheduler=scheduler, step=4, epoch=1)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 5. concurrent latent jobs, one store

class SlowVAE(torch.nn.Module):
    """Stands in for a VAE whose encode takes a while, so two jobs really overlap."""
    config = SimpleNamespace(scaling_factor=0.5)

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def encode(self, pixels):
        time.sleep(0.15)
        mean = torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


SPEC = BucketSpec(resolution=(128, 128), min_size=64, max_size=256, step=64)


def demo_images() -> list[tuple[Path, str]]:
    root = FIXTURE / "datasets" / "demo"
    return [(path, path.relative_to(root).as_posix()) for path in image_files(root)]


def latent_job(store_dir: str, index_path: str, start) -> None:
    start.wait()
    latents.cache_latents(demo_images(), SPEC, True, SlowVAE(), "vae", Path(store_dir), Path(index_path), meta={})


def test_two_concurrent_jobs_on_one_store_encode_each_latent_once(tmp_path):
    store_dir = tmp_path / "cache"
    context = multiprocessing.get_context("fork")  # no re-import of torch: the jobs start at once
    start = context.Barrier(2)
    jobs = [context.Process(target=latent_job, args=(str(store_dir), str(tmp_path / f"index-{i}.json"), start))
            for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
        assert job.exitcode == 0
    indexes = [json.loads((tmp_path / f"index-{i}.json").read_text()) for i in range(2)]
    keys = 2 * len(demo_images())  # one entry per image and flip state
    assert sum(index["encoded"] for index in indexes) == keys  # each key encoded once, by one of them
    assert all(index["encoded"] > 0 for index in indexes)  # they shared the work ...
    assert all(index["encoded"] + index["reused"] == keys for index in indexes)  # ... and reused the rest
    assert indexes[0]["entries"] == indexes[1]["entries"]
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(
        name for entry in indexes[0]["entries"] for name in entry["latents"].values())  # no claims, no temporaries


HOLDER = textwrap.dedent("""
    import sys
    from lorabake import store
    with store.claim(sys.argv[1]) as held:
        print(held, flush=True)
        sys.stdin.readline()
""")


def test_a_claim_is_exclusive_and_ends_with_a_killed_holder(tmp_path):
    lock_file = tmp_path / ".key.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with store.claim(lock_file, wait=False) as held:
            assert held is False
        holder.kill()
        holder.wait()
        assert lock_file.exists()  # a killed holder leaves its file, but no claim
        with store.claim(lock_file, wait=False) as held:
            assert held is True
        assert not lock_file.exists()
    finally:
        holder.kill()
        holder.wait()
