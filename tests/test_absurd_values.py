"""Absurd values — far past any real setting — are refused before any job, quickly, naming the key,
the bound and why; the values that once hung a parse, overflowed in a train job or failed at save
after training among them."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from lorabake.cli import tag_frequency
from lorabake.config import ConfigError
from lorabake.config_fields import MAX_SEED
from lorabake.data.buckets import BucketSpec
from lorabake.data.dataset import CAPTION_CHARS, scan_dataset
from lorabake.project import load_project
from lorabake.workspace import Workspace

CONFIG = """
bases: {tiny: {builtin: tiny-sd}}
datasets: {demo: {path: data}}
defaults: {datasets: [demo], resolution: 128, network: {dim: 4, alpha: 2}}
"""


def project(tmp_path: Path, run: str = "", config: str = CONFIG, repeats: int = 1) -> Path:
    """config.yaml, runs/a.yaml and a one-image dataset (`<repeats>_lbk/`) under tmp_path."""
    images = tmp_path / "data" / f"{repeats}_lbk"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    (tmp_path / "runs").mkdir()
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "runs" / "a.yaml").write_text(run)
    return tmp_path / "config.yaml"


def refusal(load, *args) -> str:
    """The ConfigError `load(*args)` raises, after checking it came within a second."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"refused after {elapsed:.2f} s"
    return str(error.value)


# ---------------------------------------------------------------- one run's settings

@pytest.mark.parametrize("run, key, bound", [
    ("training: {epochs: 1000000000000}", "training.epochs", "100,000"),
    ("training: {max_steps: 19000000000000}", "training.max_steps", "10,000,000"),
    ("training: {processes: 100000}", "training.processes", "1,024"),
    ("resources: {gpu: 100000}", "resources.gpu", "1,024"),
    ("training: {batch_size: 1000000000}", "training.batch_size", "1,024"),
    ("training: {grad_accum: 1000000000}", "training.grad_accum", "1,024"),
    ("network: {dim: 1000000, alpha: 1}", "network.dim", "10,240"),
    ("network: {algo: locon, conv_dim: 1000000}", "network.conv_dim", "10,240"),
    ("network: {block_dims: [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1000000]}",
     "network.block_dims", "10,240"),
    ("training: {seed: 1000000000000000000000000000000}", "training.seed", "4,294,967,295"),
    ("training: {seed: -1}", "training.seed", "less than 0"),
    ("resolution: 1000000", "resolution", "8,192"),
    ("resolution: [512, 1000000]", "resolution", "8,192"),
    ("buckets: {max: 1000000000}", "buckets.max", "8,192"),
])
def test_absurd_run_values_are_refused_naming_key_bound_and_reason(tmp_path, run, key, bound):
    message = refusal(load_project, project(tmp_path, run + "\n"))
    assert f"a.yaml: {key}: " in message and bound in message
    assert "lorabake accepts: " in message  # …followed by why


def test_a_seed_at_the_bound_never_overflows_where_training_uses_it():
    """torch takes the seed itself (network init, pivotal vectors) and, hashed, in every step: the
    largest accepted seed works in both; 10^30 overflowed in the train job."""
    import torch

    from lorabake.train.loop import step_rngs

    torch.Generator().manual_seed(MAX_SEED)
    step_rngs(MAX_SEED, 10_000_000)
    with pytest.raises((RuntimeError, ValueError), match="[Oo]verflow"):
        torch.Generator().manual_seed(10**30)


def test_planned_steps_past_the_bound_are_refused_once_datasets_are_scanned(tmp_path):
    """10,000 repeats × 10,000 epochs = 10^8 steps: each setting is within its own bound, the plan
    is not; max_steps brings it back."""
    config = project(tmp_path, "training: {epochs: 10000}\n", repeats=10_000)
    ws = Workspace.load(config)
    message = refusal(ws.plan, "a")
    assert "a.yaml: training.epochs: " in message and "100,000,000 steps" in message and "10,000,000" in message
    (tmp_path / "runs" / "a.yaml").write_text("training: {epochs: 10000, max_steps: 5000}\n")
    assert Workspace.load(config).plan("a").total_steps == 5000


# ---------------------------------------------------------------- samples

@pytest.mark.parametrize("samples, key, bound", [
    ("{prompts: [a], steps: 1000000000}", "samples.steps", "1,000"),
    ("{prompts: [a], cfg: 1.0e+300}", "samples.cfg", "100"),
    ("{prompts: [a], cfg: .nan}", "samples.cfg", "not a number"),
    ("{prompts: [a], seed: 1000000000000000000000000000000}", "samples.seed", "4,294,967,295"),
    ("{prompts: ['a --s 1000000000']}", "samples.prompts", "--s 1,000,000,000 is more than 1,000"),
    ("{prompts: [a, 'b --w 100000']}", "samples.prompts", "prompt 1 ('b --w 100000'): --w 100,000 is more than 8,192"),
    ("{prompts: ['a --h 100000']}", "samples.prompts", "--h 100,000 is more than 8,192"),
    ("{prompts: ['a --w 0']}", "samples.prompts", "--w 0 is less than 64"),
    ("{prompts: ['a --l 1e9']}", "samples.prompts", "--l 1e+09 is more than 100"),
    ("{prompts: ['a --d -5']}", "samples.prompts", "--d -5 is less than 0"),
    ("{prompts: ['a --x 3']}", "samples.prompts", "unknown option '--x 3'"),
])
def test_absurd_sample_values_are_refused_naming_key_bound_and_reason(tmp_path, samples, key, bound):
    message = refusal(load_project, project(tmp_path, config=CONFIG + f"samples: {samples}\n"))
    assert f"config.yaml: {key}: " in message and bound in message


def test_sample_prompt_options_within_bounds_are_accepted(tmp_path):
    config = CONFIG + "samples: {prompts: ['a --w 8192 --h 64 --s 1000 --l 100 --d 4294967295']}\n"
    assert load_project(project(tmp_path, config=config)).file.samples is not None


# ---------------------------------------------------------------- buckets, for any caller

@pytest.mark.parametrize("spec", [dict(max_size=10**9), dict(resolution=(10**6, 10**6)),
                                  dict(min_size=64, max_size=8192, step=1), dict(step=0)])
def test_a_bucket_spec_that_would_enumerate_forever_is_refused(spec):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="bucket spec"):
        BucketSpec(**{"resolution": (512, 512), **spec})
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- captions and metadata

def caption_dataset(tmp_path: Path, caption: str) -> Path:
    """A one-image dataset whose files are a minute old, so the scan cache remembers them."""
    folder = tmp_path / "ds" / "1_lbk"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_text(caption)
    for path in folder.iterdir():
        os.utime(path, (time.time() - 60, time.time() - 60))
    return tmp_path / "ds"


def test_a_10_mb_caption_is_cut_with_a_warning_and_the_metadata_stays_small(tmp_path):
    tags = [f"tag number {i}" for i in range(800_000)]  # ~12 MB of distinct tags
    root = caption_dataset(tmp_path, ", ".join(tags))
    cache = tmp_path / "scan.json"
    for attempt in ("read", "from the scan cache"):
        start = time.perf_counter()
        with pytest.warns(UserWarning, match=f"caption longer than {CAPTION_CHARS} characters"):
            dataset = scan_dataset(root, "ds", cache_file=cache)
        item = dataset.items[0]
        assert time.perf_counter() - start < 1.0, attempt
        assert item.caption_cut and len(item.caption) <= CAPTION_CHARS, attempt
        assert item.caption.split(", ") == tags[:len(item.caption.split(", "))]  # cut between tags
    assert cache.stat().st_size < 4 * CAPTION_CHARS
    metadata = json.dumps(tag_frequency({"ds": dataset}))
    assert len(metadata) < 100_000


def test_tag_frequency_keeps_the_most_common_tags_each_cut_short(tmp_path):
    root = caption_dataset(tmp_path, "x" * 20_000)  # one 20,000-character "tag": cut, no boundary
    with pytest.warns(UserWarning):
        dataset = scan_dataset(root, "ds")
    assert len(dataset.items[0].caption) == CAPTION_CHARS
    (folder, counts), = tag_frequency({"ds": dataset}).items()
    assert folder == "1_lbk" and [len(tag) for tag in counts] == [100]


def test_an_ordinary_caption_is_kept_whole(tmp_path):
    dataset = scan_dataset(caption_dataset(tmp_path, "lbk, red circle"), "ds")
    assert dataset.items[0].caption == "lbk, red circle" and not dataset.items[0].caption_cut


# ---------------------------------------------------------------- train.jsonl

def _no_constants(name: str):
    raise ValueError(f"train.jsonl holds {name}, which strict JSON does not")


def test_a_nan_or_infinite_loss_is_written_as_null_and_the_plot_still_renders(tmp_path, monkeypatch):
    from lorabake import paths
    from lorabake.train.loop import write_logs
    from lorabake.train.plan import TrainingPlan

    monkeypatch.chdir(tmp_path)
    records = [{"step": 1, "epoch": 1, "loss": 0.2, "lr": 1e-4, "lrs": {"unet": 1e-4}},
               {"step": 2, "epoch": 1, "loss": math.nan, "lr": 1e-4, "lrs": {"unet": math.inf}},
               {"step": 3, "epoch": 2, "loss": math.inf, "lr": 1e-4, "lrs": {"unet": 1e-4}},
               {"step": 4, "epoch": 2, "loss": 0.1, "lr": 1e-4, "lrs": {"unet": 1e-4}}]
    write_logs("r", records, TrainingPlan(steps_per_epoch=2, epochs=2, total_steps=4))
    lines = Path(paths.train_log("r")).read_text().splitlines()
    parsed = [json.loads(line, parse_constant=_no_constants) for line in lines]
    assert [r["loss"] for r in parsed] == [0.2, None, None, 0.1] and parsed[1]["lrs"] == {"unet": None}
    assert Path(paths.loss_plot("r")).stat().st_size > 0

    write_logs("all-nan", [{**r, "loss": math.nan} for r in records], TrainingPlan(2, 2, 4))
    assert Path(paths.loss_plot("all-nan")).stat().st_size > 0


def test_absurd_folder_repeats_are_refused_within_a_second(tmp_path):
    from PIL import Image

    from lorabake.data.dataset import DatasetError, scan_dataset

    folder = tmp_path / "1000000000000_cat"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    started = time.monotonic()
    with pytest.raises(DatasetError, match=r"(?s)more than 10,000 repeats.*1000000000000_cat"):
        scan_dataset(tmp_path, "cats")
    assert time.monotonic() - started < 1
