"""Comparisons as planned from the config: axes, placement, cells, and the errors a bad entry gets
before any job runs (rendering is the workflow tests' and test_cells')."""
from __future__ import annotations

import pytest
import yaml

from lorabake import cli
from lorabake.config import ConfigError
from lorabake.render import compare
from lorabake.workspace import Workspace

from conftest import make_project


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project")


def configure(project, **comparison):
    """Replace the project's comparisons with one entry (name `c`) and load it."""
    path = project / "configs" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["comparisons"] = [{"name": "c", **comparison}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Workspace.load(path)


def test_axes_go_where_the_entry_says_and_the_rest_stack_as_sections(project):
    (project / "configs" / "runs" / "sw.yaml").write_text("sweep: {network.dim: [2, 6]}\n")
    ws = configure(project, runs=["demo-lora", "sw"], seeds=[1, 2, 3], rows="runs", columns=["seeds", "strengths"],
                   te_strengths=[0.0, 1.0], block_weights=["OUTALL", [1.0] * 25])
    plan = compare.plan_comparison(ws, "c")
    assert plan.axes["runs"].values == ["demo-lora", "sw-dim_2", "sw-dim_6"]  # a run file's name: all its points
    assert plan.rows == ["runs"] and plan.columns == ["seeds", "strengths"]
    assert plan.sections == ["te_strengths", "prompts", "block_weights"]  # unplaced, several values, in AXES order
    assert len(plan.cells) == 3 * 3 * 3 * 2 * 2 * 2  # runs × strengths × seeds × TE × prompts × block weights
    assert compare.page_files(plan) == ["grid.png"]
    seeds = {(c.settings["prompt"], c.settings["seed"]) for c in plan.cells}
    assert {seed for _, seed in seeds} == {1, 2, 3}  # the seeds axis overrides each prompt's --d
    te_zero = [c.cell for c in plan.cells if c.settings["te_strength"] == 0.0 and c.settings["strength"] == 1.0]
    assert te_zero and all(cell.text_encoder_multiplier == 0.0 for cell in te_zero)
    assert compare._fixed_text(plan, "samplers") == "euler_a" and compare._fixed_text(plan, "epochs") == "epoch final"


def test_pages_and_epochs(project):
    ws = configure(project, runs=["demo-lora", "other-run"], epochs="all", strengths=[1.0], rows="epochs",
                   columns="runs", pages="prompts")
    plan = compare.plan_comparison(ws, "c")
    assert plan.axes["epochs"].values == [1, 2, 3, 4]  # demo-lora keeps 4 epoch files, other-run 2
    assert compare.page_files(plan) == ["page-01.png", "page-02.png"]
    missing = [c for c in plan.cells if c.cell is None]
    assert {(c.settings["run"], c.settings["epoch"]) for c in missing} == {("other-run", 3), ("other-run", 4)}
    assert compare._caption(plan, missing[0]) == "not saved"


def test_epochs_no_run_keeps_are_refused_before_any_job(project):
    ws = configure(project, runs=["demo-lora"], epochs=[2, 9])
    with pytest.raises(ConfigError, match=r"comparisons.c.epochs: .*epoch\(s\) \[9\]"):
        ws.check_comparisons()


@pytest.mark.parametrize("entry, message", [
    ({"runs": ["nope"]}, "comparisons.c.runs: no run or run file named 'nope'"),
    ({"runs": ["demo-lora"], "rows": "run"}, "unknown axes \\['run'\\]"),
    ({"runs": ["demo-lora"], "rows": "seeds", "columns": "seeds"}, "placed twice"),
    ({"runs": ["demo-lora"], "block_weights": ["MIDX"]}, "unknown block-weight preset 'MIDX'"),
    ({"runs": ["demo-lora"], "samplers": ["dpm_fast"]}, "unknown sampler 'dpm_fast'"),
    ({"runs": ["demo-lora"], "bases": ["elsewhere"]}, "comparisons.c.bases: 'elsewhere' is not a key of bases"),
    ({"runs": ["demo-lora"], "prompts": ["a cat --width 192"]}, "--width 192.*kohya's name for it is --w"),
    ({"runs": ["demo-lora"], "seeds": [-1]}, "seeds"),
])
def test_bad_entries_name_the_key(project, entry, message):
    with pytest.raises(ConfigError, match=message):
        configure(project, **entry)


def test_validate_refuses_a_long_option_naming_the_prompt(project, capsys):
    config = project / "configs" / "config.yaml"
    config.write_text(config.read_text().replace("--w 192 --h 128", "--width 192 --h 128"))
    assert cli.main(["--config", str(config), "validate"]) == 2
    error = capsys.readouterr().err
    assert "samples.prompts" in error and "lbk_square, blue square" in error and "--width 192" in error


def test_samplers_validate_by_the_names_users_know(project, capsys):
    config = project / "configs" / "config.yaml"
    config.write_text(config.read_text().replace("sampler: euler_a", "sampler: dpmpp_2m_karras"))
    assert cli.main(["--config", str(config), "validate"]) == 0
    assert Workspace.load(config).project.file.samples.sampler == "dpmpp_2m_karras"


def test_the_page_lists_the_settings_the_runs_differ_in(project):
    ws = configure(project, runs=["demo-lora", "demo-unet-only"])
    differing = compare.run_settings(ws, ["demo-lora", "demo-unet-only"])
    assert differing["network.train_text_encoder"] == {"demo-lora": True, "demo-unet-only": False}
    assert differing["optimizer.lr"] == {"demo-lora": 2.0e-3, "demo-unet-only": 3.0e-3}
    assert "training.batch_size" not in differing and "optimizer.type" not in differing  # the same in both


def test_the_shipped_config_compares_both_demo_runs():
    from conftest import REPO

    ws = Workspace.load(REPO / "configs" / "config.yaml")
    assert ws.project.file.comparisons, "the default config ships a comparison"
    for name in ws.project.file.comparisons:
        plan = compare.plan_comparison(ws, name)
        assert set(plan.axes["runs"].values) == set(ws.project.runs) == {"demo-lora", "demo-unet-only"}
        assert len(plan.axes["seeds"].values) == 2 and compare.page_files(plan) == ["grid.png"]
