"""Training state: a run stopped after 4 steps and resumed from disk ends bit-for-bit where an
uninterrupted run ends, for every optimizer family lorabake offers; the state format keeps exact types."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lorabake import store
from lorabake.train import state as training_state
from lorabake.train.state import (StateError, flatten, latest_state, load_state, prune, save_state, state_dir_name,
                                  state_dirs, unflatten)

TOTAL_STEPS, STOP_AT = 10, 4


def cosine(optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=TOTAL_STEPS)


def adamw8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-2)


def prodigy(params):
    from prodigyopt import Prodigy

    return Prodigy(params, lr=1.0, weight_decay=0.01)


def dadapt_adam(params):
    import dadaptation

    return dadaptation.DAdaptAdam(params, lr=1.0)


def adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=True)


def adafactor_schedule(optimizer):
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(optimizer)


OPTIMIZERS = {
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2), cosine),
    "adamw8bit": (adamw8bit, cosine),
    "prodigy": (prodigy, cosine),
    "dadapt_adam": (dadapt_adam, cosine),
    "adafactor": (adafactor, adafactor_schedule),
}


def make_training(kind: str, seed: int):
    """A 64×64 linear layer (4096 weights: bitsandbytes quantizes state from 4096 elements up, and keeps
    the 64-element bias in 32 bits), its optimizer and its scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 64)
    make_optimizer, make_scheduler = OPTIMIZERS[kind]
    optimizer = make_optimizer(model.parameters())
    return model, optimizer, make_scheduler(optimizer)


def train_steps(model, optimizer, scheduler, steps: range) -> None:
    data = torch.Generator().manual_seed(1234)
    inputs, targets = torch.randn(TOTAL_STEPS, 8, 64, generator=data), torch.randn(TOTAL_STEPS, 8, 64, generator=data)
    for step in steps:
        loss = torch.nn.functional.mse_loss(model(inputs[step]), targets[step])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def resumed_training(kind: str, tmp_path, restore_optimizer: bool = True):
    """Train 4 steps, save, rebuild everything from scratch (another seed), load, train the other 6."""
    model, optimizer, scheduler = make_training(kind, seed=0)
    train_steps(model, optimizer, scheduler, range(STOP_AT))
    directory = tmp_path / state_dir_name(STOP_AT)
    save_state(directory, network=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
               step=STOP_AT, epoch=1, extra={"digest": "cfg"})
    del model, optimizer, scheduler
    model, optimizer, scheduler = make_training(kind, seed=99)
    if restore_optimizer:
        resumed = load_state(directory, optimizer, scheduler)
    else:
        resumed = load_state(directory, *make_training(kind, seed=99)[1:])
    model.load_state_dict(resumed.network)
    assert (resumed.step, resumed.epoch, resumed.extra) == (STOP_AT, 1, {"digest": "cfg"})
    train_steps(model, optimizer, scheduler, range(STOP_AT, TOTAL_STEPS))
    return model, optimizer, scheduler


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_resumed_run_ends_bitwise_equal_to_uninterrupted(kind, tmp_path):
    model, optimizer, scheduler = make_training(kind, seed=0)
    train_steps(model, optimizer, scheduler, range(TOTAL_STEPS))
    resumed_model, resumed_optimizer, resumed_scheduler = resumed_training(kind, tmp_path)

    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, resumed_model.state_dict()[name]), name
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert resumed_scheduler.last_epoch == scheduler.last_epoch == TOTAL_STEPS
    if kind == "adamw8bit":  # the quantized path really ran (and survived the round trip)
        assert resumed_optimizer.state[resumed_model.weight]["state1"].dtype == torch.uint8
    if kind == "prodigy":  # Prodigy's adapted step size lives in its param groups
        assert resumed_optimizer.param_groups[0]["d"] == optimizer.param_groups[0]["d"]


def test_resume_without_optimizer_state_diverges(tmp_path):
    """The bitwise check above is not vacuous: restoring only the weights ends elsewhere."""
    model, optimizer, scheduler = make_training("adamw", seed=0)
    train_steps(model, optimizer, scheduler, range(TOTAL_STEPS))
    weights_only, _, _ = resumed_training("adamw", tmp_path, restore_optimizer=False)
    assert not torch.equal(model.weight, weights_only.weight)


def test_same_state_saves_to_the_same_bytes(tmp_path):
    model, optimizer, scheduler = make_training("adamw8bit", seed=0)
    train_steps(model, optimizer, scheduler, range(STOP_AT))
    for name in ("a", "b"):
        save_state(tmp_path / name, network=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                   step=STOP_AT, epoch=1, extra={"digest": "cfg", "torch_rng": torch.get_rng_state()})
    assert store.tree_sha256(tmp_path / "a") == store.tree_sha256(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["state.json", "tensors.safetensors"]


def assert_identical(restored, original, where="tree"):
    """Equal values of exactly the same types all the way down; floats compared by their bits."""
    assert type(restored) is type(original), where
    if isinstance(original, torch.Tensor):
        assert restored.dtype == original.dtype and torch.equal(restored, original), where
    elif isinstance(original, float):
        assert repr(restored) == repr(original), where  # tells -0.0 from 0.0 and nan from nan
    elif isinstance(original, dict):
        assert list(restored) == list(original), where
        for key in original:
            assert_identical(restored[key], original[key], f"{where}/{key!r}")
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), where
        for i, (a, b) in enumerate(zip(restored, original)):
            assert_identical(a, b, f"{where}/{i}")
    else:
        assert restored == original, where


def test_flatten_round_trip_keeps_exact_types():
    shared = torch.arange(6, dtype=torch.float32)
    tree = {
        "state": {0: {"step": 3, "exp_avg": shared, "RMS": torch.tensor(0.25, dtype=torch.float64)},
                  1: {"step": torch.tensor(3.0), "flag": True, "qmap": shared}},
        "param_groups": [{"betas": (0.9, 0.999), "eps": (1e-30, 1e-3), "lr": None, "params": [0, 1],
                          "d": 1 / 3, "growth_rate": math.inf, "floor": -math.inf, "gap": math.nan,
                          "zero": -0.0, "big": 2 ** 70, "name": "unet"}],
        "1": "a str key beside int key 1",
        "__tuple__": [1, 2],  # a real key that spells a tag
        "rng": random.Random(5).getstate(),
        "empty": ((), [], {}),
    }
    tensors, skeleton = flatten(tree)
    # The skeleton is standard JSON (no NaN/Infinity literals) and survives a trip through text.
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    restored = unflatten(tensors, skeleton)
    assert_identical(restored, tree)
    assert len(tensors) == 3  # `shared`, reached twice, is stored once ...
    assert restored["state"][0]["exp_avg"] is restored["state"][1]["qmap"]  # ... and restored as one


def test_flatten_refuses_what_it_cannot_restore():
    with pytest.raises(TypeError, match="param_groups/0/kind"):
        flatten({"param_groups": [{"kind": {1, 2}}]})
    with pytest.raises(TypeError, match="key of type float"):
        flatten({0.5: 1})


def test_extra_restores_python_rng_exactly(tmp_path):
    model, optimizer, scheduler = make_training("adamw", seed=0)
    rng = random.Random(7)
    rng.random()
    save_state(tmp_path / "s", network=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
               step=1, epoch=1, extra={"digest": "cfg", "python_rng": rng.getstate()})
    extra = load_state(tmp_path / "s", *make_training("adamw", seed=1)[1:]).extra
    resumed = random.Random()
    resumed.setstate(extra["python_rng"])
    assert [resumed.random() for _ in range(5)] == [rng.random() for _ in range(5)]


def save_at(root, step: int, digest: str) -> None:
    model, optimizer, scheduler = make_training("adamw", seed=0)
    save_state(root / state_dir_name(step), network=model.state_dict(), optimizer=optimizer,
               scheduler=scheduler, step=step, epoch=1, extra={"digest": digest})


def test_state_dirs_sort_by_step_and_latest_matches_the_digest(tmp_path):
    for step, digest in ((120, "mine"), (8, "mine"), (40, "mine"), (1000000, "other-config")):
        save_at(tmp_path, step, digest)
    (tmp_path / "step-000999.json").write_text("{}")  # a file, not a state
    assert [p.name for p in state_dirs(tmp_path)] == ["step-000008", "step-000040", "step-000120", "step-1000000"]
    assert latest_state(tmp_path, "mine") == tmp_path / "step-000120"
    assert latest_state(tmp_path, "never-saved") is None
    assert latest_state(tmp_path / "absent", "mine") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_at(tmp_path, step, "mine")
    prune(tmp_path, None)
    assert len(state_dirs(tmp_path)) == 4
    prune(tmp_path, 2)
    assert [p.name for p in state_dirs(tmp_path)] == ["step-000015", "step-000020"]


def test_half_written_state_is_never_seen(tmp_path, monkeypatch):
    save_at(tmp_path, 4, "mine")
    # A save that dies after its tensors are written leaves nothing where readers look ...
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_state.store, "write_text", die)
    with pytest.raises(KeyboardInterrupt):
        save_at(tmp_path, 8, "mine")
    monkeypatch.undo()
    assert not (tmp_path / "step-000008").exists()
    # ... and one killed outright (SIGKILL: no cleanup runs) leaves only a dot-named temporary directory.
    save_at(tmp_path, 12, "mine")
    (tmp_path / "step-000012").rename(tmp_path / ".step-000012.k1ll3d.tmp")
    assert [p.name for p in state_dirs(tmp_path)] == ["step-000004"]
    assert latest_state(tmp_path, "mine") == tmp_path / "step-000004"
    prune(tmp_path, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    save_at(tmp_path, 4, "old-config")
    save_at(tmp_path, 4, "new-config")
    assert latest_state(tmp_path, "new-config") == tmp_path / "step-000004"
    assert latest_state(tmp_path, "old-config") is None
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tensors.safetensors").unlink(), "tensors.safetensors is missing"),
    (lambda d: (d / "state.json").unlink(), "state.json is missing"),
    (lambda d: (d / "state.json").write_text("{not json"), "cannot read .*state.json"),
    (lambda d: (d / "tensors.safetensors").write_bytes(b"\x10\x00\x00"), "cannot read .*tensors.safetensors"),
    (lambda d: (d / "state.json").write_text(
        (d / "state.json").read_text().replace('"version": 1', '"version": 0')), "format version 0"),
])
def test_damaged_state_fails_naming_it(tmp_path, damage, message):
    save_at(tmp_path, 4, "mine")
    directory = tmp_path / "step-000004"
    damage(directory)
    with pytest.raises(StateError, match=message) as error:
        load_state(directory, *make_training("adamw", seed=0)[1:])
    assert str(directory) in str(error.value)


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("damage", [
    lambda f: truncate(f, lambda n: n - 1000),  # the data cut short (a copy or a disk that stopped)
    lambda f: truncate(f, lambda n: 20),  # cut inside the header
    lambda f: f.unlink(),
], ids=["data-cut-short", "header-cut-short", "missing"])
def test_damaged_newest_state_resumes_from_the_one_before_on_the_same_bytes(tmp_path, damage):
    model, optimizer, scheduler = make_training("adamw", seed=0)
    train_steps(model, optimizer, scheduler, range(TOTAL_STEPS))
    uninterrupted = model.state_dict()

    model, optimizer, scheduler = make_training("adamw", seed=0)
    for start, stop in ((0, 4), (4, 8)):
        train_steps(model, optimizer, scheduler, range(start, stop))
        save_state(tmp_path / state_dir_name(stop), network=model.state_dict(), optimizer=optimizer,
                   scheduler=scheduler, step=stop, epoch=1, extra={"digest": "cfg"})
    assert latest_state(tmp_path, "cfg") == tmp_path / "step-000008"
    damage(tmp_path / "step-000008" / "tensors.safetensors")

    with pytest.warns(UserWarning, match=r"skipping unreadable training state: .*step-000008.*tensors\.safetensors"):
        directory = latest_state(tmp_path, "cfg")
    assert directory == tmp_path / "step-000004"
    model, optimizer, scheduler = make_training("adamw", seed=99)
    resumed = load_state(directory, optimizer, scheduler)
    model.load_state_dict(resumed.network)
    train_steps(model, optimizer, scheduler, range(resumed.step, TOTAL_STEPS))
    for name, parameter in uninterrupted.items():
        assert torch.equal(parameter, model.state_dict()[name]), name


def test_missing_state_directory_fails_naming_it(tmp_path):
    with pytest.raises(StateError, match="step-000004 does not exist"):
        load_state(tmp_path / "step-000004", *make_training("adamw", seed=0)[1:])


def test_state_of_another_optimizer_is_refused(tmp_path):
    save_at(tmp_path, 4, "mine")
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    with pytest.raises(StateError, match="does not fit this optimizer"):
        load_state(tmp_path / "step-000004", optimizer, cosine(optimizer))


def test_views_and_shared_storage_are_saved_as_their_values(tmp_path):
    """safetensors refuses tensors that share memory or are not contiguous; the state copies those."""
    model, optimizer, scheduler = make_training("adamw", seed=0)
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    network = {"weight": weight, "transposed": weight.t(), "row": weight[1], "half": weight.to(torch.bfloat16)}
    save_state(tmp_path / "s", network=network, optimizer=optimizer, scheduler=scheduler, step=1, epoch=1)
    restored = load_state(tmp_path / "s", *make_training("adamw", seed=1)[1:]).network
    assert_identical(restored, network)
