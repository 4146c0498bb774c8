"""The training loop, read top to bottom.

Latents come from the content-addressed cache (or the VAE, when augmentation changes pixels),
captions from the dataset folders, the network from lycoris-lora, optimizers and schedules from
`lorabake.train.optim`, losses and noise from `losses`, device placement and autocast from accelerate.

Every random choice of a step (batch order of its epoch, flips, caption shuffles, noise, timesteps,
dropout) derives from (seed, epoch) or (seed, step) alone. So a run resumed from a saved state draws
exactly what the uninterrupted run drew, and on the CPU ends in the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from pathlib import Path
from typing import Iterator

import torch

from lorabake import paths, store
from lorabake.config import ConfigError, RunConfig
from lorabake.models import bases, network
from lorabake.progress import progress as progress_bar
from lorabake.render import plots
from lorabake.train import captions, losses, optim, pivotal
from lorabake.train.data import CachedLatents, PixelLatents
from lorabake.train.checkpoints import resume, save_checkpoint, save_due, save_embeddings
from lorabake.train.plan import Entry, TrainingPlan, batches, epoch_entries, plan_training, validation_entries
from lorabake.train.session import RunInputs, Session
from lorabake.train.text_cache import TextCache


# ---------------------------------------------------------------- the run

def train(inputs: RunInputs) -> list[dict]:
    """Train one run and write its files; returns the per-step records of train.jsonl.

    Build the models, network, optimizer and schedule; continue after the newest saved state, if
    any; then for each optimizer step, accumulate the micro-batches' loss, step, and save what is
    due. The final LoRA, the embeddings and the logs are written by the main process only."""
    s = setup(inputs)
    start = resume(s)
    entries = epoch_entries(s.run, inputs.datasets)
    held_out = validation_entries(s.run, inputs.datasets)
    if s.run.validation is not None and not held_out:
        print(f"warning: train {inputs.name}: validation.split {s.run.validation.split:g} holds out no image "
              "(each concept folder keeps at least one, and rounds its share): no val_loss", file=sys.stderr)
    progress = progress_bar(s.plan.total_steps, f"train {inputs.name}", unit="step", initial=start,
                            disable=not s.is_main)
    for epoch, step, micro_batches in step_schedule(s.run, entries, s.plan):
        if step <= start:
            continue
        record = train_step(s, epoch, step, micro_batches)
        s.records.append(record)
        if not math.isfinite(record["loss"]):
            progress.close()
            stop_diverged(s, epoch, step, record)
        if held_out and validation_due(s, epoch, step):
            record["val_loss"] = validation_loss(s, held_out)
        progress.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}")
        progress.update()
        if s.is_main:  # every process holds the same weights; one writes them
            save_due(s, epoch, step)
    progress.close()
    if s.is_main:
        if s.embeddings is not None:
            save_embeddings(s)
        save_checkpoint(s, s.plan.epochs, s.plan.total_steps, paths.run_lora(inputs.name))
        write_logs(inputs.name, s.records, s.plan, inputs.root)
        if s.text_cache is not None:
            print(f"train {inputs.name}: {s.text_cache.summary()}")
    s.accelerator.wait_for_everyone()
    return s.records


# ---------------------------------------------------------------- set-up

def setup(inputs: RunInputs) -> Session:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    run = inputs.run
    plan = plan_training(run, inputs.datasets)
    AcceleratorState._reset_state()  # accelerate keeps one global state; each run sets its own precision
    accelerator = Accelerator(mixed_precision=run.training.mixed_precision)
    if accelerator.num_processes != run.processes:
        raise ConfigError(f"run {inputs.name} wants {run.processes} process(es) but runs in {accelerator.num_processes}: "
                          "start it with `lorabake train`, which launches the processes itself")
    if run.training.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        # accelerate would accept it and autocast in float32: an option silently ignored
        raise ConfigError(f"run {inputs.name}: training.mixed_precision fp16 needs a CUDA device, "
                          f"this one is {accelerator.device.type}; use bf16 (or no) here")
    parts = ("unet", "text_encoder") if run.caches_latents else ("unet", "text_encoder", "vae")
    base = bases.load_base(inputs.base_dir, parts=parts)
    check_architecture(inputs.name, run, base.arch)
    configure_models(base, run)
    if run.loss.zero_terminal_snr:
        base.noise_scheduler = losses.zero_terminal_snr(base.noise_scheduler)
    # New pivotal tokens first: the network then wraps a text encoder that already knows them.
    embeddings = pivotal.add_tokens_to_all(base.tokenizers, base.text_encoders, run.pivotal, run.training.seed) \
        if run.pivotal else None
    net = network.create_network(base.unet, base.te, run.network, run.training.seed, inputs.root)
    if run.training.full_precision:
        net.to(dtype=autocast_dtype(run))
    groups = param_groups(net, embeddings, run, base.arch)
    optimizer = optim.make_optimizer(run.optimizer.type, groups, run.optimizer.lr, run.optimizer.args,
                                     accelerator.device.type)
    scheduler = optim.make_scheduler(run.scheduler.type, optimizer, plan.total_steps, run.scheduler.warmup,
                                     run.scheduler.cycles, run.scheduler.power)
    for model in (base.unet, *base.text_encoders, net) + ((base.vae,) if base.vae is not None else ()):
        model.to(accelerator.device)
    if run.training.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    optimizer = accelerator.prepare(optimizer)  # fp16: gradient scaling; otherwise a thin wrapper
    net.train()
    latents_of = CachedLatents(inputs.indexes, run.augment.flip, run.bucket_spec(), run.loss.masked) \
        if run.caches_latents else PixelLatents(base.vae, run)
    session = Session(inputs, plan, base, net, embeddings, optimizer, scheduler, accelerator, latents_of,
                      losses.prediction_type(run.loss, base.noise_scheduler))
    session.unet = unet_caller(base.unet, run)
    session.ema = ema_weights(net) if run.ema is not None else None
    if run.training.cache_text_encoder_outputs:
        session.text_cache = TextCache.for_run(inputs.root, base.id, base.arch, run.training, run.captions.weighted,
                                               accelerator.device.type)
    return session


def check_architecture(name: str, run: RunConfig, arch: str) -> None:
    """The config check again, against the base as built (load_project already refused these)."""
    problems = run.unsupported_on(arch)
    if problems:
        raise ConfigError(f"run {name} (base {run.base}, {arch}): " + "; ".join(problems))


def configure_models(base: bases.Base, run: RunConfig) -> None:
    """Frozen base weights; attention kernel and gradient checkpointing as configured."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for model in (base.unet, base.vae, *base.text_encoders):
        if model is not None:
            model.requires_grad_(False)
    base.unet.set_attn_processor(AttnProcessor2_0() if run.training.attention == "sdpa" else AttnProcessor())
    if run.training.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()  # diffusers only checkpoints modules in training mode
        if run.network.train_text_encoder or run.pivotal:
            for text_encoder in base.text_encoders:
                text_encoder.gradient_checkpointing_enable()
                text_encoder.train()


def unet_caller(unet, run: RunConfig):
    """The UNet as the steps call it: compiled (training.compile, with its backend) or as it is, and
    with channels-last inputs under training.channels_last. Files are written from the module itself."""
    call = torch.compile(unet, backend=run.training.compile_backend) if run.training.compile else unet
    if not run.training.channels_last:
        return call
    return lambda sample, *args, **kwargs: call(sample.contiguous(memory_format=torch.channels_last), *args, **kwargs)


def autocast_dtype(run: RunConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.training.mixed_precision, torch.float32)


def param_groups(net, embeddings, run: RunConfig, arch: str = "sd1") -> list[dict]:
    """The network's groups (UNet per block when block LR weights are set, text encoder), plus the
    pivotal embeddings, each with its own learning rate."""
    opt = run.optimizer
    text_lr = opt.text_encoder_lr or opt.lr
    groups = network.param_groups(net, run.network, opt.unet_lr or opt.lr, text_lr, opt.text_encoder_2_lr, arch)
    if embeddings is not None:
        groups.append({"params": list(embeddings.values()), "lr": pivotal.learning_rate(run.pivotal, text_lr),
                       "name": "embeddings"})
    return groups


# ---------------------------------------------------------------- what each step sees

def stream_key(seed: int, step: int | str) -> int:
    """A 63-bit seed of its own for each (seed, step or named draw)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:step:{step}".encode()).digest()[:8], "big") >> 1


def step_rngs(seed: int, step: int | str) -> tuple[random.Random, torch.Generator]:
    """The step's own random streams: Python's for data choices, a torch generator for noise and
    timesteps; torch's global seed is set too, for dropout inside the network."""
    key = stream_key(seed, step)
    torch.manual_seed(key)
    return random.Random(key), torch.Generator().manual_seed(key)


def step_schedule(run: RunConfig, entries: list[Entry], plan: TrainingPlan) -> Iterator[tuple[int, int, list]]:
    """(epoch, step, micro-batches) for every optimizer step: each epoch's batches are shuffled from
    (seed, epoch), and every grad_accum batches make one step."""
    step, accum = 0, run.training.grad_accum
    for epoch in range(1, plan.epochs + 1):
        epoch_batches = batches(list(entries), run.global_batch, random.Random(f"{run.training.seed}:epoch:{epoch}"))
        for start in range(0, len(epoch_batches), accum):
            step += 1
            if step > plan.total_steps:
                return
            yield epoch, step, epoch_batches[start:start + accum]


def until(fraction: float | None, total_steps: int) -> int:
    """Last step of a phase that lasts `fraction` of training (None: all of it)."""
    return total_steps if fraction is None else round(fraction * total_steps)


def text_encoder_trains(run: RunConfig, step: int, total_steps: int) -> bool:
    return run.network.train_text_encoder and step <= until(run.training.stop_text_encoder_at, total_steps)


def embeddings_train(run: RunConfig, step: int, total_steps: int) -> bool:
    return run.pivotal is not None and pivotal.is_training(step, total_steps, run.pivotal)


def freeze_finished_phases(s: Session, step: int) -> None:
    """Past stop_text_encoder_at (or the pivotal fraction) those weights get no gradient, so no
    optimizer touches them again — not even momentum or weight decay."""
    if not text_encoder_trains(s.run, step, s.plan.total_steps):
        for p in (p for lora in s.net.text_encoder_loras for p in lora.parameters()):
            p.requires_grad_(False)
            p.grad = None
    if s.embeddings is not None:
        pivotal.freeze_after(s.embeddings, step, s.plan.total_steps, s.run.pivotal)


def caption_of(entry: Entry, run: RunConfig, rng: random.Random, epoch: int) -> str:
    cfg, item = run.captions, entry.item
    own = {key: value for key, value in (("keep_tokens", item.keep_tokens), ("shuffle", item.shuffle)) if value is not None}
    text = captions.process_caption(item.caption, cfg.model_copy(update=own) if own else cfg, rng, epoch)
    return pivotal.substitute(text, run.pivotal) if run.pivotal else text


# ---------------------------------------------------------------- one step

def micro_batch_loss(s: Session, batch: list[Entry], epoch: int, step: int,
                     rng: random.Random, generator: torch.Generator) -> torch.Tensor | None:
    """This process's share of the batch's mean loss (the whole mean with one process); None when
    its share is empty. Every process draws the whole batch's randomness, then keeps its slice, so N
    processes see exactly what one process with the same global batch sees."""
    run, base, device = s.run, s.base, s.accelerator.device
    schedule = base.noise_scheduler
    mine = slice(s.accelerator.process_index, None, s.world)
    # Fetch the latents (cached ones, or encoded now from augmented pixels), their sizes and masks.
    latents, sizes, masks = s.latents_of(batch, rng)
    # Caption as this epoch sees it (shuffled, dropped, pivotal tokens in).
    texts = [caption_of(entry, run, rng, epoch) for entry in batch]
    # Sample noise (offset / multires as configured) and a timestep per image.
    noise = losses.sample_noise(latents, run.loss, generator)
    timesteps = losses.sample_timesteps(len(batch), run.loss, schedule.config.num_train_timesteps, generator)
    noised_with = losses.input_noise(noise, run.loss, generator)
    latents, noise, noised_with = latents[mine].to(device), noise[mine].to(device), noised_with[mine].to(device)
    timesteps, texts = timesteps[mine].to(device), texts[mine]
    if not texts:
        return None
    # Encode the captions; the text encoder builds a graph only while something in it trains.
    grads = text_encoder_trains(run, step, s.plan.total_steps) or embeddings_train(run, step, s.plan.total_steps)
    with torch.set_grad_enabled(grads), s.accelerator.autocast():
        text, extra = encode(s, texts, sizes[mine].to(device))
    # Noise the latents; predict the noise (or the velocity) and regress on it, weighted per image.
    noisy_latents = schedule.add_noise(latents, noised_with, timesteps)
    target = noise if s.prediction == "epsilon" else schedule.get_velocity(latents, noise, timesteps)
    with s.accelerator.autocast():
        prediction = s.unet(noisy_latents, timesteps, text, added_cond_kwargs=extra).sample
    is_reg = torch.tensor([entry.item.is_reg for entry in batch[mine]], device=device)
    weights = [entry.item.loss_weight for entry in batch[mine]]
    loss = losses.training_loss(prediction, target, timesteps, is_reg, run.loss, schedule, s.prediction,
                                None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=device),
                                None if masks is None else masks[mine].to(device))
    return loss if s.world == 1 else loss * (len(texts) / len(batch))


# kohya's fixed validation timesteps (train_network.py): the held-out loss is measured at each
VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)


def validation_due(s: Session, epoch: int, step: int) -> bool:
    """After every validation.every_n_epochs-th epoch's last step, and after the run's last step."""
    last = step == s.plan.total_steps
    return last or (step % s.plan.steps_per_epoch == 0 and epoch % s.run.validation.every_n_epochs == 0)


def validation_loss(s: Session, held_out: list[Entry]) -> float:
    """The mean loss of the held-out images at kohya's fixed timesteps (those inside the run's
    timestep range), each with its own fixed noise, the same every epoch, so the numbers compare
    across epochs; the network in eval mode (no dropout), no gradient, captions as written."""
    run, base, device = s.run, s.base, s.accelerator.device
    schedule, cfg = base.noise_scheduler, run.loss
    low, high = losses.timestep_range(cfg, schedule.config.num_train_timesteps)
    timesteps = [t for t in VALIDATION_TIMESTEPS if low <= t < high] or [(low + high) // 2]
    seed = run.training.seed if run.validation.seed is None else run.validation.seed
    total = []
    s.net.eval()
    try:
        with torch.no_grad():
            for entry in held_out:
                name = f"validation:{entry.dataset}:{entry.item.rel}"
                rng = random.Random(stream_key(seed, name))
                latents, sizes, masks = s.latents_of([entry], rng)
                latents = latents.to(device)
                caption = pivotal.substitute(entry.item.caption, run.pivotal) if run.pivotal else entry.item.caption
                with s.accelerator.autocast():
                    text, extra = encode(s, [caption], sizes.to(device))
                for t in timesteps:
                    generator = torch.Generator().manual_seed(stream_key(seed, f"{name}:{t}"))
                    noise = torch.randn(latents.shape, generator=generator).to(latents)
                    t_batch = torch.tensor([t], device=device)
                    target = noise if s.prediction == "epsilon" else schedule.get_velocity(latents, noise, t_batch)
                    with s.accelerator.autocast():
                        prediction = s.unet(schedule.add_noise(latents, noise, t_batch), t_batch, text,
                                               added_cond_kwargs=extra).sample
                    not_reg = torch.zeros(1, dtype=torch.bool, device=device)
                    total.append(losses.training_loss(prediction, target, t_batch, not_reg, cfg, schedule, s.prediction,
                                                      masks=None if masks is None else masks.to(device)).item())
    finally:
        s.net.train()
    return sum(total) / len(total)


def encode(s: Session, texts: list[str], sizes: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """The batch's conditioning; with training.cache_text_encoder_outputs each distinct caption is
    encoded once, by this run or any run before it on the same base and settings (text_cache), and
    its states are reused."""
    cache = s.text_cache
    if cache is None:
        return conditioning(s.base, s.run, texts, sizes)
    missing = list(dict.fromkeys(t for t in texts if cache.read(t) is None))
    if missing:
        with torch.no_grad():
            hidden, extra = conditioning(s.base, s.run, missing, sizes[:1].expand(len(missing), -1))
        for i, text in enumerate(missing):
            cache.write(text, hidden[i], None if extra is None else extra["text_embeds"][i])
    outputs, device = [cache.read(t) for t in texts], s.accelerator.device
    hidden = torch.stack([h for h, _ in outputs]).to(device)
    if s.base.arch != "sdxl":
        return hidden, None
    pooled = torch.stack([p for _, p in outputs]).to(device)
    return hidden, {"text_embeds": pooled, "time_ids": sizes.to(hidden.dtype)}


def conditioning(base: bases.Base, run: RunConfig, texts: list[str], sizes: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """What the UNet is conditioned on: the captions' hidden states, and for SDXL also the pooled
    caption embedding and the six size numbers per image (`added_cond_kwargs`)."""
    options = dict(max_token_length=run.training.max_token_length, weighted=run.captions.weighted)
    if base.arch != "sdxl":
        hidden = captions.encode_captions(base.tokenizer, base.text_encoder, texts, clip_skip=run.training.clip_skip, **options)
        return hidden, None
    hidden, pooled = captions.encode_sdxl([base.tokenizer, base.tokenizer_2], base.text_encoders, texts, **options)
    return hidden, {"text_embeds": pooled, "time_ids": sizes.to(hidden.dtype)}


def trainable(s: Session) -> list[torch.nn.Parameter]:
    return [p for group in s.optimizer.param_groups for p in group["params"] if p.requires_grad]


def all_reduce_gradients(s: Session) -> None:
    """Sum every process's gradient share (manual data parallelism: no DDP wrapper around lycoris'
    hooks). A parameter no process produced a gradient for stays without one, as with one process."""
    import torch.distributed as dist

    params = trainable(s)
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=s.accelerator.device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    params = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten().float() for p in params])
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p.grad))


def global_sum(s: Session, value: float) -> float:
    if s.world == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=s.accelerator.device)
    dist.all_reduce(total)
    return total.item()


def train_step(s: Session, epoch: int, step: int, micro_batches: list[list[Entry]]) -> dict:
    rng, generator = step_rngs(s.run.training.seed, step)
    freeze_finished_phases(s, step)
    total = 0.0
    for batch in micro_batches:  # gradient accumulation: average the micro-batches' gradients
        loss = micro_batch_loss(s, batch, epoch, step, rng, generator)
        if loss is not None:
            s.accelerator.backward(loss / len(micro_batches))
            total += loss.item() / len(micro_batches)
    if s.world > 1:
        all_reduce_gradients(s)
    grad_norm = None
    if s.run.training.max_grad_norm:  # accelerate unscales fp16 gradients first
        grad_norm = float(s.accelerator.clip_grad_norm_(trainable(s), s.run.training.max_grad_norm))
    lrs = optim.effective_lrs(s.optimizer.optimizer)  # before the step: the lr this step used
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    record = {"step": step, "epoch": epoch, "loss": global_sum(s, total), "lr": lrs[0],
              "lrs": {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(s.optimizer.param_groups, lrs))}}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm  # before clipping, as kohya logs it
    if s.run.loss.scale_weight_norms is not None:
        scaled, mean_norm, max_norm = losses.scale_weight_norms(s.net, s.run.loss.scale_weight_norms)
        record.update(scaled_modules=scaled, mean_norm=mean_norm, max_norm=max_norm)
    if s.ema is not None:
        update_ema(s, step)
    return record


def ema_weights(net) -> dict[str, torch.Tensor]:
    """The network's floating-point weights (what the average covers), as fp32 copies."""
    return {key: value.detach().float().clone() for key, value in net.state_dict().items() if value.is_floating_point()}


def update_ema(s: Session, step: int) -> None:
    """Every ema.every_n_steps steps: ema ← decay·ema + (1 − decay)·weights; up to ema.start the copy
    just follows the weights."""
    cfg = s.run.ema
    if step % cfg.every_n_steps:
        return
    current = s.net.state_dict()
    with torch.no_grad():
        for key, average in s.ema.items():
            weights = current[key].detach().float()
            if step <= cfg.start:
                average.copy_(weights)
            else:
                average.mul_(cfg.decay).add_(weights, alpha=1.0 - cfg.decay)


class Diverged(RuntimeError):
    """The loss became NaN or infinite: training stopped, and nothing broken was saved."""


def stop_diverged(s: Session, epoch: int, step: int, record: dict) -> None:
    """Stop at the first non-finite loss (kohya trains on and saves NaN weights): write the log so
    far, keep the newest good checkpoint where Snakemake's clean-up of a failed job does not reach
    (`diverged/` beside the run's outputs), and say what most likely went wrong."""
    name, root = s.inputs.name, s.inputs.root
    if s.is_main:
        write_logs(name, s.records, s.plan, root)
    kept = ""
    if s.is_main and s.last_saved is not None:
        keep = root / paths.run_dir(name) / "diverged" / Path(s.last_saved).name
        store.write_bytes(keep, (root / s.last_saved).read_bytes())
        kept = f" The last good checkpoint is kept as {keep.relative_to(root)}."
    mixed = f", or {s.run.training.mixed_precision} overflowing" if s.run.training.mixed_precision == "fp16" else ""
    raise Diverged(f"run {name}: the loss is {record['loss']} at step {step} (epoch {epoch}) with lr "
                   f"{record['lr']:.3g}: training diverged and stopped; nothing after the last good step was "
                   f"saved.{kept} Likely cause: a learning rate too high for optimizer {s.run.optimizer.type} "
                   f"(lower optimizer.lr / unet_lr / text_encoder_lr{mixed}); a warm-up (scheduler.warmup) also helps.")


def write_logs(name: str, records: list[dict], plan: TrainingPlan, root: Path = Path(".")) -> None:
    """train.jsonl (strict JSON: a NaN or infinite number is written as null) and the loss plot,
    which leaves out steps whose loss is not finite (unless no step has a finite one)."""
    lines = (json.dumps(finite_or_null(r), allow_nan=False) + "\n" for r in records)
    store.write_text(root / paths.train_log(name), "".join(lines))
    plotted = [r for r in records if math.isfinite(r["loss"])] or records
    plots.loss_plot(plotted, root / paths.loss_plot(name), title=f"{name}: {plan.total_steps} steps, {plan.epochs} epochs")
    first = [r["loss"] for r in records if r["epoch"] == 1]
    last = [r["loss"] for r in records if r["epoch"] == plan.epochs]
    validated = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    held_out = f", validation loss {validated[0]:.4f} → {validated[-1]:.4f}" if validated else ""
    print(f"train {name}: {len(records)} steps, mean loss epoch 1 = {sum(first) / len(first):.4f}, "
          f"epoch {plan.epochs} = {sum(last) / len(last):.4f}{held_out}")


def finite_or_null(value):
    """`value` with every NaN or infinite float in it (nested in dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
