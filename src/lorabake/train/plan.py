"""What an epoch is: kohya's entries (images × repeats, reg images matched to them), grouped into
bucket-consistent batches; and how many steps and epochs a run takes."""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from lorabake.config import RunConfig
from lorabake.data import buckets
from lorabake.data.dataset import Dataset, ImageItem, bucket_steps, epoch_items


@dataclass(frozen=True)
class Entry:
    """One image-use in an epoch: which dataset, which image, which bucket."""

    dataset: str
    item: ImageItem
    bucket: tuple[int, int]


@dataclass(frozen=True)
class TrainingPlan:
    steps_per_epoch: int
    epochs: int          # epochs actually run (max_steps may cut the configured number)
    total_steps: int

    def epoch_of(self, step: int) -> int:
        """1-based epoch of a 1-based step."""
        return (step - 1) // self.steps_per_epoch + 1


def held_out(run: RunConfig, dataset: Dataset) -> list[ImageItem]:
    """The validation images of one dataset: in every concept folder (regularization ones aside), the
    last round(n × split) of its images shuffled by the validation seed, kohya's validation_split
    choice; at least one image of each folder stays in training."""
    if run.validation is None:
        return []
    seed = run.training.seed if run.validation.seed is None else run.validation.seed
    chosen = []
    for folder in sorted({item.folder for item in dataset.train_items}):
        items = sorted((item for item in dataset.train_items if item.folder == folder), key=lambda item: item.rel)
        random.Random(seed).shuffle(items)
        count = min(round(len(items) * run.validation.split), len(items) - 1)
        chosen += items[len(items) - count:] if count else []
    return chosen


def trained_items(run: RunConfig, dataset: Dataset) -> list[ImageItem]:
    """One epoch's entries of a dataset for this run: its validation images left out."""
    return epoch_items(dataset, frozenset(item.rel for item in held_out(run, dataset)))


def epoch_entries(run: RunConfig, datasets: dict[str, Dataset]) -> list[Entry]:
    """What one epoch trains on, each image in its bucket."""
    return _entries(run, datasets, trained_items)


def validation_entries(run: RunConfig, datasets: dict[str, Dataset]) -> list[Entry]:
    """The held-out images the validation loss is measured on, each in its bucket."""
    return _entries(run, datasets, held_out)


def _entries(run: RunConfig, datasets: dict[str, Dataset], items) -> list[Entry]:
    spec = run.bucket_spec()
    return [Entry(name, item, buckets.place(item.width, item.height, spec).bucket)
            for name in run.datasets for item in items(run, datasets[name])]


def batches(entries: list[Entry], batch_size: int, rng: random.Random) -> list[list[Entry]]:
    """Shuffle within each bucket, cut into batches of one bucket each, shuffle the batches."""
    by_bucket: dict[tuple[int, int], list[Entry]] = defaultdict(list)
    for entry in entries:
        by_bucket[entry.bucket].append(entry)
    result = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        rng.shuffle(group)
        result += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(result)
    return result


def plan_training(run: RunConfig, datasets: dict[str, Dataset]) -> TrainingPlan:
    """kohya's arithmetic: images × repeats (reg entries doubling it) → bucket batches → optimizer
    steps of grad_accum batches each, × epochs, cut at max_steps."""
    spec = run.bucket_spec()  # counted per image size: a farm's 20,000 images have few sizes
    sizes = Counter((item.width, item.height) for name in run.datasets for item in trained_items(run, datasets[name]))
    counts = Counter()
    for (width, height), n in sizes.items():
        counts[buckets.place(width, height, spec).bucket] += n
    steps_per_epoch = bucket_steps(counts, run.global_batch, run.training.grad_accum)
    total = steps_per_epoch * run.training.epochs
    if run.training.max_steps is not None:
        total = min(total, run.training.max_steps)
    return TrainingPlan(steps_per_epoch, math.ceil(total / steps_per_epoch), total)


def saved_epochs(run: RunConfig, plan: TrainingPlan) -> list[int]:
    """Epochs that get an `epochs/{run}-eNNNN.safetensors` file: every N-th, and always the last."""
    every = run.save.every_n_epochs
    return sorted({e for e in range(1, plan.epochs + 1) if every and e % every == 0} | {plan.epochs})


def kept_epochs(run: RunConfig, plan: TrainingPlan) -> list[int]:
    """Epoch files still there after training: save.keep_last prunes all but the newest N."""
    epochs = saved_epochs(run, plan)
    return epochs[-run.save.keep_last:] if run.save.keep_last else epochs
