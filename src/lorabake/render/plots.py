"""Small, deterministic matplotlib charts: bar charts for comparisons and the training-loss plot.

Every figure uses the Agg backend (no display on build machines), a fixed size and dpi, and PNG
metadata with the "Software" key removed, so the same input always gives the same bytes — Snakemake
and the content-addressed caches can then treat a re-rendered plot as unchanged.
"""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # headless: never try to open a window, and never depend on one being there
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lorabake import store  # noqa: E402

FIGSIZE = (8.0, 4.5)
DPI = 120
EMA_ALPHA = 0.1  # weight of the newest step: smooth enough to read the trend, quick enough to follow it
PNG_METADATA = {"Software": None}  # drop the matplotlib version string so bytes don't change across installs

BAR_COLOR = "#4C72B0"
LOSS_COLOR = "#4C72B0"
EPOCH_COLOR = "#DD8452"
VAL_COLOR = "#C44E52"
LR_COLOR = "#55A868"


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` atomically as PNG; the temp file ends in .tmp, so the format must be explicit."""
    try:
        with store.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)
    finally:
        plt.close(fig)  # pyplot keeps every figure alive otherwise; long Snakemake jobs would leak


def _new_figure() -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def bar_chart(labels: list[str], values: list[float], path: str | os.PathLike, title: str,
              xlabel: str = "", ylabel: str = "") -> None:
    """A bar per label, each annotated with its value."""
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels but {len(values)} values")
    fig, ax = _new_figure()
    positions = list(range(len(values)))
    bars = ax.bar(positions, values, color=BAR_COLOR, width=0.6)
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], padding=3, fontsize=9)
    long_labels = max(map(len, labels), default=0) > 12  # tilt long names so neighbours don't collide
    ax.set_xticks(positions, labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center",
                  rotation_mode="anchor")
    ax.margins(y=0.12)  # headroom so the value labels above the tallest bar are not clipped
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save(fig, path)


def ema(values: list[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average, seeded with the first value so it starts on the curve."""
    smoothed: list[float] = []
    for v in values:
        smoothed.append(v if not smoothed else alpha * v + (1 - alpha) * smoothed[-1])
    return smoothed


def epoch_spans(records: list[dict]) -> list[tuple[int, int, int, float]]:
    """(epoch, first step, last step, mean loss) per epoch, in epoch order."""
    by_epoch: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_epoch[r["epoch"]].append(r)
    spans = []
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        steps = [r["step"] for r in rows]
        spans.append((epoch, min(steps), max(steps), sum(r["loss"] for r in rows) / len(rows)))
    return spans


def loss_plot(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """Raw loss, its EMA, per-epoch means and the learning rate (right axis) against step."""
    if not records:
        raise ValueError("loss_plot needs at least one record")
    records = sorted(records, key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = _new_figure()
    ax.spines["right"].set_visible(True)  # the lr axis lives there

    ax.plot(steps, losses, color=LOSS_COLOR, linewidth=0.7, alpha=0.35, marker="." if len(steps) == 1 else None,
            label="loss (per step)")
    ax.plot(steps, ema(losses), color=LOSS_COLOR, linewidth=2.0, label=f"loss EMA (α={EMA_ALPHA})")

    spans = epoch_spans(records)
    # The mean is a step function held across each epoch's steps: it reads as "how good was epoch k".
    mean_x = [x for _, first, last, _ in spans for x in (first, last)]
    mean_y = [m for *_, m in spans for _ in (0, 1)]
    ax.plot(mean_x, mean_y, color=EPOCH_COLOR, linewidth=1.6, marker="o", markersize=4, label="epoch mean loss")
    for _, first, _, _ in spans[1:]:
        ax.axvline(first - 0.5, color="grey", linewidth=0.8, alpha=0.35, linestyle="--")
    validated = [r for r in records if r.get("val_loss") is not None]
    if validated:  # held-out images, fixed noise and timesteps: the curve to watch for overfitting
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], color=VAL_COLOR, linewidth=1.6,
                marker="s", markersize=5, label="validation loss (held-out images)")

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if steps[0] == steps[-1]:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)  # matplotlib's default ±5 % of one step gives 0.96, 0.98, ...
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.2)

    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color=LR_COLOR, linewidth=1.2, linestyle=":",
               marker="." if len(steps) == 1 else None, label="learning rate")
    lr_ax.set_ylabel("learning rate", color=LR_COLOR)
    lr_ax.tick_params(axis="y", colors=LR_COLOR)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.spines["top"].set_visible(False)

    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    _save(fig, path)
