"""Bad input stops the workflow before any job runs, with a message naming the file or key."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import snakemake

pytestmark = pytest.mark.workflow  # runs Snakemake


def refused(project: Path) -> str:
    out = snakemake(project, "-n", "all", check=False)
    assert out.returncode != 0
    # nothing is built; only the parse-time scan cache may exist (it keeps the files that were fine)
    built = [p for p in (project / "results").rglob("*") if p.is_file() and "cache/scan" not in p.as_posix()]
    assert built == []
    return out.stdout + out.stderr


def test_unsupported_file_is_named(fresh_project):
    (fresh_project / "datasets/demo/3_lbk_square/notes.gif").write_bytes(b"GIF89a")
    assert "notes.gif" in refused(fresh_project)


def test_corrupt_image_is_named(fresh_project):
    (fresh_project / "datasets/demo/3_lbk_square/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "broken.png" in refused(fresh_project)


def test_unknown_config_key_is_named_with_its_file(fresh_project):
    run = fresh_project / "configs/runs/demo-lora.yaml"
    run.write_text("optimizer: {lr: 1.0e-4, learnig_rate: 3}\n")
    message = refused(fresh_project)
    assert "demo-lora.yaml" in message and "optimizer.learnig_rate" in message


def test_missing_dataset_path_is_named(fresh_project):
    config = fresh_project / "configs/config.yaml"
    config.write_text(config.read_text().replace("path: datasets/other", "path: datasets/nowhere"))
    message = refused(fresh_project)
    assert "datasets.other.path" in message and "datasets/nowhere" in message


def test_alpha_above_dim_warns(fresh_project):
    (fresh_project / "configs/runs/demo-lora.yaml").write_text("network: {dim: 2, alpha: 8}\n")
    out = snakemake(fresh_project, "-n", "all")
    assert "network.alpha (8) > network.dim (2)" in out.stdout + out.stderr
