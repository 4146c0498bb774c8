"""`lorabake init` and what a wheel carries: a plain `pip install` must be enough to start a project."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from lorabake import cli, scaffold
from lorabake.models import bases
from lorabake.workspace import Workspace

from conftest import REPO


def test_init_writes_a_project_that_validates(tmp_path, capsys):
    project = tmp_path / "mine"
    assert cli.main(["init", str(project)]) == 0
    assert "snakemake -j1 all" in capsys.readouterr().out
    for part in ("Snakefile", "workflow/rules/common.smk", "configs/config.yaml", "configs/runs/demo-lora.yaml"):
        assert (project / part).read_bytes() == (REPO / part).read_bytes(), part
    images = sorted(p.name for p in (project / "datasets/demo").rglob("*.png"))
    assert images == sorted(p.name for p in (REPO / "datasets/demo").rglob("*.png")) and images
    ws = Workspace.load(project / "configs/config.yaml")  # the whole config check, before any job
    assert set(ws.project.runs) == {"demo-lora", "demo-unet-only"}
    assert not [p for p in project.iterdir() if p.name.startswith(".lorabake-init-")]  # no staging left


def test_init_never_overwrites_a_project(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text("mine\n")
    assert cli.main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'configs'} already exists" in err and "empty folder" in err
    assert (tmp_path / "configs" / "config.yaml").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]


def test_init_adds_the_demo_beside_a_users_datasets(tmp_path):
    (tmp_path / "datasets" / "mine").mkdir(parents=True)
    scaffold.init_project(tmp_path)
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["demo", "mine"]


def tracked(*parts: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", *parts], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.split())


def test_the_wheel_ships_every_template_file_and_the_clip_vocabulary():
    """pyproject's data-files (the template `lorabake init` copies from a wheel install) cover every
    tracked file of the template, so a new rule file cannot be forgotten; the vocabulary that every
    tokenizer is written from is package data."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {str(path.relative_to(REPO)) for patterns in setuptools["data-files"].values()
               for pattern in patterns for path in REPO.glob(pattern)}
    assert shipped == tracked(*scaffold.TEMPLATE)
    package_data = setuptools["package-data"]["lorabake"]
    vocab = bases.clip_bpe_file().relative_to(REPO / "src" / "lorabake")
    assert any(vocab.match(pattern) for pattern in package_data), package_data
    assert bases.clip_bpe_file().stat().st_size > 1_000_000


def test_tokenizers_are_written_without_open_clip(tmp_path):
    """The tokenizer is written from the shipped vocabulary alone: open_clip is not importable here."""
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "from pathlib import Path; from lorabake.models import bases\n"
            f"bases.write_tokenizers(Path({str(tmp_path)!r}), 'sdxl')\n"
            "from transformers import CLIPTokenizer\n"
            f"t = CLIPTokenizer.from_pretrained({str(tmp_path / 'tokenizer_2')!r})\n"
            "print(t('a photo of a cat').input_ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[49406,", "320,", "1125,", "539,", "320,", "2368,", "49407]"]
