"""The dataset report: counts, buckets, steps per run, caption warnings, and the files written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lorabake.data.buckets import BucketSpec
from lorabake.data.dataset import Dataset, epoch_items, scan_dataset
from lorabake.data.report import build_report, render_markdown, write_report


SPEC = BucketSpec(resolution=(64, 64), min_size=32, max_size=128, step=32)
RUNS = {"short": {"batch_size": 2, "grad_accum": 1, "epochs": 3, "max_steps": None, "steps_per_epoch": 10,
                  "total_steps": 30},
        "capped": {"batch_size": 1, "grad_accum": 1, "epochs": 10, "max_steps": 7, "steps_per_epoch": 32,
                   "total_steps": 7}}


def make_image(path: Path, size: tuple[int, int], caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    make_image(tmp_path / "4_cat" / "a.png", (64, 64), "cat, sitting, Sitting")
    make_image(tmp_path / "4_cat" / "b.png", (96, 32), "dog, sitting")
    make_image(tmp_path / "4_cat" / "c.png", (64, 64))
    make_image(tmp_path / "2_dog" / "d.png", (32, 96), "dog, _odd, (unbalanced, smile (happy)")
    make_image(tmp_path / "2_dog" / "e.png", (64, 64), " , ")
    make_image(tmp_path / "reg" / "1_animal" / "r.png", (96, 32))
    return scan_dataset(tmp_path, "pets")


def test_counts_folders_and_buckets(dataset: Dataset) -> None:
    report = build_report(dataset, SPEC, RUNS)
    assert report["dataset"] == "pets"
    assert report["images"] == {"train": 5, "reg": 1}
    assert sum(report["buckets"].values()) == 6
    assert report["buckets"] == {"32x96": 1, "64x64": 3, "96x32": 2}
    cat = next(f for f in report["folders"] if f["folder"] == "4_cat")
    assert cat == {"folder": "4_cat", "concept": "cat", "repeats": 4, "images": 3, "image_repeats": 12,
                   "is_reg": False, "captions_missing": 1}
    assert [f["folder"] for f in report["folders"]] == ["2_dog", "4_cat", "reg/1_animal"]
    assert report["epoch_entries"] == len(epoch_items(dataset)) == 2 * (12 + 4)


def test_each_run_reports_the_steps_its_own_plan_counts(tmp_path: Path) -> None:
    """The 92/96 case: wide images added, and a second run with buckets off. The report once applied
    the first run's bucket spec to every run; now each row is that run's training plan."""
    from lorabake.project import load_project
    from lorabake.workspace import Workspace

    data = tmp_path / "datasets" / "pets"
    for i in range(5):
        make_image(data / "3_cat" / f"square{i}.png", (128, 128), "cat")
    for i in range(3):
        make_image(data / "3_cat" / f"wide{i}.png", (384, 128), "cat")  # the added wide images
    (tmp_path / "configs" / "runs").mkdir(parents=True)
    (tmp_path / "configs" / "config.yaml").write_text(yaml.safe_dump({
        "bases": {"tiny": {"builtin": "tiny-sd"}}, "datasets": {"pets": {"path": "datasets/pets"}},
        "defaults": {"datasets": ["pets"], "resolution": 128, "buckets": {"min": 64, "max": 256, "step": 64},
                     "training": {"batch_size": 2, "epochs": 4}}}))
    (tmp_path / "configs" / "runs" / "a-bucketed.yaml").write_text("")
    (tmp_path / "configs" / "runs" / "b-fixed.yaml").write_text("buckets: {enabled: false}\n")
    ws = Workspace(load_project(tmp_path / "configs" / "config.yaml"))
    report = build_report(ws.dataset("pets"), ws.report_spec("pets"), ws.report_runs("pets"))
    for run in ("a-bucketed", "b-fixed"):
        plan = ws.plan(run)
        row = report["runs"][run]
        assert (row["steps_per_epoch"], row["total_steps"]) == (plan.steps_per_epoch, plan.total_steps)
    # 15 square + 9 wide entries: ceil(15/2) + ceil(9/2) = 13 steps with buckets, ceil(24/2) = 12 without
    assert [report["runs"][r]["total_steps"] for r in ("a-bucketed", "b-fixed")] == [4 * 13, 4 * 12]


def test_caption_warnings_and_tag_counts(dataset: Dataset) -> None:
    report = build_report(dataset, SPEC, RUNS)
    assert report["missing_activation_tag"] == ["2_dog/e.png", "4_cat/b.png"]
    # c.png is captioned by its folder name, so "cat" counts twice; ties sort by tag
    assert report["tag_counts"][:4] == [["cat", 2], ["dog", 2], ["sitting", 2], ["(unbalanced", 1]]
    found = {(s["rel"], s["tag"], s["problem"]) for s in report["suspicious_tags"]}
    assert found == {
        ("4_cat/a.png", "sitting", "duplicate tag"),
        ("2_dog/d.png", "_odd", "leading or trailing punctuation"),
        ("2_dog/d.png", "(unbalanced", "unbalanced parentheses"),
        ("2_dog/e.png", "", "empty caption"),
    }


def test_render_markdown_has_every_section(dataset: Dataset) -> None:
    text = render_markdown(build_report(dataset, SPEC, RUNS))
    for needle in ("# Dataset report: pets", "## Folders", "| 4_cat | cat | 4 | 3 | 12 |", "## Runs",
                   "| short | 2 | 1 | 3 |", "## Buckets", "| 96x32 | 2 |", "## Top 30 tags",
                   "### Missing activation tag (2)", "`4_cat/b.png`", "unbalanced parentheses `(unbalanced`"):
        assert needle in text


def test_write_report_writes_json_markdown_and_chart(dataset: Dataset, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lorabake.render.plots")
    out = tmp_path / "out" / "report.json"
    report = write_report(dataset, SPEC, RUNS, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (out.parent / "report.md").read_text() == render_markdown(report)
    assert (out.parent / "buckets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pets" in capsys.readouterr().out


def test_skipped_os_files_and_other_captions_are_listed(tmp_path: Path) -> None:
    make_image(tmp_path / "4_cat" / "a.png", (64, 64), "cat")
    (tmp_path / "4_cat" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "4_cat" / "a.caption").write_text("cat, other tagger")
    report = build_report(scan_dataset(tmp_path, "pets"), SPEC, {})
    assert (report["skipped_files"], report["other_captions"]) == (["4_cat/Thumbs.db"], ["4_cat/a.caption"])
    text = render_markdown(report)
    assert "Caption files not read (1" in text and "`4_cat/a.caption`" in text and "`4_cat/Thumbs.db`" in text
