"""Post-hoc EMA over a run's saved epoch files: the math on real files, its refusals, the config check."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_project
from lorabake import cli, paths
from lorabake.config import ConfigError
from lorabake.tools import lora_tools
from lorabake.workspace import Workspace
from trainer import Trainer, working_in

RUN = "ema-source"
EPOCHS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A real run on the two-image dataset `other` (one step per epoch), an fp32 file per epoch."""
    with working_in(make_project(tmp_path_factory.mktemp("ema") / "project")) as trainer:
        trainer.train(RUN, {"datasets": ["other"], "training": {"max_steps": None, "epochs": 4, "batch_size": 4},
                            "optimizer": {"lr": 1.0e-2}, "save": {"every_n_epochs": 1}})
        yield trainer


def with_emas(trainer: Trainer, *entries: dict) -> Workspace:
    """The project file with exactly these `emas` entries, loaded."""
    config_file = trainer.project / "configs/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["emas"] = list(entries)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return Workspace.load(config_file)


def epoch_states(epochs=EPOCHS) -> list[dict[str, torch.Tensor]]:
    return [load_file(paths.epoch_lora(RUN, epoch)) for epoch in epochs]


def manual_ema(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """ema_1 = w_1, ema_k = decay × ema_(k−1) + (1 − decay) × w_k, key by key, in float64."""
    ema = {key: value.double() for key, value in states[0].items()}
    for state in states[1:]:
        ema = {key: decay * ema[key] + (1 - decay) * state[key].double() for key in ema}
    return ema


# ---------------------------------------------------------------- the math, on real epoch files

def test_the_epoch_files_differ_so_the_average_means_something(trainer):
    states = epoch_states()
    key = next(k for k in states[0] if k.endswith("lora_up.weight"))
    assert all(not torch.equal(a[key], b[key]) for a, b in zip(states, states[1:]))


def test_lorabake_ema_equals_the_recursion_over_the_saved_files(trainer):
    with_emas(trainer, {"name": "smooth", "run": RUN, "decay": 0.7, "precision": "fp32"})
    trainer.cli("ema", "--name", "smooth")
    result, expected = load_file(paths.posthoc_ema("smooth")), manual_ema(epoch_states(), 0.7)
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result[key].double(), value, rtol=1e-6, atol=1e-7)
    alphas = [key for key in result if key.endswith(".alpha")]
    assert alphas and all(torch.equal(result[key], epoch_states()[0][key]) for key in alphas)
    with safe_open(paths.posthoc_ema("smooth"), "pt") as f:
        metadata = f.metadata()
    facts = json.loads(metadata["lorabake_posthoc_ema"])
    assert facts["run"] == RUN and facts["epochs"] == EPOCHS and facts["decay"] == 0.7
    assert facts["weights"] == pytest.approx([0.7 ** 3, 0.3 * 0.7 ** 2, 0.3 * 0.7, 0.3])
    assert metadata["ss_epoch"] == "4" and metadata["ss_network_dim"] == "4"  # the run's facts, at the last file
    assert metadata["ss_training_comment"].startswith(f"post-hoc EMA of {RUN} epochs 1, 2, 3, 4, decay 0.7")


def test_an_explicit_epoch_list_averages_those_files_only(trainer):
    with_emas(trainer, {"name": "late", "run": RUN, "decay": 0.5, "epochs": [2, 4], "precision": "fp32"})
    trainer.cli("ema", "--name", "late")
    result, expected = load_file(paths.posthoc_ema("late")), manual_ema(epoch_states([2, 4]), 0.5)
    for key, value in expected.items():
        torch.testing.assert_close(result[key].double(), value, rtol=1e-6, atol=1e-7)


def test_a_constant_sequence_returns_itself(trainer):
    state = epoch_states([2])[0]
    averaged = lora_tools.posthoc_ema([state, state, state], 0.9)
    assert averaged.keys() == state.keys() and all(torch.equal(averaged[k], state[k]) for k in state)


def test_decay_0_returns_the_last_file(trainer):
    states = epoch_states()
    averaged = lora_tools.posthoc_ema(states, 0.0)
    assert all(torch.equal(averaged[key], states[-1][key]) for key in states[-1])


def test_factors_are_averaged_as_stored_not_as_deltas():
    """Two LoRAs with the same ΔW (up·c, down/c) average to factors whose product is not that ΔW: an EMA
    of the parameters, as the online EMA takes it, on LyCORIS factors too."""
    one = {"m.lora_up.weight": torch.ones(3, 1), "m.lora_down.weight": torch.ones(1, 2), "m.alpha": torch.tensor(1.0),
           "n.hada_w1_a": torch.zeros(2, 2)}
    two = {"m.lora_up.weight": 2 * torch.ones(3, 1), "m.lora_down.weight": torch.ones(1, 2) / 2,
           "m.alpha": torch.tensor(1.0), "n.hada_w1_a": torch.ones(2, 2)}
    averaged = lora_tools.posthoc_ema([one, two], 0.5)
    assert torch.equal(averaged["m.lora_up.weight"], 1.5 * torch.ones(3, 1))
    assert torch.equal(averaged["m.lora_down.weight"], 0.75 * torch.ones(1, 2))
    assert torch.equal(averaged["n.hada_w1_a"], 0.5 * torch.ones(2, 2))


def test_ema_weights_follow_the_recursion_and_sum_to_1():
    weights = lora_tools.ema_weights(5, 0.8)
    assert weights == pytest.approx([0.8 ** 4, 0.2 * 0.8 ** 3, 0.2 * 0.8 ** 2, 0.2 * 0.8, 0.2])
    assert sum(weights) == pytest.approx(1.0)
    assert lora_tools.ema_weights(1, 0.8) == [1.0]
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        lora_tools.ema_weights(3, 1.0)


# ---------------------------------------------------------------- refusals

def lora(alpha: float = 1.0, rank: int = 2, extra: bool = False) -> dict[str, torch.Tensor]:
    state = {"m.lora_up.weight": torch.randn(4, rank), "m.lora_down.weight": torch.randn(rank, 3),
             "m.alpha": torch.tensor(alpha)}
    return state | ({"k.lora_up.weight": torch.randn(2, 1)} if extra else {})


@pytest.mark.parametrize("second, message", [
    (lora(extra=True), r"b\.safetensors and a\.safetensors hold different keys .*only in b\.safetensors: \['k\.lora_up"),
    (lora(rank=3), r"key m\.lora_(up|down)\.weight: shape .* in b\.safetensors, .* in a\.safetensors"),
    (lora(alpha=2.0), r"key m\.alpha: alpha 2 in b\.safetensors, 1 in a\.safetensors"),
])
def test_files_whose_keys_shapes_or_alphas_differ_are_refused_by_name(second, message):
    with pytest.raises(ValueError, match=message):
        lora_tools.posthoc_ema([lora(), second], 0.5, ["a.safetensors", "b.safetensors"])


def test_the_command_names_the_entry_and_the_files_it_refuses(trainer):
    with_emas(trainer, {"name": "broken", "run": RUN, "decay": 0.5, "epochs": [3, 4]})
    good, path = epoch_states([3])[0], trainer.project / paths.epoch_lora(RUN, 4)
    saved = path.read_bytes()
    try:
        from safetensors.torch import save_file
        save_file({**good, next(k for k in good if k.endswith(".alpha")): torch.tensor(99.0)}, str(path))
        with pytest.raises(SystemExit, match=rf"emas\.broken: key .*\.alpha: alpha 99 in {paths.epoch_lora(RUN, 4)}"):
            cli.cmd_ema(Workspace.load(trainer.project / "configs/config.yaml"), type("Args", (), {"name": "broken"}))
    finally:
        path.write_bytes(saved)


# ---------------------------------------------------------------- the config check, before any job

def test_a_run_without_epoch_saves_is_refused_naming_the_key_and_what_to_set(trainer):
    trainer.write_run("final-only", {"datasets": ["other"], "save": {"every_n_epochs": None}})
    ws = with_emas(trainer, {"name": "e", "run": "final-only", "decay": 0.5})
    with pytest.raises(ConfigError, match=r"config\.yaml: emas\.e\.run: run final-only keeps only the epoch file of "
                                          r"epoch \d+ \(save\.every_n_epochs: null, save\.keep_last: null\); .*set "
                                          r"save\.every_n_epochs \(e\.g\. 1\) in .*final-only\.yaml"):
        ws.check_emas()
    assert cli.main(["--config", str(trainer.project / "configs/config.yaml"), "validate"]) == 2
    trainer.write_run("keeps-one", {"datasets": ["other"], "save": {"every_n_epochs": 1, "keep_last": 1}})
    with pytest.raises(ConfigError, match=r"emas\.e\.run: run keeps-one .*set save\.keep_last to 2 or more"):
        with_emas(trainer, {"name": "e", "run": "keeps-one", "decay": 0.5}).check_emas()


def test_epochs_the_run_never_saves_are_refused(trainer):
    ws = with_emas(trainer, {"name": "e", "run": RUN, "decay": 0.5, "epochs": [2, 4, 9]})
    with pytest.raises(ConfigError, match=r"emas\.e\.epochs: run ema-source keeps no epoch file for epoch\(s\) \[9\]; "
                                          r"it keeps \[1, 2, 3, 4\]"):
        ws.check_emas()


@pytest.mark.parametrize("entry, message", [
    ({"run": "nope", "decay": 0.5}, r"emas\.e: no run named 'nope'"),
    ({"run": RUN, "decay": 0.5, "epochs": [4, 2]}, r"epochs \[4, 2\] must ascend"),
    ({"run": RUN, "decay": 1.0}, r"decay"),
    ({"run": RUN}, r"decay"),
])
def test_entries_are_checked_when_the_project_loads(trainer, entry, message):
    with pytest.raises(ConfigError, match=message):
        with_emas(trainer, {"name": "e", **entry})

