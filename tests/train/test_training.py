"""Each training option does what it says: checked on what real training of the tiny model writes."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from lorabake import cli, config, paths, project
from lorabake.models import bases, network
from lorabake.train import loop, plan
from lorabake.unet_blocks import BLOCKS
from lorabake.workspace import Workspace

from conftest import make_project
from trainer import Trainer, eval_loss, fixed_batch, working_in


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    with working_in(make_project(tmp_path_factory.mktemp("training") / "project")) as trainer:
        yield trainer


def base_with(trainer: Trainer, lora=None) -> bases.Base:
    base = bases.load_base(trainer.project / "results/base/tiny")
    if lora is not None:
        network.apply_weights(lora, base.unet, base.text_encoder, 1.0)
    return base


# ---------------------------------------------------------------- networks × optimizers

LEARNING_RATES = {"adamw": 1e-2, "prodigy": 1.0}


# Every algo with AdamW, and Prodigy (an adaptive lr, its own code path) on one low-rank and one
# Hadamard-product algo: the matrix of all pairs cost 20 runs for what 12 show.
ALGO_OPTIMIZERS = [(algo, "adamw") for algo in config.ALGOS] + [("lora", "prodigy"), ("loha", "prodigy")]


@pytest.mark.parametrize("algo, optimizer", ALGO_OPTIMIZERS)
def test_every_algo_learns_and_saves_its_own_keys(trainer, algo, optimizer):
    net = {"algo": algo, "dim": 4, "alpha": 4}
    if algo == "lokr":
        net["factor"] = 4
    result = trainer.train(f"{algo}-{optimizer}", {
        "network": net, "optimizer": {"type": optimizer, "lr": LEARNING_RATES[optimizer]}})
    weights = result.weights()
    suffixes = {key.split(".", 1)[1] for key in weights}
    assert suffixes and suffixes <= network.KEY_SUFFIXES[algo], suffixes - network.KEY_SUFFIXES[algo]
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_")) for k in weights)
    batch = fixed_batch(base_with(trainer), trainer.project)
    before, after = eval_loss(base_with(trainer), batch), eval_loss(base_with(trainer, result.lora), batch)
    assert after < before, f"{algo}/{optimizer}: loss on a fixed batch {before:.4f} → {after:.4f}"
    assert result.metadata()["ss_network_args"]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "lion", "lion8bit", "sgd_nesterov", "sgd_nesterov8bit",
                                       "adafactor", "adafactor-relative", "dadapt_adam", "dadapt_lion"])
def test_every_optimizer_trains(trainer, optimizer):
    lr = {"lion": 1e-3, "lion8bit": 1e-3, "sgd_nesterov": 0.5, "sgd_nesterov8bit": 0.5,
          "dadapt_adam": 1.0, "dadapt_lion": 1.0}.get(optimizer, 1e-2)
    settings = {"type": optimizer, "lr": lr}
    if optimizer == "adafactor":
        settings["args"] = {"relative_step": False, "scale_parameter": False}
    scheduler = {"type": "adafactor"} if optimizer == "adafactor-relative" else {"type": "constant"}
    settings["type"] = optimizer.split("-")[0]
    result = trainer.train(f"opt-{optimizer}", {"optimizer": settings, "scheduler": scheduler})
    records = result.records
    assert len(records) == 8 and all(math.isfinite(r["loss"]) for r in records)
    untrained = base_with(trainer)
    deltas = network.module_deltas(result.lora, untrained.unet, untrained.text_encoder)
    assert max(d.abs().max().item() for d in deltas.values()) > 0  # the weights moved
    if optimizer == "adafactor-relative":  # its own relative-step lr, not the configured one, is logged
        assert records[0]["lr"] != lr and records[-1]["lr"] > records[0]["lr"]


def test_adaptive_optimizers_log_their_effective_lr(trainer):
    # At 128 px: at 64 px Prodigy kept d at d0 for 16 steps (measured; its estimate grows only as
    # gradients line up with the distance travelled, and 8×8 latents gave it too little to go on).
    records = trainer.train("prodigy-lr", {"resolution": 128, "optimizer": {"type": "prodigy", "lr": 1.0}}).records
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-6)  # Prodigy's d starts at d0 = 1e-6: d·lr
    assert lrs[-1] > lrs[0]               # and grows as it estimates the distance


@pytest.mark.parametrize("kind", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_logged_lr_follows_the_schedule(trainer, kind):
    total, warmup = 10, 0.2
    records = trainer.train(f"sched-{kind}", {
        "optimizer": {"lr": 1e-3}, "scheduler": {"type": kind, "warmup": warmup, "cycles": 2, "power": 2.0},
        "training": {"max_steps": total}}).records
    w = round(warmup * total)
    for record in records:
        k = record["step"] - 1  # the lr used by step k+1 is the schedule's value after k steps
        if k < w:
            expected = k / w
        else:
            progress = (k - w) / (total - w)
            expected = {"constant_with_warmup": 1.0, "linear": 1 - progress,
                        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                        "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1.0))),
                        "polynomial": None}[kind]
            if kind == "polynomial":
                end = 1e-7
                expected = ((1e-3 - end) * (1 - progress) ** 2 + end) / 1e-3
        assert record["lr"] == pytest.approx(1e-3 * expected, rel=1e-6, abs=1e-12), (kind, record)


# ---------------------------------------------------------------- what trains, when

def te_keys(weights):
    return [k for k in weights if k.startswith("lora_te_")]


def test_stop_text_encoder_at_freezes_it_from_that_step(trainer):
    result = trainer.train("stop-te", {"training": {"max_steps": 8, "stop_text_encoder_at": 0.5},
                                       "save": {"every_n_steps": 2}})
    step2, step4, final = (result.weights(paths.step_lora("stop-te", 2)), result.weights(paths.step_lora("stop-te", 4)),
                           result.weights())
    te = te_keys(final)
    unet = [k for k in final if k.startswith("lora_unet_") and "lora_up" in k]
    assert any(not torch.equal(step2[k], step4[k]) for k in te)      # trains up to step 4 …
    assert all(torch.equal(step4[k], final[k]) for k in te)          # … and not after it
    assert any(not torch.equal(step4[k], final[k]) for k in unet)    # while the UNet goes on


def test_block_lr_weights_scale_and_zero_blocks_keep_the_base(trainer):
    weights = [1.0] * 25
    weights[BLOCKS.index("IN01")] = 0.0     # kohya: weight 0 → no module, the block stays the base
    weights[BLOCKS.index("IN02")] = 0.5
    weights[BLOCKS.index("IN04")] = 0.05    # under the threshold below → no module either
    result = trainer.train("block-lr", {"network": {"block_lr_weights": weights, "block_lr_zero_threshold": 0.1},
                                        "optimizer": {"lr": 1e-3}})
    trained = result.weights()
    assert not [k for k in trained if k.startswith("lora_unet_down_blocks_0_attentions_0_")]   # IN01
    assert not [k for k in trained if k.startswith("lora_unet_down_blocks_1_attentions_0_")]   # IN04
    assert [k for k in trained if k.startswith("lora_unet_down_blocks_0_attentions_1_")]       # IN02
    lrs = result.records[0]["lrs"]
    assert lrs["unet:IN02"] == pytest.approx(0.5e-3) and lrs["unet:OUT05"] == pytest.approx(1e-3)
    assert "unet:IN01" not in lrs and "unet:IN04" not in lrs


def test_scale_weight_norms_bounds_every_module(trainer):
    limit = 0.05
    result = trainer.train("max-norm", {"optimizer": {"lr": 5e-2}, "loss": {"scale_weight_norms": limit}})
    assert max(r["scaled_modules"] for r in result.records) > 0
    base = base_with(trainer)
    deltas = network.module_deltas(result.lora, base.unet, base.text_encoder)
    assert max(d.norm().item() for d in deltas.values()) <= limit * (1 + 1e-3)


@pytest.mark.parametrize("dropout", [{"dropout": 0.3}, {"rank_dropout": 0.3}, {"module_dropout": 0.3}])
def test_network_dropouts_change_training(trainer, dropout):
    plain = trainer.train("drop-plain", {"training": {"max_steps": 3}})
    name = "drop-" + next(iter(dropout))
    dropped = trainer.train(name, {"training": {"max_steps": 3}, "network": dropout})
    assert plain.records[0]["loss"] == dropped.records[0]["loss"]   # up-weights start at zero …
    assert plain.records[-1]["loss"] != dropped.records[-1]["loss"]  # … then dropout changes what trains


def test_init_weights_continue_from_a_file(trainer):
    first = trainer.train("init-first", {"training": {"max_steps": 4}})
    shutil.copy(first.lora, trainer.project / "start.safetensors")
    again = trainer.train("init-again", {"training": {"max_steps": 1}, "optimizer": {"lr": 1e-12},
                                         "network": {"init_weights": "start.safetensors"}})
    start, continued = first.weights(), again.weights()
    assert start.keys() == continued.keys()
    assert all(torch.allclose(start[k], continued[k], atol=1e-9) for k in start)
    fresh = trainer.train("init-none", {"training": {"max_steps": 1}, "optimizer": {"lr": 1e-12}}).weights()
    assert any(not torch.allclose(start[k], fresh[k], atol=1e-6) for k in start)


# ---------------------------------------------------------------- saving and resuming

@pytest.mark.parametrize("ema", [False, True])
def test_resume_reproduces_the_uninterrupted_file(trainer, monkeypatch, ema):
    """Killed at step 5, resumed from step 4's state: the same bytes (and with `ema`, the same moving
    average: it is part of the state)."""
    name = "resume-ema" if ema else "resume"
    settings = {"training": {"max_steps": 6}, "save": {"every_n_steps": 2, "state": True}}
    if ema:
        settings["ema"] = {"decay": 0.9}
    whole = trainer.train(name, settings)
    final = [Path(paths.run_lora(name))] + ([Path(paths.ema_lora(paths.run_lora(name)))] if ema else [])
    expected, expected_records = [f.read_bytes() for f in final], whole.records
    steps_dir = Path(paths.run_lora(name)).parent / "steps"
    expected_steps = {p.name: p.read_bytes() for p in steps_dir.iterdir()}
    suffixes = ["", "-ema"] if ema else [""]
    assert sorted(expected_steps) == sorted(f"{name}-s{k:06d}{x}.safetensors" for k in (2, 4) for x in suffixes)
    shutil.rmtree(paths.run_dir(name))

    original = loop.train_step
    def killed_at_step_5(s, epoch, step, batches):
        if step == 5:
            raise KeyboardInterrupt("killed")
        return original(s, epoch, step, batches)
    monkeypatch.setattr(loop, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(name, settings)
    assert not os.path.exists(paths.run_lora(name))
    assert sorted(p.name for p in Path(paths.state_root(name)).glob("step-*")) == ["step-000002", "step-000004"]
    monkeypatch.setattr(loop, "train_step", original)
    shutil.rmtree(steps_dir)  # what Snakemake does to a failed job's outputs before it runs it again

    resumed = trainer.train(name, settings)
    assert [f.read_bytes() for f in final] == expected
    assert resumed.records == expected_records  # steps 1…6, each once, with the same losses
    assert {p.name: p.read_bytes() for p in steps_dir.iterdir()} == expected_steps  # restored, byte for byte


def test_keep_last_prunes_old_epoch_files(trainer):
    # the two-image dataset `other`: one step per epoch
    trainer.train("keep", {"datasets": ["other"], "training": {"max_steps": None, "epochs": 4, "batch_size": 4},
                           "save": {"every_n_epochs": 1, "keep_last": 2}})
    files = sorted(p.name for p in (trainer.project / "results/runs/keep/epochs").iterdir())
    assert files == ["keep-e0003.safetensors", "keep-e0004.safetensors"]


# ---------------------------------------------------------------- data, captions, precision

def test_color_and_crop_augmentation_read_pixels_instead_of_latents(trainer):
    result = trainer.train("color", {"augment": {"color": True, "random_crop": True}})
    assert len(result.records) == 8
    from lorabake.workspace import Workspace
    ws = Workspace.load(trainer.project / "configs/config.yaml")
    assert ws.latent_indexes("color") == {} and ws.train_params("color")["images"]["demo"]


def test_gradient_checkpointing_gives_the_same_training(trainer):
    plain = trainer.train("ckpt-off", {"training": {"max_steps": 3}})
    checkpointed = trainer.train("ckpt-on", {"training": {"max_steps": 3, "gradient_checkpointing": True}})
    for a, b in zip(plain.records, checkpointed.records):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_eager_attention_matches_sdpa(trainer):
    sdpa = trainer.train("attn-sdpa", {"training": {"max_steps": 2}})
    eager = trainer.train("attn-eager", {"training": {"max_steps": 2, "attention": "eager"}})
    assert sdpa.records[0]["loss"] == pytest.approx(eager.records[0]["loss"], rel=1e-4)


def test_bf16_mixed_precision_trains_close_to_fp32(trainer):
    fp32 = trainer.train("mp-no", {"training": {"max_steps": 3}})
    bf16 = trainer.train("mp-bf16", {"training": {"max_steps": 3, "mixed_precision": "bf16"}})
    first32, first16 = fp32.records[0]["loss"], bf16.records[0]["loss"]
    assert first16 != first32 and first16 == pytest.approx(first32, rel=0.05)
    assert bf16.metadata()["ss_mixed_precision"] == "bf16"


def test_full_bf16_trains_bf16_weights_and_fp16_is_refused_on_the_cpu(trainer):
    result = trainer.train("full-bf16", {"training": {"max_steps": 3, "mixed_precision": "bf16", "full_precision": True},
                                         "save": {"precision": "bf16"}})
    assert all(math.isfinite(r["loss"]) for r in result.records)
    trainer.write_run("fp16-cpu", {"training": {"mixed_precision": "fp16"}})
    from lorabake import cli
    assert cli.main(["--config", str(trainer.project / "configs/config.yaml"), "train", "--run", "fp16-cpu"]) == 2
    (trainer.project / "configs/runs/fp16-cpu.yaml").unlink()


def test_text_options_change_training(trainer):
    plain = trainer.train("text-plain", {"training": {"max_steps": 2}})
    for name, overrides in {"text-skip": {"training": {"clip_skip": 2}},
                            "text-long": {"training": {"max_token_length": 150}},
                            "text-weighted": {"captions": {"weighted": True, "shuffle": True, "keep_tokens": 1}}}.items():
        other = trainer.train(name, project.deep_merge({"training": {"max_steps": 2}}, overrides))
        assert other.records[0]["loss"] != plain.records[0]["loss"] or name == "text-weighted"
        assert len(other.records) == 2


@pytest.mark.parametrize("loss", [{"min_snr_gamma": 5.0}, {"noise_offset": 0.1, "adaptive_noise_scale": 0.01},
                                  {"multires_noise": {"iterations": 4, "discount": 0.3}},
                                  {"prediction": "v_prediction"}])
def test_loss_options_change_the_loss(trainer, loss):
    plain = trainer.train("loss-plain", {"training": {"max_steps": 2}})
    name = "loss-" + "-".join(loss)
    other = trainer.train(name, {"training": {"max_steps": 2}, "loss": loss})
    assert other.records[0]["loss"] != plain.records[0]["loss"]


def test_pivotal_tuning_trains_embeddings_for_a_fraction(trainer):
    result = trainer.train("pivotal", {"pivotal": {"token": "lbk", "num_new_tokens": 2, "frac": 0.5, "init": "shape"},
                                       "training": {"max_steps": 8}})
    from safetensors.torch import load_file
    saved = load_file(paths.embeddings("pivotal", "lbk"))
    vectors = next(iter(saved.values()))
    assert vectors.shape[0] == 2
    base = base_with(trainer)
    init_id = base.tokenizer("shape", add_special_tokens=False).input_ids[0]
    initial = base.text_encoder.get_input_embeddings().weight[init_id]
    assert not torch.allclose(vectors[0], initial)  # trained
    lrs = [r["lrs"]["embeddings"] for r in result.records]
    assert len(lrs) == 8
    trainer.cli("sample", "--run", "pivotal")  # the grid renders with the embeddings installed
    assert Path(paths.sample_grid("pivotal")).stat().st_size > 0


# ---------------------------------------------------------------- step arithmetic

def test_kohya_step_arithmetic_matches_the_dataset_report(trainer):
    reg = trainer.project / "datasets/demo/reg/2_shape"
    reg.mkdir(parents=True)
    for image in sorted((trainer.project / "datasets/demo/3_lbk_square").glob("*.png"))[:2]:
        shutil.copy2(image, reg / image.name)
    try:
        trainer.write_run("arith", {"training": {"epochs": 3, "batch_size": 2, "grad_accum": 2}}, quick=False)
        from lorabake.workspace import Workspace
        ws = Workspace.load(trainer.project / "configs/config.yaml")
        plan = ws.plan("arith")
        trainer.cli("dataset", "report", "--dataset", "demo")
        import json
        report = json.loads(Path(paths.dataset_report("demo")).read_text())["runs"]["arith"]
        assert (report["steps_per_epoch"], report["total_steps"]) == (plan.steps_per_epoch, plan.total_steps)
        # 5 circles × 5 repeats + 4 squares × 3 repeats = 37 entries, matched by 37 reg entries = 74;
        # per bucket ceil(n / 2) batches, then ceil(batches / 2) optimizer steps
        entries = loop.epoch_entries(ws.run("arith"), ws.run_datasets("arith"))
        assert len(entries) == 74
        from collections import Counter
        batches = sum(math.ceil(n / 2) for n in Counter(e.bucket for e in entries).values())
        assert plan.steps_per_epoch == math.ceil(batches / 2) and plan.total_steps == 3 * plan.steps_per_epoch
    finally:
        shutil.rmtree(reg.parent)
        (trainer.project / "configs/runs/arith.yaml").unlink()


# ---------------------------------------------------------------- data parallel

def test_two_cpu_processes_match_one_with_the_same_global_batch(trainer):
    # At 128 px: at 64 px the near-zero gradients, which Adam's first step turns into ±lr whatever
    # their size, are more, and float-order noise in them moved step 2's loss by 3e-4 (measured).
    one = trainer.train("dp-one", {"resolution": 128, "training": {"max_steps": 6, "batch_size": 4}})
    two = trainer.train("dp-two", {"resolution": 128, "training": {"max_steps": 6, "batch_size": 2, "processes": 2}})
    assert [r["step"] for r in two.records] == [r["step"] for r in one.records] == list(range(1, 7))
    for a, b in zip(one.records, two.records):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    w1, w2 = one.weights(), two.weights()
    # Adam divides by sqrt(v): float-order noise in near-zero gradients shows up, relatively small
    assert max(((w1[k] - w2[k]).norm() / w1[k].norm()).item() for k in w1 if w1[k].norm() > 0) < 1e-2
    assert two.metadata()["ss_num_processes"] == "2"
    assert sorted(p.name for p in (trainer.project / "results/runs/dp-two/epochs").iterdir()) == ["dp-two-e0001.safetensors"]


def test_a_diverging_run_stops_at_the_first_nan_and_keeps_the_last_good_file(trainer, monkeypatch, capsys):
    """kohya trains on through NaN and saves a LoRA of NaN; lorabake stops at the step and says why."""
    healthy = loop.micro_batch_loss

    def diverges_at_step_3(s, batch, epoch, step, rng, generator):
        loss = healthy(s, batch, epoch, step, rng, generator)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(loop, "micro_batch_loss", diverges_at_step_3)
    trainer.prepare("diverges", {"save": {"every_n_steps": 1}, "training": {"max_steps": 6}})
    assert cli.main(["--config", str(trainer.project / "configs/config.yaml"), "train", "--run", "diverges"]) == 2
    error = capsys.readouterr().err
    assert "run diverges: the loss is nan at step 3" in error and "lower optimizer.lr" in error
    records = [json.loads(line) for line in Path(paths.train_log("diverges")).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] is None
    kept = Path(paths.run_dir("diverges")) / "diverged" / Path(paths.step_lora("diverges", 2)).name
    assert kept.read_bytes() == Path(paths.step_lora("diverges", 2)).read_bytes()
    assert not Path(paths.step_lora("diverges", 3)).exists() and not Path(paths.run_lora("diverges")).exists()


def test_non_finite_weights_are_never_written(tmp_path):
    from lorabake import store

    with pytest.raises(store.NonFiniteWeights, match=r"lora.safetensors: not written: 1 tensor.*'b'"):
        store.write_safetensors(tmp_path / "lora.safetensors", {"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- kohya's newer training options

def test_gradient_clipping_bounds_the_norm_every_step_sees(trainer, monkeypatch):
    """The gradient the optimizer steps with has global norm ≤ max_grad_norm at every step; the logged
    norm (before clipping, as kohya logs it) is above it, so the clip really acted."""
    from lorabake.train import loop, optim

    seen, make = [], optim.make_optimizer

    def measure(optimizer, args, kwargs):  # runs inside optimizer.step(), before the update
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def watched(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(measure)
        return optimizer

    monkeypatch.setattr(loop.optim, "make_optimizer", watched)
    clipped = trainer.train("clip", {"training": {"max_steps": 4, "max_grad_norm": 0.01}})
    logged = [record["grad_norm"] for record in clipped.records]
    assert len(seen) == 4 and all(norm <= 0.01 * (1 + 1e-4) for norm in seen), seen
    assert all(norm > 0.01 for norm in logged), logged
    assert clipped.metadata()["ss_max_grad_norm"] == "0.01"
    seen.clear()
    free = trainer.train("clip-off", {"training": {"max_steps": 4, "max_grad_norm": 0}})
    assert "grad_norm" not in free.records[0] and max(seen) > 0.01  # unclipped, the same run goes past it


def test_loraplus_trains_the_up_matrices_faster(trainer):
    result = trainer.train("loraplus", {"training": {"max_steps": 2},
                                        "network": {"loraplus_lr_ratio": 4, "loraplus_text_encoder_lr_ratio": 2}})
    lrs = result.records[0]["lrs"]
    assert lrs["unet plus"] == pytest.approx(4 * lrs["unet"]) and lrs["text_encoder plus"] == pytest.approx(2 * lrs["text_encoder"])
    assert result.metadata()["ss_loraplus_lr_ratio"] == "4.0"
    with pytest.raises(ValueError, match="LoRA\\+ speeds up the up matrices of lora/locon modules; loha"):
        config.RunConfig.model_validate({"network": {"algo": "loha", "loraplus_lr_ratio": 4}})


def test_kohyas_loss_options_train_and_land_in_the_metadata(trainer):
    """The issue's combination: huber, clipping at 1, min_timestep 100, LoRA+ 4."""
    options = {"loss": {"type": "huber", "min_timestep": 100}, "training": {"max_steps": 4, "max_grad_norm": 1.0},
               "network": {"loraplus_lr_ratio": 4}, "validation": {"split": 0.2}}
    result = trainer.train("kohya-options", options)
    assert math.isfinite(result.records[-1]["val_loss"]) and result.metadata()["ss_validation_split"] == "0.2"
    meta = result.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_c"], meta["ss_huber_schedule"]) == ("huber", "0.1", "snr")
    assert (meta["ss_max_grad_norm"], meta["ss_min_timestep"], meta["ss_max_timestep"]) == ("1.0", "100", "None")
    plain = trainer.train("kohya-options-l2", project.deep_merge(options, {"loss": {"type": "l2"}}))
    assert result.records[0]["loss"] < plain.records[0]["loss"]  # pseudo-Huber ≤ L2 for every residual
    for loss in ({"debiased_estimation": True}, {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
                 {"zero_terminal_snr": True, "prediction": "v_prediction"}, {"v_pred_like_loss": 0.1}, {"type": "l1"}):
        other = trainer.train("kohya-" + "-".join(loss).replace("_", "-"), {"training": {"max_steps": 2}, "loss": loss})
        assert all(math.isfinite(r["loss"]) for r in other.records), loss


def test_validation_images_are_never_trained_on_and_scored_every_epoch(trainer, monkeypatch, capsys):
    seen = []
    original = loop.micro_batch_loss

    def watched(s, batch, *args, **kwargs):
        seen.extend(entry.item.rel for entry in batch)
        return original(s, batch, *args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch_loss", watched)
    overrides = {"training": {"epochs": 3, "batch_size": 6}, "validation": {"split": 0.3, "seed": 5}}
    result = trainer.train("validated", overrides, quick=False)
    ws = Workspace.load(trainer.project / "configs/config.yaml")
    held_out = {entry.item.rel for entry in plan.validation_entries(ws.run("validated"), ws.run_datasets("validated"))}
    everything = {item.rel for item in ws.run_datasets("validated")["demo"].train_items}
    assert held_out and held_out < everything and not held_out & set(seen)  # never in a training batch
    assert set(seen) == everything - held_out
    per_epoch = {r["epoch"]: r["val_loss"] for r in result.records if "val_loss" in r}
    assert sorted(per_epoch) == [1, 2, 3] and len(set(per_epoch.values())) == 3  # training moves it
    run, datasets = ws.run("validated"), ws.run_datasets("validated")
    trained = plan.epoch_entries(run, datasets)
    assert len(seen) == 3 * len(trained) < 3 * len(plan.epoch_entries(run.model_copy(update={"validation": None}), datasets))
    assert len(result.records) == 3 * ws.plan("validated").steps_per_epoch  # the plan counts trained images only
    capsys.readouterr()
    trainer.cli("validate")
    assert f"{len(held_out)} images held out for validation" in capsys.readouterr().out


def test_ema_weights_are_the_decayed_average(trainer):
    """ema.start 1: the average copies step 1's weights, then e_k = d·e_(k−1) + (1 − d)·w_k; the saved
    step files are w_1, w_2, the final file w_3, so the EMA file must be their decayed average."""
    result = trainer.train("ema", {"training": {"max_steps": 3, "batch_size": 2},
                                   "save": {"every_n_steps": 1, "precision": "fp32"},
                                   "ema": {"decay": 0.6, "every_n_steps": 1, "start": 1}})
    steps = [result.weights(paths.step_lora("ema", k)) for k in (1, 2)]
    final, ema = result.weights(), result.weights(paths.ema_lora(paths.run_lora("ema")))
    assert ema.keys() == final.keys()
    for key in final:
        expected = 0.6 * (0.6 * steps[0][key] + 0.4 * steps[1][key]) + 0.4 * final[key]
        if key.endswith(".alpha"):
            assert torch.equal(ema[key], final[key])
        else:
            assert torch.allclose(ema[key], expected, atol=1e-6), key
    assert any(not torch.allclose(ema[k], final[k]) for k in final if not k.endswith(".alpha"))
    for k in (1, 2):  # every checkpoint has its average beside it
        assert Path(paths.ema_lora(paths.step_lora("ema", k))).is_file()
    assert json.loads(result.metadata()["ss_max_train_steps"]) == 3


def test_folder_settings_reach_training(trainer):
    """datasets.demo.folders: a loss_weight of 0 on every folder leaves the LoRA untrained, and a
    folder's num_repeats changes the step count."""
    import yaml

    config_file = trainer.project / "configs/config.yaml"
    original = config_file.read_text()
    config = yaml.safe_load(original)
    folders = sorted(p.name for p in (trainer.project / "datasets/demo").iterdir() if p.is_dir() and p.name != "reg")
    config["datasets"]["demo"]["folders"] = {name: {"loss_weight": 0.0, "num_repeats": 1} for name in folders}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        silent = trainer.train("folders-zero", {"training": {"max_steps": 2}, "optimizer": {"type": "adamw"}})
        assert all(r["loss"] == 0.0 for r in silent.records)
        ups = [v for k, v in silent.weights().items() if k.endswith("lora_up.weight")]
        assert ups and all(torch.count_nonzero(v) == 0 for v in ups)  # zero-initialized, never moved
        ws = Workspace.load(config_file)
        images = len(ws.run_datasets("folders-zero")["demo"].train_items)
        assert ws.plan("folders-zero").steps_per_epoch == math.ceil(images / 2)  # 1 repeat each, batch 2
    finally:
        config_file.write_text(original)


def test_cached_text_encoder_outputs_train_as_the_encoder_does(trainer, monkeypatch):
    """Each distinct caption is encoded once, and the run's losses are the uncached run's (within float
    tolerance: batches of a different size go through the encoder)."""
    encoded = []
    original = loop.conditioning

    def counted(base, run, texts, sizes):
        encoded.extend(texts)
        return original(base, run, texts, sizes)

    monkeypatch.setattr(loop, "conditioning", counted)
    settings = {"training": {"max_steps": 6, "batch_size": 2}, "network": {"train_text_encoder": False}}
    plain = trainer.train("te-plain", settings)
    every_image = len(encoded)  # every image of every step, encoded again each time
    encoded.clear()
    cached = trainer.train("te-cached", project.deep_merge(settings, {"training": {"cache_text_encoder_outputs": True}}))
    assert len(encoded) == len(set(encoded)) < every_image  # each caption once
    for a, b in zip(plain.records, cached.records, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert cached.metadata()["ss_cache_text_encoder_outputs"] == "True"
    # Another run on the base reads what the first encoded from the disk cache: nothing to encode, and
    # exactly the first run's losses (the same stored states, bit for bit).
    store = next(trainer.project.glob("results/cache/text/*"))
    assert len(list(store.rglob("*.safetensors"))) == len(encoded)
    encoded.clear()
    again = trainer.train("te-cached-again", project.deep_merge(settings, {"training": {"cache_text_encoder_outputs": True}}))
    assert encoded == []
    assert [r["loss"] for r in again.records] == [r["loss"] for r in cached.records]
    # Another clip skip changes the encoders' output: its own entries, encoded afresh.
    trainer.train("te-cached-skip", project.deep_merge(settings, {"training": {"cache_text_encoder_outputs": True,
                                                                               "clip_skip": 2}}))
    assert len(encoded) == len(set(encoded)) > 0
    assert len(list(store.rglob("*.safetensors"))) == 2 * len(encoded)
    with pytest.raises(ValueError, match="cache_text_encoder_outputs reuses the text encoders' outputs"):
        config.RunConfig.model_validate({"datasets": ["demo"], "training": {"cache_text_encoder_outputs": True}})


def test_channels_last_trains_what_the_plain_path_trains(trainer):
    """channels_last changes how the UNet's convolutions run, not what they compute: a training step's
    loss is the plain run's within float tolerance. (compile goes through the same loop.unet_caller;
    its numbers are checked on the UNet below, where one compilation suffices.)"""
    settings = {"training": {"max_steps": 1, "batch_size": 2}}
    plain = trainer.train("speed-plain", settings)
    fast = trainer.train("speed-channels-last", project.deep_merge(settings, {"training": {"channels_last": True}}))
    assert fast.records[0]["loss"] == pytest.approx(plain.records[0]["loss"], rel=1e-5)
    assert fast.records[0]["grad_norm"] == pytest.approx(plain.records[0]["grad_norm"], rel=1e-2)


def test_channels_last_and_compiled_unets_give_the_plain_gradients():
    """The same UNet called through loop.unet_caller: outputs and every weight's gradient as the plain
    call's, to rounding. At 128 px: at 64 px the tiny UNet's middle block sees 1×1 latents, where
    GroupNorm normalizes two numbers and its gradient turns rounding into noise."""
    torch.manual_seed(0)
    reference = bases.tiny_unet()
    generator = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 700])

    def gradients(options: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet = copy.deepcopy(reference)
        run = config.RunConfig.model_validate({"datasets": ["demo"], "training": options})
        if run.training.channels_last:
            unet.to(memory_format=torch.channels_last)
        out = loop.unet_caller(unet, run)(sample, timesteps, context).sample
        out.pow(2).mean().backward()
        return out.detach(), [p.grad for p in unet.parameters()]

    plain_out, plain_grads = gradients({})
    for options in ({"channels_last": True}, {"compile": True, "compile_backend": "aot_eager"}):
        out, grads = gradients(options)
        torch.testing.assert_close(out, plain_out, rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(grads, plain_grads, strict=True):
            assert (ours - theirs).norm() <= 1e-3 * theirs.norm() + 1e-8, options


def test_cached_latents_are_read_from_the_store_once_per_run(trainer, monkeypatch):
    """An image's latents are read from disk the first time a batch needs them, then come from memory:
    16 images drawn from the demo's 9 (no flip: one state each) read each file once, 9 at most."""
    from lorabake.data import latents

    reads = []
    original = latents.load_latents

    def counted(index, entry, state="plain"):
        reads.append((entry["rel"], state))
        return original(index, entry, state)

    monkeypatch.setattr(latents, "load_latents", counted)
    result = trainer.train("latents-in-memory", {"training": {"max_steps": 8, "batch_size": 2}})
    assert len(reads) == len(set(reads)) <= 9 < 16
    assert all(math.isfinite(r["loss"]) for r in result.records)
