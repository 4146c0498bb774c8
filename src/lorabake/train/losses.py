"""The loss and the noise of a training step, with kohya sd-scripts' options.

- Noise: plain Gaussian noise, plus either offset noise (a random constant per image and channel,
  Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise) or multi-resolution
  "pyramid" noise (Whitaker 2023, https://wandb.ai/johnowhitaker/multires_noise), as kohya's
  `apply_noise_offset` / `pyramid_noise_like` (library/custom_train_functions.py) add them.
- Timesteps: uniform in [min_timestep, max_timestep); the schedule optionally rescaled to a zero
  terminal SNR (Lin et al. 2023, diffusers' `rescale_betas_zero_snr`, as kohya's --zero_terminal_snr).
- Loss: per element L2, L1 or pseudo-Huber (kohya's `conditional_loss`, with its per-timestep
  threshold schedules), times the image's mask with masked loss (kohya's `apply_masked_loss`: a
  masked-out latent pixel adds nothing, and the mean still divides by every pixel), the per-image
  mean, regularization images weighted by `prior_loss_weight`, then Min-SNR weights (Hang et al.
  2023), the v-prediction-like term and the debiased-estimation weights (kohya's `post_process_loss`),
  then the batch mean — the order of kohya's train_network.py.
- Max-norm: after each optimizer step, every module whose weight update ΔW is longer than
  `scale_weight_norms` (Frobenius norm) is scaled back to it, as kohya's `apply_max_norm_regularization`
  (networks/lora.py) does.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorabake.config import Loss, MultiresNoise

PREDICTIONS = ("epsilon", "v_prediction")
# A module already scaled to the bound can measure a hair over it from float rounding; rescaling it
# would change nothing but would count it as scaled in the log every step.
NORM_TOLERANCE = 1e-4


# ---------------------------------------------------------------- targets and Min-SNR

def prediction_type(cfg: Loss, noise_scheduler) -> str:
    """What the UNet predicts: the config's choice, or (auto) what the base's scheduler says."""
    chosen = noise_scheduler.config.prediction_type if cfg.prediction == "auto" else cfg.prediction
    if chosen not in PREDICTIONS:
        raise ValueError(f"the base's scheduler predicts {chosen!r}; training supports {PREDICTIONS} "
                         "(set loss.prediction to one of them)")
    return chosen


def snr(noise_scheduler, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep, in float32 on the timesteps' device."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    signal = alphas_cumprod[timesteps]
    return signal / (1.0 - signal)


def min_snr_weights(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) in kohya's forms: min(SNR, γ)/SNR for ε-prediction,
    min(SNR, γ)/(SNR + 1) for v-prediction (whose loss already carries a factor SNR + 1)."""
    if prediction == "v_prediction":
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1.0)
    # min(SNR, γ)/SNR written as min(1, γ/SNR): the same number, and 1 (its limit) at SNR = 0, where
    # zero-terminal-SNR schedules would otherwise divide 0 by 0.
    return torch.clamp(gamma / snr, max=1.0)


def clamped_snr(noise_scheduler, timesteps: Tensor) -> Tensor:
    """SNR capped at 1000, as kohya's debiased and v-prediction-like terms use it (SNR(0) is huge)."""
    return torch.clamp(snr(noise_scheduler, timesteps), max=1000.0)


def zero_terminal_snr(noise_scheduler):
    """The same schedule with its betas rescaled so that the last timestep's SNR is zero (diffusers
    then sets ᾱ_T to 2⁻²⁴ rather than 0, so ε stays defined there)."""
    return type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def timestep_range(cfg: Loss, num_train_timesteps: int) -> tuple[int, int]:
    """[min_timestep, max_timestep) as kohya reads them: max defaults to the scheduler's count."""
    high = cfg.max_timestep or num_train_timesteps
    if high > num_train_timesteps:
        raise ValueError(f"loss.max_timestep is {high}, but the base's scheduler has {num_train_timesteps} timesteps")
    return cfg.min_timestep, high


def sample_timesteps(count: int, cfg: Loss, num_train_timesteps: int, generator: torch.Generator) -> Tensor:
    """One timestep per image, uniform in [min_timestep, max_timestep) (kohya's range semantics)."""
    return torch.randint(*timestep_range(cfg, num_train_timesteps), (count,), generator=generator)


# ---------------------------------------------------------------- noise

def sample_noise(latents: Tensor, cfg: Loss, generator: torch.Generator) -> Tensor:
    """Noise for `latents`, drawn from `generator` on the CPU (so a seed gives the same noise on any
    device), then moved to the latents' device and dtype. The plain draw comes first, so with every
    option off this is exactly `torch.randn(latents.shape, generator=generator)`."""
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + offset_noise(latents, cfg.noise_offset, cfg.adaptive_noise_scale, generator)
    elif cfg.multires_noise.iterations:  # config refuses both at once, as kohya's elif does
        noise = pyramid_noise(noise, cfg.multires_noise, generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def input_noise(noise: Tensor, cfg: Loss, generator: torch.Generator) -> Tensor:
    """What the latents are noised with: the noise itself, or with input perturbation (kohya's
    --ip_noise_gamma) noise + γ·ε′, γ drawn in [0, ip_noise_gamma) with random strength. The target
    stays `noise`. Drawn after everything else of the step, so runs without it draw as before."""
    if cfg.ip_noise_gamma is None:
        return noise
    gamma = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = torch.rand((), generator=generator).item() * gamma
    return noise + gamma * torch.randn(noise.shape, generator=generator).to(device=noise.device, dtype=noise.dtype)


def offset_noise(latents: Tensor, noise_offset: float, adaptive_scale: float | None,
                 generator: torch.Generator) -> Tensor:
    """A random constant per image and channel, `offset × N(0, 1)`, shape (B, C, 1, 1): it lets the
    model learn to shift an image's mean, i.e. very dark or bright images (Guttenberg 2023). With an
    adaptive scale the offset grows with each channel's |mean latent| (kohya's adaptive_noise_scale),
    kept ≥ 0 since the scale may be negative."""
    batch, channels = latents.shape[:2]
    offset: float | Tensor = noise_offset
    if adaptive_scale is not None:
        channel_means = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
        offset = torch.clamp(noise_offset + adaptive_scale * channel_means, min=0.0)
    return offset * torch.randn((batch, channels, 1, 1), generator=generator)


def pyramid_noise(noise: Tensor, multires: MultiresNoise, generator: torch.Generator) -> Tensor:
    """Multi-resolution noise (Whitaker 2023, kohya's `pyramid_noise_like`): add noise drawn at
    ever coarser sizes, upsampled bilinearly and weighted discount^level, then rescale the whole batch
    to unit standard deviation. Level i is drawn at size / r^i, r uniform in [2, 4) and drawn afresh
    each level (rather than always 2); level 0 is a second full-size draw, as in kohya."""
    batch, channels, height, width = noise.shape
    for level in range(multires.iterations):
        factor = 2.0 + 2.0 * torch.rand((), generator=generator).item()
        coarse_h = max(1, int(height / factor**level))
        coarse_w = max(1, int(width / factor**level))
        coarse = torch.randn((batch, channels, coarse_h, coarse_w), generator=generator)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * multires.discount**level
        if coarse_h == 1 or coarse_w == 1:
            break  # a side is down to one pixel: nothing coarser to add
    return noise / noise.std()


# ---------------------------------------------------------------- the loss

def huber_threshold(cfg: Loss, timesteps: Tensor, noise_scheduler) -> Tensor:
    """kohya's per-timestep pseudo-Huber threshold: constant c·scale; exponential from scale at t=0 down
    to c·scale at the last timestep; snr (1 − c)/(1 + σ_t)² + c with σ_t = √((1 − ᾱ_t)/ᾱ_t), which is
    1 where the image is clean and c where it is all noise."""
    t = timesteps.float()
    if cfg.huber_schedule == "constant":
        return torch.full_like(t, cfg.huber_c * cfg.huber_scale)
    if cfg.huber_schedule == "exponential":
        rate = -math.log(cfg.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-rate * t) * cfg.huber_scale
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return (1.0 - cfg.huber_c) / (1.0 + sigmas) ** 2 + cfg.huber_c


def elementwise_loss(prediction: Tensor, target: Tensor, cfg: Loss, threshold: Tensor | None) -> Tensor:
    """The loss of every element, in float32: (p − y)², |p − y|, or pseudo-Huber
    2c(√((p − y)² + c²) − c) — (p − y)² for residuals well below c, 2c|p − y| well above — and smooth_l1,
    the same divided by c."""
    prediction, target = prediction.float(), target.float()
    if cfg.type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if cfg.type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    c = threshold.view(-1, *([1] * (prediction.dim() - 1)))
    pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * pseudo if cfg.type == "huber" else 2 * pseudo


def _plain_mse(cfg: Loss) -> bool:
    return (cfg.type == "l2" and cfg.prior_loss_weight == 1.0 and cfg.min_snr_gamma is None
            and cfg.v_pred_like_loss is None and not cfg.debiased_estimation)


def masked(loss: Tensor, masks: Tensor) -> Tensor:
    """The elementwise loss times the masks (B, 1, h, w), each channel alike; masks of another size
    are area-averaged to the loss's, as kohya resizes them."""
    masks = masks.to(loss)
    if masks.shape[-2:] != loss.shape[-2:]:
        masks = F.interpolate(masks, size=loss.shape[-2:], mode="area")
    return loss * masks


def training_loss(prediction: Tensor, target: Tensor, timesteps: Tensor, is_reg: Tensor, cfg: Loss,
                  noise_scheduler, prediction_type: str, image_weights: Tensor | None = None,
                  masks: Tensor | None = None) -> Tensor:
    """The step's scalar loss: the elementwise loss (times each image's mask, with `masks`), its
    mean per image, regularization images times prior_loss_weight and each image times its folder's
    loss_weight (`image_weights`), then Min-SNR, v-prediction-like and debiased weights as set, then
    the batch mean."""
    if _plain_mse(cfg) and image_weights is None and masks is None:
        # Every image weighs the same, and the mean of equal-sized per-image means is the plain mean:
        # computing it directly keeps runs without these options bit-identical to plain MSE.
        return F.mse_loss(prediction.float(), target.float())
    threshold = huber_threshold(cfg, timesteps, noise_scheduler) if cfg.type in ("huber", "smooth_l1") else None
    per_image = elementwise_loss(prediction, target, cfg, threshold)
    if masks is not None:
        per_image = masked(per_image, masks)
    per_image = per_image.mean(dim=tuple(range(1, per_image.dim())))
    per_image = per_image * torch.where(is_reg.to(per_image.device), cfg.prior_loss_weight, 1.0)
    if image_weights is not None:
        per_image = per_image * image_weights.to(per_image)
    if cfg.min_snr_gamma is not None:
        per_image = per_image * min_snr_weights(snr(noise_scheduler, timesteps), cfg.min_snr_gamma, prediction_type)
    if cfg.v_pred_like_loss is not None:
        ratio = clamped_snr(noise_scheduler, timesteps)
        per_image = per_image + per_image / (ratio / (ratio + 1.0)) * cfg.v_pred_like_loss
    if cfg.debiased_estimation:
        ratio = clamped_snr(noise_scheduler, timesteps)
        per_image = per_image * (1.0 / (ratio + 1.0) if prediction_type == "v_prediction" else ratio.rsqrt())
    return per_image.mean()


# ---------------------------------------------------------------- max-norm of the updates

@contextlib.contextmanager
def _measuring(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd while measuring: lycoris applies rank dropout to the rebuilt weight
    in training mode, which would make the measured norm random."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _shrink_terms(terms: list[list[Tensor]], ratio: float) -> None:
    """ΔW is a sum of products (times a shared scalar): scaling every factor of each product by
    ratio^(1/its length) scales every term, hence ΔW, by ratio."""
    for factors in terms:
        for factor in factors:
            factor.mul_(ratio ** (1.0 / len(factors)))


def _shrink_multilinear(module: nn.Module, ratio: float) -> None:
    # LoRA/LoCon (up, down[, mid][, scalar]), LoHa's four (six) factors, LoKr's Kronecker factors and
    # (IA)³'s vector each enter ΔW exactly once: one product of all the parameters. kohya's LoRA, too,
    # scales up and down by √ratio each, which keeps the factors balanced.
    _shrink_terms([list(module.parameters())], ratio)


def _shrink_dylora(module: nn.Module, ratio: float) -> None:
    # DyLoRA: ΔW = Σ_i up_i·down_i over its rank blocks.
    _shrink_terms([[up, down] for up, down in zip(module.up_list, module.down_list)], ratio)


def _shrink_glora(module: nn.Module, ratio: float) -> None:
    # GLoRA: ΔW = W·(A₁A₂) + B₁(B_mid)B₂, both terms times alpha/dim and the scalar.
    b_factors = [module.b1.weight, module.b2.weight] + ([module.bm.weight] if module.tucker else [])
    _shrink_terms([[module.a1.weight, module.a2.weight], b_factors], ratio)


def _shrink_full(module: nn.Module, ratio: float) -> None:
    # Full fine-tuning keeps the absolute weight; pull it back toward the original.
    original = module.org_weight.to(module.weight)
    module.weight.copy_(original + (module.weight - original) * ratio)
    if module.bias is not None and module.org_bias is not None:
        original_bias = module.org_bias[0].to(module.bias)
        module.bias.copy_(original_bias + (module.bias - original_bias) * ratio)


def _dylora_update(module: nn.Module) -> Tensor:
    # All ranks, as the saved file has them (lycoris' get_diff_weight picks a random rank).
    up = torch.cat(list(module.up_list), dim=1)
    down = torch.cat(list(module.down_list), dim=0)
    return up @ down * module.scale


@dataclass(frozen=True)
class UpdateRule:
    """How to rebuild one lycoris module kind's ΔW (as its forward applies it and its file means it)
    and how to scale ΔW by a ratio."""

    update: Callable[[nn.Module], Tensor]
    shrink: Callable[[nn.Module, float], None]


@functools.cache
def update_rules() -> dict[type, UpdateRule]:
    """The rule of each lycoris module kind this trainer can bound (lycoris itself has none for IA3,
    Full, DyLoRA and GLoRA, so kohya silently skips them)."""
    from lycoris.modules import DyLoraModule, FullModule, GLoRAModule, IA3Module, LoConModule, LohaModule, LokrModule

    return {
        LoConModule: UpdateRule(lambda m: m.make_weight() * m.scale, _shrink_multilinear),
        # lycoris 4.1.3's get_diff_weight applies alpha/dim twice for LoHa and LoKr and drops `scalar`;
        # get_weight already carries alpha/dim once, which is what the forward adds.
        LohaModule: UpdateRule(lambda m: m.get_weight(m.shape) * m.scalar, _shrink_multilinear),
        LokrModule: UpdateRule(lambda m: m.get_weight(m.shape) * m.scalar, _shrink_multilinear),
        IA3Module: UpdateRule(lambda m: m.get_diff_weight()[0], _shrink_multilinear),
        FullModule: UpdateRule(lambda m: m.get_diff_weight()[0], _shrink_full),
        DyLoraModule: UpdateRule(_dylora_update, _shrink_dylora),
        GLoRAModule: UpdateRule(lambda m: m.make_weight(), _shrink_glora),
    }


def _rule_for(module: nn.Module, rules: dict[type, UpdateRule]) -> UpdateRule:
    if getattr(module, "wd", False):
        raise ValueError(f"{module.lora_name}: scale_weight_norms cannot bound a weight-decomposed (DoRA) "
                         "update, whose magnitude is trained separately; drop one of the two")
    rule = rules.get(type(module))
    if rule is None:
        raise ValueError(f"{module.lora_name}: scale_weight_norms does not support {type(module).__name__} "
                         f"modules (supported: {', '.join(sorted(t.__name__ for t in rules))})")
    return rule


def scale_weight_norms(network, max_norm: float) -> tuple[int, float, float]:
    """Max-norm regularization after an optimizer step (kohya's --scale_weight_norms): each module
    whose update norm ‖ΔW‖ exceeds `max_norm` is scaled back to exactly `max_norm`; the others are left
    alone. Returns (modules scaled, mean norm, max norm), norms taken after scaling, for the log.

    Unlike lycoris' own `apply_max_norm_regularization`, this scales the trained factors themselves
    (as kohya's LoRA does) rather than lycoris' non-persistent `scalar` buffer, so the network's
    parameters, its saved state and a resumed run all hold the bounded update; it measures ΔW in
    eval mode (no rank dropout), covers IA3, Full, DyLoRA and GLoRA too, and reports the norms even
    when nothing was scaled. OFT-style modules (diag-oft, boft) and DoRA have no additive ΔW to bound,
    and are refused."""
    rules = update_rules()
    scaled, norms = 0, []
    for module in network.unet_loras + network.text_encoder_loras:
        rule = _rule_for(module, rules)
        with _measuring(module):
            norm = rule.update(module).float().norm().item()
            if norm > max_norm * (1 + NORM_TOLERANCE):
                rule.shrink(module, max_norm / norm)
                scaled += 1
                norm = max_norm
        norms.append(norm)
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
