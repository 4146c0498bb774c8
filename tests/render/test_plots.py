"""Plots are valid PNGs and byte-identical for identical input."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from lorabake.render import plots


def records(steps: int = 60, per_epoch: int = 20) -> list[dict]:
    return [
        {"step": s, "epoch": (s - 1) // per_epoch + 1, "loss": 0.1 + 0.05 * math.sin(s) + 0.1 * math.exp(-s / 30),
         "lr": 1e-4 * min(1.0, s / 10), "grad_norm": 1.0}
        for s in range(1, steps + 1)
    ]


def assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(plots.FIGSIZE[0] * plots.DPI), round(plots.FIGSIZE[1] * plots.DPI))
        assert "Software" not in image.info


def test_bar_chart_is_a_stable_png(tmp_path):
    args = (["base", "epoch 1", "final"], [0.21, 0.28, 0.31])
    plots.bar_chart(*args, tmp_path / "a.png", "CLIP score", "checkpoint", "score")
    plots.bar_chart(*args, tmp_path / "b.png", "CLIP score", "checkpoint", "score")
    assert_png(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left
    with pytest.raises(ValueError):
        plots.bar_chart(["x"], [1.0, 2.0], tmp_path / "c.png", "mismatch")


def test_loss_plot_is_a_stable_png(tmp_path):
    plots.loss_plot(records(), tmp_path / "a.png", "loss")
    plots.loss_plot(list(reversed(records())), tmp_path / "b.png", "loss")  # order of rows doesn't matter
    assert_png(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_loss_plot_handles_one_record(tmp_path):
    plots.loss_plot(records(steps=1), tmp_path / "one.png", "loss")
    assert_png(tmp_path / "one.png")


def test_ema_and_epoch_means():
    assert plots.ema([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
    assert plots.ema([0.0, 10.0], alpha=0.1) == [0.0, 1.0]
    spans = plots.epoch_spans(records(steps=40, per_epoch=20))
    assert [(e, first, last) for e, first, last, _ in spans] == [(1, 1, 20), (2, 21, 40)]
