"""Pretrain the `toy-shapes` base and its concept scorer on the procedural world of
lorabake.models.toy_world, on one CPU thread, and write them to src/lorabake/models/weights/toy-shapes/.

    python scripts/pretrain_toy_shapes.py                      # all phases, then the evaluation
    python scripts/pretrain_toy_shapes.py --phase diffusion    # one phase (later ones read earlier ones' files)
    python scripts/pretrain_toy_shapes.py --phase evaluate     # only bench/results/toy_base.{json,_samples.png}

Phases, in order: `vae` (reconstruction + a small KL), `diffusion` (UNet + CLIP text encoder with SD1's
noise schedule, 10% caption dropout for classifier-free guidance), `scorer` (a small CNN that names the
shape, colour and background, trained on stars and hearts too), `evaluate` (sample the built base on
every world prompt and score it). Each training phase runs its fixed number of steps, or stops early
when its share of `--minutes` is spent (the manifest records which). Every batch is freshly generated;
the diffusion phase draws its latents from a pool that each step refreshes with newly encoded images,
because encoding a whole batch every step would cost more than the UNet step itself.
Weights are stored as fp16 (loading upcasts them to fp32); manifest.json records their sha256.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabake import store  # noqa: E402
from lorabake.models import bases, toy_world  # noqa: E402
from lorabake.render import grid, scorer  # noqa: E402

SCRIPT_VERSION = 2  # 2: decoder phase, diffusion --resume, warped scorer training
OUT = bases.TOY_SHAPES_DIR
RESULTS = REPO / "bench" / "results"
PHASES = ("vae", "decoder", "diffusion", "scorer")
SHARE = {"vae": 0.15, "decoder": 0.1, "diffusion": 0.67, "scorer": 0.08}  # of --minutes


@dataclass
class Settings:
    """Every knob of the pretraining in one place (a reason where it is not obvious)."""
    seed: int = 0
    vae_steps: int = 1000
    vae_batch: int = 8
    vae_lr: float = 5e-4
    vae_kl: float = 1e-6            # per latent element, against a per-pixel reconstruction loss
    vae_colour_latent: float = 0.5  # latents 0-2 ≈ the patch's mean colour: colours are learnt far sooner
    decoder_steps: int = 2000
    decoder_batch: int = 16
    decoder_lr: float = 3e-4
    decoder_edges: float = 1.0      # weight of the image-gradient term that keeps edges and corners sharp
    unet_steps: int = 1800
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1    # empty captions teach the unconditional branch of CFG
    min_snr_gamma: float = 5.0      # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"
    ema: float = 0.999
    pool: int = 4096                # encoded latents the diffusion batches are drawn from
    refresh: int = 4                # pool entries replaced by newly generated images every step
    scorer_steps: int = 900
    scorer_batch: int = 32
    scorer_lr: float = 2e-3


class Progress:
    """One line every few seconds: phase, step, elapsed time, the running loss."""

    def __init__(self, phase: str, steps: int, every: float = 10.0):
        self.phase, self.steps, self.every = phase, steps, every
        self.start = self.last = time.monotonic()
        self.losses: list[float] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, step: int, loss: float, **extra: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.last >= self.every or step == self.steps:
            self.last = now
            recent = np.mean(self.losses[-50:])
            details = "".join(f" {k} {v:.4g}" for k, v in extra.items())
            print(f"{self.phase} step {step}/{self.steps} {self.elapsed():.0f}s loss {recent:.4f}{details} "
                  f"{step / max(self.elapsed(), 1e-9):.2f} step/s", flush=True)


def images_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) → float (n, 3, h, w) in [-1, 1], as SD's VAE takes images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step: int, steps: int, peak: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak. The cosine follows the steps or
    the spent share of the time budget, whichever is further, so a phase stopped by its budget
    still ends at the low learning rate (which is why a slower machine gives other weights)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, steps - warmup), time_fraction)
    return peak * (0.1 + 0.45 * (1 + np.cos(np.pi * min(progress, 1.0))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- phase 1: the VAE

def fix_posterior_variance(vae, logvar: float = -8.0) -> None:
    """Pin the posterior's log-variance (std 0.018 against latents of std ~1 after scaling): with a
    learnt variance, the decoder spent the short budget coping with noise (SD's own VAE, with a KL
    weight of 1e-6, also ends nearly deterministic). The rows of quant_conv that make the log-variance
    are zeroed and their gradients dropped."""
    rows = slice(vae.config.latent_channels, None)
    with torch.no_grad():
        vae.quant_conv.weight[rows] = 0
        vae.quant_conv.bias[rows] = logvar

    def drop_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[rows] = 0
        return grad

    vae.quant_conv.weight.register_hook(drop_rows)
    vae.quant_conv.bias.register_hook(drop_rows)


def train_vae(settings: Settings, budget_s: float) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    vae = bases.toy_vae()
    fix_posterior_variance(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    progress, step = Progress("vae", settings.vae_steps), 0
    while step < settings.vae_steps and progress.elapsed() < budget_s:
        set_lr(optimizer, lr_at(step, settings.vae_steps, settings.vae_lr, settings.warmup,
                              progress.elapsed() / budget_s))
        # Draw a batch of new scenes and encode them to a posterior over latents.
        images = images_tensor(toy_world.sample(rng, settings.vae_batch)[0])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 keeps flat colours and edges sharper than MSE; the KL keeps latents near N(0, 1).
        rec_loss = (reconstruction - images).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        colour = F.mse_loss(posterior.mean[:, :3], 2 * F.avg_pool2d(images, 8))
        loss = rec_loss + settings.vae_kl * kl + settings.vae_colour_latent * colour
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update(step, rec_loss.item(), mse=F.mse_loss(reconstruction, images).item())
    vae.eval().requires_grad_(False)
    scaling = latent_scaling(vae, np.random.default_rng(settings.seed + 1))
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"steps": step, "wall_s": round(progress.elapsed(), 1), "stopped_by": stop_reason(step, settings.vae_steps),
                 "final_l1": round(float(np.mean(progress.losses[-100:])), 5), "scaling_factor": scaling,
                 **evaluate_vae(vae, np.random.default_rng(settings.seed + 2))}


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]


def train_decoder(vae, settings: Settings, budget_s: float) -> tuple[torch.nn.Module, dict]:
    """Fine-tune the decoder alone, the encoder frozen (as SD's ft-MSE VAE was made): the latent
    space the UNet learns stays the same, while edges and corners sharpen. Loss: L1 on pixels plus
    L1 on the image gradients."""
    torch.manual_seed(settings.seed + 5)
    rng = np.random.default_rng(settings.seed + 5)
    decoder = [vae.post_quant_conv, vae.decoder]
    vae.requires_grad_(False)
    for part in decoder:
        part.requires_grad_(True).train()
    params = [p for part in decoder for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.decoder_lr, weight_decay=0.0)
    progress, step = Progress("decoder", settings.decoder_steps), 0
    while step < settings.decoder_steps and progress.elapsed() < budget_s:
        set_lr(optimizer, lr_at(step, settings.decoder_steps, settings.decoder_lr, settings.warmup,
                              progress.elapsed() / budget_s))
        images = images_tensor(toy_world.sample(rng, settings.decoder_batch, toy_world.SHAPES)[0])
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        edges = sum((a - b).abs().mean() for a, b in zip(image_gradients(reconstruction), image_gradients(images)))
        rec_loss = (reconstruction - images).abs().mean()
        loss = rec_loss + settings.decoder_edges * edges
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update(step, rec_loss.item(), edges=edges.item())
    vae.eval().requires_grad_(False)
    return vae, {"steps": step, "wall_s": round(progress.elapsed(), 1), "stopped_by": stop_reason(step, settings.decoder_steps),
                 "final_l1": round(float(np.mean(progress.losses[-100:])), 5),
                 **evaluate_vae(vae, np.random.default_rng(settings.seed + 2))}


def stop_reason(step: int, steps: int) -> str:
    return "steps" if step >= steps else "time budget"


def latent_scaling(vae, rng: np.random.Generator, count: int = 512) -> float:
    """1 / the std of the latents, as SD's scaling factor makes the UNet's inputs unit-variance."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(images_tensor(toy_world.sample(rng, 64)[0])).latent_dist.mean
                             for _ in range(count // 64)])
    return round(1.0 / float(latents.std()), 5)


def evaluate_vae(vae, rng: np.random.Generator) -> dict:
    with torch.no_grad():
        images = images_tensor(toy_world.sample(rng, 64, toy_world.SHAPES)[0])
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return {"eval_mse": round(F.mse_loss(reconstruction, images).item(), 5)}


# ---------------------------------------------------------------- phase 2: UNet + text encoder

class LatentPool:
    """Latents of generated scenes; each step replaces `refresh` random entries with new scenes."""

    def __init__(self, vae, tokens: dict[str, torch.Tensor], size: int, rng: np.random.Generator):
        self.vae, self.tokens, self.rng = vae, tokens, rng
        self.latents, self.captions = [], []
        for _ in range(0, size, 64):
            latents, captions = self._encode(64)
            self.latents.append(latents)
            self.captions += captions
        self.latents = torch.cat(self.latents)

    def _encode(self, count: int) -> tuple[torch.Tensor, list[str]]:
        images, scenes = toy_world.sample(self.rng, count)
        with torch.no_grad():
            latents = self.vae.encode(images_tensor(images)).latent_dist.sample() * self.vae.config.scaling_factor
        return latents, [scene.caption for scene in scenes]

    def refresh(self, count: int) -> None:
        slots = self.rng.integers(len(self.captions), size=count)
        latents, captions = self._encode(count)
        self.latents[slots] = latents
        for slot, caption in zip(slots, captions):
            self.captions[slot] = caption

    def batch(self, count: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self.rng.integers(len(self.captions), size=count)
        dropped = self.rng.random(count) < dropout
        ids = torch.stack([self.tokens["" if drop else self.captions[i]] for i, drop in zip(picks, dropped)])
        return self.latents[picks], ids


def tokenize_world(tokenizer) -> dict[str, torch.Tensor]:
    """Token ids (77, padded as SD1 pads) of every caption of the world, and of the empty caption."""
    captions = ["", *toy_world.prompts()]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return dict(zip(captions, ids))


def load_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        bases.write_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ) / SNR for ε-prediction (Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def train_diffusion(vae, settings: Settings, budget_s: float, earlier: dict | None = None
                    ) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """With `earlier` (the manifest's record of a finished diffusion phase), training continues from
    the written UNet and text encoder (a new warm-up, a new seed offset) and the record adds up."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor

    leg = len(earlier.get("legs", [earlier])) if earlier else 0
    torch.manual_seed(settings.seed + 10 + 100 * leg)
    rng = np.random.default_rng(settings.seed + 10 + 100 * leg)
    if earlier:
        unet, text_encoder = load_part(OUT, "unet").requires_grad_(True), load_part(OUT, "text_encoder").requires_grad_(True)
        unet.train(), text_encoder.train()
    else:
        unet, text_encoder = bases.toy_unet(), bases.toy_text_encoder()
    unet.set_attn_processor(AttnProcessor())  # plain bmm attention: faster than SDPA at 2 heads on a CPU
    unet_ema, text_ema = EMA(unet, settings.ema), EMA(text_encoder, settings.ema)
    scheduler = DDPMScheduler(**bases.SD1_NOISE_SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    pool = LatentPool(vae, tokenize_world(load_tokenizer()), settings.pool, rng)
    progress, step = Progress("diffusion", settings.unet_steps), 0
    while step < settings.unet_steps and progress.elapsed() < budget_s:
        set_lr(optimizer, lr_at(step, settings.unet_steps, settings.unet_lr, settings.warmup,
                              progress.elapsed() / budget_s))
        latents, ids = pool.batch(settings.unet_batch, settings.caption_dropout)
        # Sample noise and a timestep per image, and noise the latents as SD1's schedule does.
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        # Predict the noise from the noisy latents and the caption's hidden states.
        hidden_states = text_encoder(ids).last_hidden_state
        noise_pred = unet(noisy_latents, timesteps, hidden_states).sample
        per_sample = F.mse_loss(noise_pred, noise, reduction="none").mean((1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps, settings.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        unet_ema.update(unet)
        text_ema.update(text_encoder)
        pool.refresh(settings.refresh)
        step += 1
        progress.update(step, per_sample.mean().item())
    unet_ema.copy_to(unet)
    text_ema.copy_to(text_encoder)
    record = {"steps": step, "wall_s": round(progress.elapsed(), 1), "stopped_by": stop_reason(step, settings.unet_steps),
              "final_loss": round(float(np.mean(progress.losses[-100:])), 5),
              "images_seen": settings.pool + step * settings.refresh}
    if earlier:
        legs = [*earlier.get("legs", [earlier]), record]
        record = {**record, "legs": legs, **{key: round(sum(leg[key] for leg in legs), 1)
                                            for key in ("steps", "wall_s", "images_seen")}}
    return unet.eval(), text_encoder.eval(), record


class EMA:
    """An exponential moving average of a model's weights (shipped instead of the last step's); the
    decay warms up as (1 + step) / (10 + step), so early weights do not linger."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.step = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.dtype.is_floating_point:
                    self.shadow[key].mul_(decay).add_(value, alpha=1 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


# ---------------------------------------------------------------- phase 3: the concept scorer

def warp(x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """A random affine warp (rotation, shear, stretch) and a smooth random displacement field, so
    the scorer also knows the plump, lopsided or thin-armed shapes a diffusion model draws; the
    border pixels (the background) fill what moves in."""
    n = len(x)
    angle = torch.from_numpy(rng.uniform(-0.35, 0.35, n) * strength).float()
    shear = torch.from_numpy(rng.uniform(-0.2, 0.2, n) * strength).float()
    scale = torch.from_numpy(1 + rng.uniform(-0.15, 0.15, (n, 2)) * strength).float()
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * scale[:, 0], -sin + shear, torch.zeros(n)], 1),
                         torch.stack([sin, cos * scale[:, 1], torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = torch.from_numpy(rng.normal(0, 0.08 * strength, (n, 2, 4, 4))).float()
    grid = grid + F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def augment(images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """What a VAE's decoder and a diffusion model do to pictures, roughly: warped shapes (for most
    images), blur, noise, a shift of brightness and colour."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    warped = torch.from_numpy(rng.random(len(x)) < 0.75)
    x = torch.where(warped.view(-1, 1, 1, 1), warp(x, rng, 1.0), x)
    sigma = float(rng.uniform(0.1, 2.0))
    kernel = torch.exp(-torch.arange(-3, 4).float() ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), kernel, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), kernel.transpose(2, 3), groups=3)
    n = len(x)
    x = x * torch.from_numpy(rng.uniform(0.85, 1.15, (n, 3, 1, 1))).float() + torch.from_numpy(rng.uniform(-0.06, 0.06, (n, 1, 1, 1))).float()
    x = x + torch.from_numpy(rng.normal(0, 0.03, x.shape)).float()
    return x.clamp(0, 1)


def scene_labels(scenes: list[toy_world.Scene]) -> dict[str, torch.Tensor]:
    return {head: torch.tensor([scorer.HEADS[head].index(getattr(s, head)) for s in scenes]) for head in scorer.HEADS}


def train_scorer(vae, settings: Settings, budget_s: float) -> tuple[torch.nn.Module, dict]:
    """A quarter of each batch is passed through the VAE first, whose decoder draws every image the
    scorer will judge; all of it is then blurred, noised and shifted a little (`augment`)."""
    torch.manual_seed(settings.seed + 20)
    rng = np.random.default_rng(settings.seed + 20)
    model = scorer.ConceptScorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.scorer_lr, weight_decay=1e-4)
    progress, step = Progress("scorer", settings.scorer_steps), 0
    while step < settings.scorer_steps and progress.elapsed() < budget_s:
        set_lr(optimizer, lr_at(step, settings.scorer_steps, settings.scorer_lr, settings.warmup,
                              progress.elapsed() / budget_s))
        images, scenes = toy_world.sample(rng, settings.scorer_batch, toy_world.SHAPES)
        half = settings.scorer_batch * 3 // 4
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images_tensor(images[half:])).latent_dist.mode()).sample
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        inputs = augment(np.concatenate([images[:half], decoded]), rng)
        logits = model(inputs)
        labels = scene_labels(scenes)
        loss = sum(F.cross_entropy(logits[head], labels[head]) for head in scorer.HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update(step, loss.item())
    model.eval().requires_grad_(False)
    return model, {"steps": step, "wall_s": round(progress.elapsed(), 1), "stopped_by": stop_reason(step, settings.scorer_steps),
                   "final_loss": round(float(np.mean(progress.losses[-100:])), 5),
                   **scorer_accuracy(model, np.random.default_rng(settings.seed + 21))}


def scorer_accuracy(model, rng: np.random.Generator, count: int = 512) -> dict:
    """Accuracy per head on clean images of all six shapes, from a seed training never used."""
    images, scenes = toy_world.sample(rng, count, toy_world.SHAPES)
    found = scorer.predict(images, model)
    return {f"eval_{head}_accuracy": round(float(np.mean([f[head] == getattr(s, head) for f, s in zip(found, scenes)])), 4)
            for head in scorer.HEADS}


# ---------------------------------------------------------------- writing and evaluating

def save_part(out: Path, name: str, model: torch.nn.Module, config: dict | None) -> None:
    """`name`.safetensors (fp16) and, for base parts, `name`.json (the model's config)."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    store.write_safetensors(out / f"{name}.safetensors", tensors)
    if config is not None:
        store.write_text(out / f"{name}.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_config(part: str, model: torch.nn.Module) -> dict:
    if part == "text_encoder":
        config = model.config.to_dict()
        config.pop("transformers_version", None)
        return config
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_") or k == "_class_name"}


def write_manifest(out: Path, settings: Settings, phases: dict, wall_s: float) -> None:
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "manifest.json")
    store.write_json(out / "manifest.json", {
        "builtin": "toy-shapes", "script": "scripts/pretrain_toy_shapes.py", "script_version": SCRIPT_VERSION,
        "seed": settings.seed, "storage_dtype": "float16 (loaded as float32)", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "settings": asdict(settings), "phases": phases, "wall_s": round(wall_s, 1),
        "files": {name: store.file_sha256(out / name) for name in files},
    })


def load_part(out: Path, part: str) -> torch.nn.Module:
    """A part written by an earlier phase of this script (before the manifest covers it)."""
    from safetensors.torch import load_file

    model = bases._toy_model_from_config(part, json.loads((out / f"{part}.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in load_file(out / f"{part}.safetensors").items()})
    return model.eval().requires_grad_(False)


def evaluate(steps: int, cfg: float, sampler: str, seed: int) -> dict:
    """Build the base from the shipped files, sample every world prompt, score, write the report and
    a contact sheet of 16 samples (one per colour × shape mix) beside a world image of their prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "toy-shapes"
        bases.build_base("toy-shapes", base_dir)
        start = time.monotonic()
        report, images = scorer.prompt_accuracy(base_dir, steps=steps, cfg=cfg, sampler=sampler, seed=seed)
        report["settings"]["wall_s"] = round(time.monotonic() - start, 1)
    store.write_json(RESULTS / "toy_base.json", report)
    grid.save_png(contact_sheet(report, images), RESULTS / "toy_base_samples.png")
    return report


def contact_sheet(report: dict, images: list, count: int = 16):
    picks = np.linspace(0, len(images) - 1, count).round().astype(int)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in picks:
        sample = report["samples"][i]
        shape, colour, background = toy_world.combinations()[i]
        reference = toy_world.render(toy_world.Scene(shape, colour, background, (32.0, 32.0), 18.0), rng)
        rows.append([images[i].resize((128, 128)), reference.resize((128, 128))])
        verdict = "ok" if sample["shape"] == shape and sample["colour"] == colour else "miss"
        labels.append(f"{sample['prompt']} — scorer: {sample['colour']} {sample['shape']} ({verdict})")
    block = grid.GridBlock("toy-shapes samples", labels, ["sample", "world"], rows)
    settings = report["settings"]
    return grid.render_grid([block], title=f"toy-shapes: prompt accuracy {report['prompt_accuracy']:.0%}",
                            footer=f"{settings['sampler']}, {settings['steps']} steps, cfg {settings['cfg']}, "
                                   f"seed {settings['seed']}+i, {settings['size']} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=40.0, help="time budget of the training phases together")
    parser.add_argument("--phase", choices=("all", *PHASES, "evaluate"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps (a quick trial: 0.05)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--resume", action="store_true", help="--phase diffusion: continue from the written UNet "
                        "and text encoder instead of starting from random weights")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(seed=args.seed)
    for name in ("vae_steps", "decoder_steps", "unet_steps", "scorer_steps"):
        setattr(settings, name, max(1, round(getattr(settings, name) * args.steps_scale)))
    if args.phase != "evaluate":
        train(args.phase, settings, args.minutes * 60, args.resume)
    if args.phase in ("all", "evaluate"):
        report = evaluate(args.eval_steps, args.cfg, args.sampler, args.seed)
        print(f"prompt_accuracy {report['prompt_accuracy']:.3f} (shape {report['shape_accuracy']:.3f}, "
              f"colour {report['colour_accuracy']:.3f}) over {report['settings']['prompts']} prompts", flush=True)


def train(phase: str, settings: Settings, budget_s: float, resume: bool = False) -> None:
    start = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = OUT / "manifest.json"
    phases = json.loads(manifest.read_text())["phases"] if manifest.is_file() and phase != "all" else {}
    todo = PHASES if phase == "all" else (phase,)
    for name in todo:
        budget = budget_s * SHARE[name] / (1 if phase == "all" else SHARE[name])
        if name == "vae":
            vae, phases["vae"] = train_vae(settings, budget)
            save_part(OUT, "vae", vae, model_config("vae", vae))
        else:
            vae = load_part(OUT, "vae")
        if name == "decoder":
            vae, phases["decoder"] = train_decoder(vae, settings, budget)
            save_part(OUT, "vae", vae, model_config("vae", vae))
        if name == "diffusion":
            earlier = phases.get("diffusion") if resume else None
            unet, text_encoder, phases["diffusion"] = train_diffusion(vae, settings, budget, earlier)
            for part, model in (("unet", unet), ("text_encoder", text_encoder)):
                save_part(OUT, part, model, model_config(part, model))
        if name == "scorer":
            model, phases["scorer"] = train_scorer(vae, settings, budget)
            save_part(OUT, "scorer", model, None)
        print(f"{name} done: {json.dumps(phases[name])}", flush=True)
        # Phases may run side by side (decoder and diffusion touch different files): merge into what is there now.
        if phase != "all" and manifest.is_file():
            phases = {**json.loads(manifest.read_text())["phases"], name: phases[name]}
        write_manifest(OUT, settings, phases, sum(p["wall_s"] for p in phases.values()))
    print(f"trained {', '.join(todo)} in {time.monotonic() - start:.0f}s; weights in {OUT}", flush=True)


if __name__ == "__main__":
    main()
