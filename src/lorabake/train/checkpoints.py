"""What a run saves and how it resumes: epoch and step LoRA files (with their EMA copies), kohya's
`ss_*` facts in each, pruning to save.keep_last, the saved training state, and putting back the
checkpoints a killed run had written when its rerun resumes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lorabake import optimizers, paths, store
from lorabake.config import RunConfig
from lorabake.models import bases, lora_format, network
from lorabake.train import optim, pivotal, state
from lorabake.train.plan import saved_epochs
from lorabake.train.session import Session


def save_due(s: Session, epoch: int, step: int) -> None:
    """Epoch files at the end of every saved epoch, step files every N steps, states with them."""
    name, save = s.inputs.name, s.run.save
    epoch_ends = step == min(epoch * s.plan.steps_per_epoch, s.plan.total_steps)
    saved = []
    if epoch_ends and epoch in saved_epochs(s.run, s.plan):
        saved.append(save_checkpoint(s, epoch, step, paths.epoch_lora(name, epoch)))
    if save.every_n_steps and step % save.every_n_steps == 0 and step < s.plan.total_steps:
        saved.append(save_checkpoint(s, epoch, step, paths.step_lora(name, step)))
    if s.ema is not None:
        saved += [paths.ema_lora(path) for path in saved]
    if saved and save.keep_last:
        prune_checkpoints(s.inputs.root, name, save.keep_last)
    if saved and save.state:
        keep_for_resume(s, saved)
        save_state(s, epoch, step)


def save_checkpoint(s: Session, epoch: int, step: int, path: str) -> str:
    """Write the network's LoRA file at `path` (an artifact path, under the project root)."""
    run, net = s.run, s.net
    metadata = lora_format.lora_metadata(
        run_name=s.inputs.name, algo=run.network.algo, dim=run.network.dim, alpha=run.network.alpha,
        network_args=network.kohya_network_args(run.network), base=bases.base_info(s.inputs.base_dir),
        resolution=run.size, epoch=epoch, steps=step, facts={**s.inputs.facts, **training_facts(s)})
    weights = network.kohya_state(net, s.base.unet, s.base.te)
    lora_format.save_lora(weights, s.inputs.root / path, run.save.precision, metadata)
    s.last_saved = path
    if s.ema is not None:
        save_ema(s, paths.ema_lora(path), metadata)
    else:
        (s.inputs.root / paths.ema_lora(path)).unlink(missing_ok=True)  # from an earlier run with ema on
    return path


def save_ema(s: Session, path: str, metadata: dict[str, str]) -> None:
    """The moving average as a LoRA file of its own: loaded into the network for the save, then the
    trained weights are put back."""
    trained = {key: value.detach().clone() for key, value in s.net.state_dict().items()}
    with torch.no_grad():
        s.net.load_state_dict({**trained, **{k: v.to(trained[k].dtype) for k, v in s.ema.items()}})
        # copies: a state dict's tensors are the parameters themselves, which the next line restores
        weights = {key: value.clone() for key, value in network.kohya_state(s.net, s.base.unet, s.base.te).items()}
        s.net.load_state_dict(trained)
    cfg = s.run.ema
    meta = {**metadata, "lorabake_ema": json.dumps({"decay": cfg.decay, "every_n_steps": cfg.every_n_steps,
                                                    "start": cfg.start})}
    lora_format.save_lora(weights, s.inputs.root / path, s.run.save.precision, meta)


def save_embeddings(s: Session) -> None:
    """Pivotal vectors beside the LoRA, named by the prompt word (webui's convention)."""
    cfg = s.run.pivotal
    vectors = {key: value.detach() for key, value in s.embeddings.items()}
    pivotal.save_embeddings(s.inputs.root / paths.embeddings(s.inputs.name, cfg.token), vectors, cfg,
                            {"lorabake_run": s.inputs.name, "lorabake_base_id": bases.base_id(s.inputs.base_dir)})


def training_facts(s: Session) -> dict[str, str]:
    """kohya's `ss_*` training facts for the metadata."""
    run, opt = s.run, s.run.optimizer
    return {"ss_num_epochs": str(s.plan.epochs), "ss_max_train_steps": str(s.plan.total_steps),
            "ss_batch_size_per_device": str(run.training.batch_size), "ss_num_processes": str(run.processes),
            "ss_gradient_accumulation_steps": str(run.training.grad_accum),
            "ss_learning_rate": f"{opt.lr:g}", "ss_unet_lr": f"{opt.unet_lr or opt.lr:g}",
            "ss_text_encoder_lr": te_lrs(opt), "ss_seed": str(run.training.seed),
            "ss_lr_scheduler": run.scheduler.type, "ss_lr_warmup_steps": str(optim.warmup_steps(run.scheduler.warmup, s.plan.total_steps)),
            "ss_optimizer": optimizers.describe(opt.type, opt.args), "ss_flip_aug": str(run.augment.flip),
            "ss_color_aug": str(run.augment.color), "ss_random_crop": str(run.augment.random_crop),
            "ss_clip_skip": str(run.training.clip_skip), "ss_max_token_length": str(run.training.max_token_length),
            "ss_mixed_precision": run.training.mixed_precision, "ss_shuffle_caption": str(run.captions.shuffle),
            "ss_keep_tokens": str(run.captions.keep_tokens), "ss_caption_dropout_rate": f"{run.captions.dropout_rate:g}",
            "ss_caption_dropout_every_n_epochs": str(run.captions.dropout_every_n_epochs),
            "ss_caption_tag_dropout_rate": f"{run.captions.tag_dropout_rate:g}",
            "ss_min_snr_gamma": str(run.loss.min_snr_gamma), "ss_noise_offset": f"{run.loss.noise_offset:g}",
            "ss_adaptive_noise_scale": str(run.loss.adaptive_noise_scale),
            "ss_multires_noise_iterations": str(run.loss.multires_noise.iterations),
            "ss_multires_noise_discount": f"{run.loss.multires_noise.discount:g}",
            "ss_prior_loss_weight": f"{run.loss.prior_loss_weight:g}",
            "ss_scale_weight_norms": str(run.loss.scale_weight_norms), "ss_v_parameterization": str(s.prediction == "v_prediction"),
            "ss_network_dropout": f"{run.network.dropout:g}",
            "ss_gradient_checkpointing": str(run.training.gradient_checkpointing),
            "ss_cache_text_encoder_outputs": str(run.training.cache_text_encoder_outputs),
            "ss_max_grad_norm": str(run.training.max_grad_norm), "ss_masked_loss": str(run.loss.masked),
            **loss_facts(run),
            "ss_validation_split": str(run.validation.split if run.validation else 0.0),
            "ss_validation_seed": str(run.validation.seed if run.validation else None)}


def te_lrs(opt) -> str:
    """kohya's ss_text_encoder_lr: one rate, or SDXL's two as the list kohya writes."""
    first = opt.text_encoder_lr or opt.lr
    return f"{first:g}" if opt.text_encoder_2_lr is None else str([first, opt.text_encoder_2_lr])


def loss_facts(run: RunConfig) -> dict[str, str]:
    """The loss options' `ss_*` keys, written as kohya writes them (None as "None")."""
    loss, net = run.loss, run.network
    return {"ss_loss_type": loss.type, "ss_huber_schedule": loss.huber_schedule, "ss_huber_c": str(loss.huber_c),
            "ss_huber_scale": str(loss.huber_scale), "ss_debiased_estimation": str(loss.debiased_estimation),
            "ss_v_pred_like_loss": str(loss.v_pred_like_loss), "ss_ip_noise_gamma": str(loss.ip_noise_gamma),
            "ss_ip_noise_gamma_random_strength": str(loss.ip_noise_gamma_random_strength),
            "ss_zero_terminal_snr": str(loss.zero_terminal_snr), "ss_min_timestep": str(loss.min_timestep),
            "ss_max_timestep": str(loss.max_timestep), "ss_loraplus_lr_ratio": str(net.loraplus_lr_ratio),
            "ss_loraplus_unet_lr_ratio": str(net.loraplus_unet_lr_ratio),
            "ss_loraplus_text_encoder_lr_ratio": str(net.loraplus_text_encoder_lr_ratio)}


def prune_checkpoints(root: Path, name: str, keep_last: int) -> None:
    """kohya's save_last_n_epochs: only the newest N epoch files (and N step files) stay."""
    for folder, pattern in (("epochs", f"{name}-e*.safetensors"), ("steps", f"{name}-s*.safetensors")):
        files = sorted(p for p in (root / paths.run_dir(name) / folder).glob(pattern) if not p.stem.endswith("-ema"))
        for old in files[:-keep_last]:
            old.unlink()
            (old.parent / Path(paths.ema_lora(old.name))).unlink(missing_ok=True)


# ---------------------------------------------------------------- saved state and resuming

def keep_for_resume(s: Session, saved: list[str]) -> None:
    """Snakemake deletes a job's outputs before it runs the job again, so the epoch and step files a
    killed run had written would be gone after its resume. A hard link of each (a copy where links
    do not work) waits under the run's state folder, which is no output, until a resume restores it."""
    root, name = s.inputs.root, s.inputs.name
    s.kept = [path for path in s.kept if (root / path).exists()] + saved  # keep_last may have pruned some
    copies = root / paths.state_root(name) / CHECKPOINT_COPIES
    copies.mkdir(parents=True, exist_ok=True)
    for path in saved:
        _link_or_copy(root / path, copies / Path(path).name)
    for stale in set(p.name for p in copies.iterdir()) - {Path(p).name for p in s.kept}:
        (copies / stale).unlink(missing_ok=True)


def restore_kept(s: Session, kept: list[str]) -> None:
    """Put back the epoch and step files the resumed state had written, where a rerun removed them."""
    copies = s.inputs.root / paths.state_root(s.inputs.name) / CHECKPOINT_COPIES
    for path in kept:
        if not (s.inputs.root / path).exists():
            _link_or_copy(copies / Path(path).name, s.inputs.root / path)
    s.kept = list(kept)


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        store.write_bytes(destination, source.read_bytes())


CHECKPOINT_COPIES = "checkpoints"  # under state/: the epoch/step files written so far


EMA_PREFIX = "ema."  # the moving average's tensors in a saved state, beside the network's


def embeddings_state_key(key: str) -> str:
    """A saved state's name for the pivotal vectors of one file key (SD1's as before SDXL had two)."""
    return "pivotal.embeddings" if key == pivotal.PARAM_KEY else f"pivotal.embeddings.{key}"


def save_state(s: Session, epoch: int, step: int) -> None:
    weights = dict(s.net.state_dict())
    if s.embeddings is not None:
        weights |= {embeddings_state_key(key): value.detach() for key, value in s.embeddings.items()}
    if s.ema is not None:
        weights |= {f"{EMA_PREFIX}{key}": value for key, value in s.ema.items()}
    root = s.inputs.root / paths.state_root(s.inputs.name)
    state.save_state(root / state.state_dir_name(step), network=weights, optimizer=s.optimizer.optimizer,
                     scheduler=s.scheduler, step=step, epoch=epoch,
                     extra={"digest": s.inputs.digest, "records": s.records, "checkpoints": s.kept})
    state.prune(root, s.run.save.keep_last)


def resume(s: Session) -> int:
    """The step to continue after: that of the newest state saved by this same run, else 0."""
    if not s.run.save.state:
        return 0
    directory = state.latest_state(s.inputs.root / paths.state_root(s.inputs.name), s.inputs.digest)
    if directory is None:
        return 0
    saved = state.load_state(directory, s.optimizer.optimizer, s.scheduler)
    weights = dict(saved.network)
    if s.embeddings is not None:
        with torch.no_grad():
            for key, vectors in s.embeddings.items():
                vectors.copy_(weights.pop(embeddings_state_key(key)))
    if s.ema is not None:
        s.ema = {key.removeprefix(EMA_PREFIX): weights.pop(key).float() for key in list(weights)
                 if key.startswith(EMA_PREFIX)}
    s.net.load_state_dict(weights)
    s.records = list(saved.extra["records"])
    restore_kept(s, saved.extra.get("checkpoints", []))
    print(f"train {s.inputs.name}: resuming from {directory} (step {saved.step} of {s.plan.total_steps})")
    return saved.step
