"""The training loop, read top to bottom.

Latents come from the content-addressed cache, captions from the dataset folders, the LoRA from
lycoris-lora, the schedule from diffusers, device placement from accelerate. On the CPU the same
config and seed give the same bytes.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lorabake import lora_format, models, network, paths, plots, store
from lorabake.config import RunConfig
from lorabake.dataset import Dataset
from lorabake.latents import load_latents
from lorabake.train.plan import Entry, TrainingPlan, batches, epoch_entries, plan_training, saved_epochs


@dataclass
class RunInputs:
    name: str
    run: RunConfig
    base_dir: Path
    datasets: dict[str, Dataset]
    indexes: dict[str, dict]            # dataset name → latent index (latents.read_index)
    facts: dict = field(default_factory=dict)  # extra metadata (digests, tag frequencies)


def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """CLIP hidden states for a batch of captions, padded to 77 tokens as SD1 was trained."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class LatentBatcher:
    """Turns a batch of entries into a latent tensor, choosing a flip state per image when asked."""

    def __init__(self, indexes: dict[str, dict], flip: bool, rng: random.Random):
        self.indexes, self.flip, self.rng = indexes, flip, rng
        self.by_rel = {name: {e["rel"]: e for e in index["entries"]} for name, index in indexes.items()}

    def __call__(self, batch: list[Entry]) -> torch.Tensor:
        tensors = []
        for entry in batch:
            index = self.indexes[entry.dataset]
            cached = self.by_rel[entry.dataset][entry.item.rel]
            state = "flip" if self.flip and self.rng.random() < 0.5 else "plain"
            tensors.append(load_latents(index, cached, state))
        return torch.stack(tensors)


def optimizer_groups(net, run: RunConfig) -> list[dict]:
    """One param group per model, each with its own learning rate (kohya's unet_lr / text_encoder_lr)."""
    opt = run.optimizer
    groups = []
    for loras, lr in ((net.unet_loras, opt.unet_lr or opt.lr), (net.text_encoder_loras, opt.text_encoder_lr or opt.lr)):
        params = [p for lora in loras for p in lora.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr})
    return groups


def make_scheduler(optimizer, run: RunConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    warmup = round(run.scheduler.warmup * total_steps)
    name = "constant_with_warmup" if run.scheduler.type == "constant" and warmup else run.scheduler.type
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def train(inputs: RunInputs) -> list[dict]:
    from accelerate import Accelerator

    run, cfg = inputs.run, inputs.run.training
    plan = plan_training(run, inputs.datasets)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    noise_rng = torch.Generator().manual_seed(cfg.seed)

    # Load the frozen base and wrap a fresh LoRA around it.
    base = models.load_base(inputs.base_dir, parts=("unet", "text_encoder"))
    net = network.create_network(base.unet, base.text_encoder, run.network, cfg.seed)
    optimizer = torch.optim.AdamW(optimizer_groups(net, run), lr=run.optimizer.lr, **run.optimizer.args)
    scheduler = make_scheduler(optimizer, run, plan.total_steps)
    base.unet.to(accelerator.device)
    base.text_encoder.to(accelerator.device)
    net.to(accelerator.device)
    net.train()

    entries = epoch_entries(run, inputs.datasets)
    latents_of = LatentBatcher(inputs.indexes, run.augment.flip, rng)
    schedule = base.noise_scheduler
    records, step = [], 0
    progress = tqdm(total=plan.total_steps, desc=f"train {inputs.name}", unit="step")
    for epoch in range(1, plan.epochs + 1):
        for batch in batches(entries, cfg.batch_size, rng):
            if step == plan.total_steps:
                break
            step += 1
            latents = latents_of(batch).to(accelerator.device)
            # Encode the captions; the text encoder gets gradients only if its LoRA trains.
            with torch.set_grad_enabled(run.network.train_text_encoder):
                text = encode_captions(base.tokenizer, base.text_encoder, [e.item.caption for e in batch])
            # Sample noise and a timestep per image, and noise the latents to that timestep.
            noise = torch.randn(latents.shape, generator=noise_rng).to(latents.device)
            timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(batch),), generator=noise_rng).to(latents.device)
            noisy_latents = schedule.add_noise(latents, noise, timesteps)
            # Predict the noise (or the velocity, for v-prediction bases) and regress on it.
            target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, timesteps)
            prediction = base.unet(noisy_latents, timesteps, text).sample
            loss = F.mse_loss(prediction.float(), target.float())
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            records.append({"step": step, "epoch": epoch, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            progress.update()
        if epoch in saved_epochs(run, plan):
            save_checkpoint(net, base, inputs, epoch, step, plan, paths.epoch_lora(inputs.name, epoch))
    progress.close()
    save_checkpoint(net, base, inputs, plan.epochs, step, plan, paths.run_lora(inputs.name))
    write_logs(inputs.name, records, plan)
    return records


def save_checkpoint(net, base: models.Base, inputs: RunInputs, epoch: int, step: int, plan: TrainingPlan, path: str) -> None:
    run = inputs.run
    facts = {**inputs.facts, "ss_num_epochs": str(plan.epochs), "ss_max_train_steps": str(plan.total_steps),
             "ss_batch_size_per_device": str(run.training.batch_size), "ss_learning_rate": f"{run.optimizer.lr:g}",
             "ss_unet_lr": f"{run.optimizer.unet_lr or run.optimizer.lr:g}",
             "ss_text_encoder_lr": f"{run.optimizer.text_encoder_lr or run.optimizer.lr:g}",
             "ss_seed": str(run.training.seed), "ss_lr_scheduler": run.scheduler.type,
             "ss_optimizer": "torch.optim.AdamW", "ss_flip_aug": str(run.augment.flip)}
    metadata = lora_format.lora_metadata(
        run_name=inputs.name, algo=run.network.algo, dim=run.network.dim, alpha=run.network.alpha,
        preset=Path(network.PRESET[run.network.algo]).stem, base_id=models.base_id(inputs.base_dir),
        resolution=run.size, epoch=epoch, steps=step, facts=facts)
    state = network.to_kohya_keys(net.state_dict(), base.text_encoder)
    lora_format.save_lora(state, path, run.save.precision, metadata)


def write_logs(name: str, records: list[dict], plan: TrainingPlan) -> None:
    store.write_text(paths.train_log(name), "".join(json.dumps(r) + "\n" for r in records))
    plots.loss_plot(records, paths.loss_plot(name), title=f"{name}: {plan.total_steps} steps, {plan.epochs} epochs")
    first = [r["loss"] for r in records if r["epoch"] == 1]
    last = [r["loss"] for r in records if r["epoch"] == plan.epochs]
    print(f"train {name}: mean loss epoch 1 = {sum(first) / len(first):.4f}, "
          f"epoch {plan.epochs} = {sum(last) / len(last):.4f}")
