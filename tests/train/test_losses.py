"""Loss weighting, noise options and max-norm regularization (train/losses.py), against their
definitions: Min-SNR from the noise schedule, offset/pyramid noise statistics, and the weight update
each lycoris module really adds, measured through its forward pass."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorabake.config import Loss
from lorabake.models import bases, network
from lorabake.train import losses


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**bases.SD1_NOISE_SCHEDULE)


def sd1_snr(t: int) -> float:
    """SNR of SD1's scaled-linear schedule, computed from its betas in float64."""
    cfg = bases.SD1_NOISE_SCHEDULE
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].item()
    return alpha_bar / (1 - alpha_bar)


# ---------------------------------------------------------------- targets, Min-SNR, the loss

def test_prediction_type_auto_reads_the_scheduler(scheduler):
    from diffusers import DDPMScheduler

    v_scheduler = DDPMScheduler(**{**bases.SD1_NOISE_SCHEDULE, "prediction_type": "v_prediction"})
    assert losses.prediction_type(Loss(), scheduler) == "epsilon"
    assert losses.prediction_type(Loss(), v_scheduler) == "v_prediction"
    assert losses.prediction_type(Loss(prediction="v_prediction"), scheduler) == "v_prediction"
    sample_scheduler = DDPMScheduler(**{**bases.SD1_NOISE_SCHEDULE, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="sample"):
        losses.prediction_type(Loss(), sample_scheduler)


def test_snr_and_min_snr_weights_match_the_formulas(scheduler):
    timesteps = torch.tensor([0, 100, 400, 700, 999])
    snr = losses.snr(scheduler, timesteps)
    expected_snr = [sd1_snr(t) for t in timesteps.tolist()]
    assert snr.tolist() == pytest.approx(expected_snr, rel=1e-4)
    assert expected_snr[1] > 5 > expected_snr[3]  # γ = 5 cuts some timesteps and not others
    epsilon = losses.min_snr_weights(snr, 5.0, "epsilon")
    velocity = losses.min_snr_weights(snr, 5.0, "v_prediction")
    assert epsilon.tolist() == pytest.approx([min(s, 5) / s for s in expected_snr], rel=1e-4)
    assert velocity.tolist() == pytest.approx([min(s, 5) / (s + 1) for s in expected_snr], rel=1e-4)
    assert losses.min_snr_weights(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0  # zero-terminal SNR


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor) -> list[float]:
    return [F.mse_loss(p.float(), t.float()).item() for p, t in zip(prediction, target)]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_training_loss_weights_each_image_by_min_snr(scheduler, kind):
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    is_reg = torch.tensor([False, False, False])
    loss = losses.training_loss(prediction, target, timesteps, is_reg, Loss(min_snr_gamma=5.0), scheduler, kind)
    snrs = [sd1_snr(t) for t in timesteps.tolist()]
    weights = [min(s, 5) / (s if kind == "epsilon" else s + 1) for s in snrs]
    expected = sum(m * w for m, w in zip(per_image_mse(prediction, target), weights)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(F.mse_loss(prediction, target).item(), rel=1e-2)


def test_prior_loss_weight_scales_only_regularization_images(scheduler):
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([1, 2, 3, 4])
    is_reg = torch.tensor([False, True, False, True])
    loss = losses.training_loss(prediction, target, timesteps, is_reg, Loss(prior_loss_weight=0.25),
                                scheduler, "epsilon")
    mse = per_image_mse(prediction, target)
    assert loss.item() == pytest.approx((mse[0] + 0.25 * mse[1] + mse[2] + 0.25 * mse[3]) / 4, rel=1e-5)
    # Weight 0: the regularization images give no gradient at all, the others their usual one.
    prediction.requires_grad_(True)
    losses.training_loss(prediction, target, timesteps, is_reg, Loss(prior_loss_weight=0.0), scheduler,
                         "epsilon").backward()
    assert prediction.grad[1].abs().sum() == 0 and prediction.grad[3].abs().sum() == 0
    assert torch.allclose(prediction.grad[0], 2 * (prediction[0] - target[0]).detach() / prediction.numel())


def test_defaults_reproduce_plain_mse_exactly(scheduler):
    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(2, 3, 4, 16, 16, generator=generator).to(torch.bfloat16)
    loss = losses.training_loss(prediction, target, torch.tensor([5, 50, 500]), torch.tensor([True, False, True]),
                                Loss(), scheduler, "epsilon")
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.mse_loss(prediction.float(), target.float()))


# ---------------------------------------------------------------- noise

def draw(latents: torch.Tensor, cfg: Loss, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample_noise's noise, the plain draw of the same seed)."""
    noise = losses.sample_noise(latents, cfg, torch.Generator().manual_seed(seed))
    plain = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return noise, plain


def half_mask() -> torch.Tensor:
    """(2, 1, 8, 8) masks: the left half of each latent trained, the right half ignored."""
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    return mask


@pytest.mark.parametrize("options", [{}, {"min_snr_gamma": 5.0, "prior_loss_weight": 0.5}, {"type": "huber"}])
def test_masked_loss_ignores_the_masked_out_pixels_entirely(scheduler, options):
    """Two batches alike inside the mask and different outside it give the same loss and the same
    gradient, which is zero outside the mask; Min-SNR, prior and folder weights still apply per image."""
    cfg = Loss(**options)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    inside = torch.randn(2, 4, 8, 8, generator=generator)
    outside_a, outside_b = (torch.randn(2, 4, 8, 8, generator=generator) * 5 for _ in range(2))
    mask = half_mask()
    timesteps, is_reg, weights = torch.tensor([100, 700]), torch.tensor([False, True]), torch.tensor([1.0, 0.3])
    results = []
    for outside in (outside_a, outside_b):
        prediction = torch.where(mask.bool(), inside, outside).requires_grad_(True)
        loss = losses.training_loss(prediction, target, timesteps, is_reg, cfg, scheduler, "epsilon", weights, mask)
        loss.backward()
        results.append((loss, prediction.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a.item() == loss_b.item() and torch.equal(grad_a, grad_b)
    assert grad_a[..., 4:].abs().max() == 0 and grad_a[..., :4].abs().max() > 0
    unmasked = losses.training_loss(torch.where(mask.bool(), inside, outside_a), target, timesteps, is_reg, cfg,
                                    scheduler, "epsilon", weights)
    assert unmasked.item() != loss_a.item()  # without the mask the outside counts
    # kohya's order: loss × mask, the mean over every element, then the per-image weights
    half = losses.training_loss(inside[..., :4], target[..., :4], timesteps, is_reg, cfg, scheduler, "epsilon", weights)
    assert loss_a.item() == pytest.approx(half.item() / 2, rel=1e-5)


def test_masks_of_another_size_are_area_averaged_to_the_loss(scheduler):
    fine = torch.zeros(2, 1, 16, 16)
    fine[..., :8] = 1.0  # the left half again, at twice the size
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    args = (torch.tensor([10, 20]), torch.tensor([False, False]), Loss(), scheduler, "epsilon")
    assert losses.training_loss(prediction, target, *args, masks=fine).item() == pytest.approx(
        losses.training_loss(prediction, target, *args, masks=half_mask()).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
def test_pseudo_huber_is_l2_for_small_residuals_and_linear_for_large(scheduler, kind):
    c = 0.1
    cfg = Loss(type=kind, huber_c=c, huber_schedule="constant")
    threshold = losses.huber_threshold(cfg, torch.tensor([10, 900]), scheduler)
    assert torch.allclose(threshold, torch.full((2,), c))
    small = torch.full((2, 1, 2, 2), 1e-3)
    large = torch.full((2, 1, 2, 2), 50.0)
    zero = torch.zeros_like(small)
    scale = 1.0 if kind == "huber" else 1.0 / c  # smooth_l1 is huber / c
    quadratic = losses.elementwise_loss(small, zero, cfg, threshold)
    assert torch.allclose(quadratic, scale * small**2, rtol=1e-3)
    linear = losses.elementwise_loss(large, zero, cfg, threshold)
    assert torch.allclose(linear, scale * 2 * c * (large - c), rtol=1e-4)  # 2c(|r| − c) for |r| ≫ c
    doubled = losses.elementwise_loss(2 * large, zero, cfg, threshold)
    assert torch.allclose(doubled - linear, scale * 2 * c * large, rtol=1e-4)  # slope 2c: linear growth
    l1 = losses.elementwise_loss(large, zero, Loss(type="l1"), None)
    assert torch.equal(l1, large)


def test_huber_schedules_follow_kohyas_formulas(scheduler):
    t = torch.tensor([0, 500, 999])
    exponential = losses.huber_threshold(Loss(type="huber", huber_c=0.1, huber_schedule="exponential"), t, scheduler)
    assert torch.allclose(exponential, torch.exp(-(-torch.log(torch.tensor(0.1)) / 1000) * t.float()))
    assert exponential[0] == 1.0 and 0.1 < exponential[-1] < 0.101  # from 1 at t=0 to ~c at the end
    snr_schedule = losses.huber_threshold(Loss(type="huber", huber_c=0.1, huber_schedule="snr"), t, scheduler)
    sigma = torch.tensor([(1 / sd1_snr(int(i))) ** 0.5 for i in t])
    assert torch.allclose(snr_schedule, (0.9 / (1 + sigma) ** 2 + 0.1).float(), rtol=1e-4)
    assert snr_schedule[0] > 0.8 and snr_schedule[-1] < 0.11  # clean: ~1 (L2-like); all noise: ~c


def test_debiased_and_v_pred_like_weights_follow_kohya(scheduler):
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    t, plain = torch.tensor([0, 300, 999]), torch.ones(3)
    snr_t = torch.clamp(losses.snr(scheduler, t), max=1000.0)
    no_reg = torch.zeros(3, dtype=torch.bool)
    debiased = losses.training_loss(prediction, target, t, no_reg, Loss(debiased_estimation=True), scheduler, "epsilon")
    assert torch.isclose(debiased, (plain / snr_t.sqrt()).mean())
    v_debiased = losses.training_loss(prediction, target, t, no_reg, Loss(debiased_estimation=True), scheduler,
                                      "v_prediction")
    assert torch.isclose(v_debiased, (plain / (snr_t + 1)).mean())
    like = losses.training_loss(prediction, target, t, no_reg, Loss(v_pred_like_loss=0.5), scheduler, "epsilon")
    assert torch.isclose(like, (plain + plain / (snr_t / (snr_t + 1)) * 0.5).mean())


def test_timesteps_stay_in_the_configured_range():
    generator = torch.Generator().manual_seed(0)
    drawn = losses.sample_timesteps(20_000, Loss(min_timestep=100, max_timestep=300), 1000, generator)
    assert drawn.min() == 100 and drawn.max() == 299  # every t in [100, 300), both ends reached
    plain = losses.sample_timesteps(8, Loss(), 1000, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="max_timestep is 1200"):
        losses.sample_timesteps(1, Loss(max_timestep=1200), 1000, generator)
    with pytest.raises(ValueError, match="must be above min_timestep"):
        Loss(min_timestep=500, max_timestep=500)


def test_input_perturbation_noises_the_input_not_the_target():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert losses.input_noise(noise, Loss(), torch.Generator()) is noise
    perturbed = losses.input_noise(noise, Loss(ip_noise_gamma=0.1), torch.Generator().manual_seed(2))
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(perturbed, noise + 0.1 * extra)
    random = losses.input_noise(noise, Loss(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True),
                                torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    gamma = torch.rand((), generator=replay).item() * 0.1  # the strength first, then the extra noise
    assert 0.0 <= gamma < 0.1 and torch.allclose(random, noise + gamma * torch.randn(noise.shape, generator=replay))


def test_zero_terminal_snr_makes_the_last_timestep_pure_noise(scheduler):
    rescaled = losses.zero_terminal_snr(scheduler)
    assert losses.snr(scheduler, torch.tensor([999])).item() > 1e-3
    assert losses.snr(rescaled, torch.tensor([999])).item() < 1e-6  # ᾱ_T = 2⁻²⁴ (diffusers)
    assert torch.isclose(rescaled.alphas_cumprod[0], scheduler.alphas_cumprod[0], rtol=1e-2)  # t=0 nearly clean


def test_sample_noise_with_defaults_is_the_plain_draw():
    latents = torch.randn(3, 4, 8, 12).to(torch.bfloat16)
    noise, plain = draw(latents, Loss())
    assert noise.dtype == torch.bfloat16 and noise.shape == latents.shape
    assert torch.equal(noise, plain.to(torch.bfloat16))


def test_noise_offset_adds_a_random_constant_per_image_and_channel():
    latents = torch.zeros(256, 4, 8, 8)
    noise, plain = draw(latents, Loss(noise_offset=0.1))
    shift = noise - plain
    # The same offset over the whole channel: the per-channel mean moves, the pattern does not.
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.1)
    assert shift[:, :, 0, 0].mean().abs().item() < 0.02


def test_adaptive_noise_scale_grows_with_the_latent_mean():
    latents = torch.zeros(512, 2, 8, 8)
    latents[:, 1] = 2.0 + torch.randn(512, 8, 8) * 0.1   # channel 1: |mean| ≈ 2; channel 0: mean 0
    noise, plain = draw(latents, Loss(noise_offset=0.1, adaptive_noise_scale=0.5))
    offsets = (noise - plain)[:, :, 0, 0]
    assert offsets[:, 0].std().item() == pytest.approx(0.1, rel=0.15)
    assert offsets[:, 1].std().item() == pytest.approx(0.1 + 0.5 * 2.0, rel=0.15)
    # A negative scale can cancel the offset, but never turns it negative (clamped at 0).
    noise, plain = draw(latents, Loss(noise_offset=0.1, adaptive_noise_scale=-1.0))
    offsets = (noise - plain)[:, :, 0, 0]
    assert offsets[:, 0].std().item() == pytest.approx(0.1, rel=0.15)
    assert torch.equal(offsets[:, 1], torch.zeros(512))


def low_frequency_energy(noise: torch.Tensor) -> float:
    return F.avg_pool2d(noise.float(), 8).var().item()


def test_multires_noise_is_unit_scale_with_more_low_frequencies():
    latents = torch.zeros(8, 4, 64, 48)
    cfg = Loss(multires_noise={"iterations": 6, "discount": 0.8})
    noise, plain = draw(latents, cfg)
    assert noise.shape == latents.shape
    assert noise.std().item() == pytest.approx(1.0, abs=1e-4)
    assert low_frequency_energy(noise) > 5 * low_frequency_energy(plain)  # about 13× at this size
    gentler, _ = draw(latents, Loss(multires_noise={"iterations": 6, "discount": 0.3}))
    assert low_frequency_energy(plain) < low_frequency_energy(gentler) < low_frequency_energy(noise)
    assert torch.equal(noise, draw(latents, cfg)[0])  # the generator alone decides it
    assert not torch.equal(noise, draw(latents, cfg, seed=1)[0])


# ---------------------------------------------------------------- max-norm of the updates

def added_update(module) -> torch.Tensor:
    """ΔW as the module's forward adds it: its output minus the original layer's, on a basis (for a
    1×1 conv, basis vector j is pixel j of one image, which is much faster than a batch)."""
    layer = module.org_module[0]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        if isinstance(layer, torch.nn.Linear):
            basis = torch.eye(layer.in_features)
            update = (module(basis) - module.org_forward(basis)).T
        else:
            basis = torch.eye(layer.in_channels)[None, :, :, None]
            update = (module(basis) - module.org_forward(basis))[0, :, :, 0]
    module.train(was_training)
    return update


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return bases.tiny_unet(), bases.tiny_text_encoder()


def tiny_network(tiny_models, algo: str, **kwargs):
    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    unet, text_encoder = copy.deepcopy(tiny_models)
    torch.manual_seed(0)
    net = create_network(1.0, 2, 1.0, None, text_encoder, unet, warn_on_unmatched=False, algo=algo,
                         preset=str(network.PRESET_DIR / "kohya-lora.toml"), **kwargs)
    net.apply_to(text_encoder, unet, True, True)
    return net


def randomized(modules: list) -> list:
    """Give every module a non-zero update, and every third one a hundredfold larger factor."""
    with torch.no_grad():
        for i, module in enumerate(modules):
            for parameter in module.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            if i % 3 == 0:
                next(module.parameters()).mul_(100.0)
    return modules


@pytest.mark.parametrize("algo, kwargs", [("lora", {}), ("loha", {}), ("lokr", {"factor": 4})])
def test_scale_weight_norms_bounds_every_module(tiny_models, algo, kwargs):
    net = tiny_network(tiny_models, algo, **kwargs)
    modules = randomized(net.unet_loras + net.text_encoder_loras)
    assert all(m.scale == 0.5 for m in modules)  # alpha/dim ≠ 1, so a doubly-applied scale shows
    before = [added_update(m).norm().item() for m in modules]
    big = [i for i in range(len(modules)) if i % 3 == 0]
    max_norm = 1.5 * max(n for i, n in enumerate(before) if i not in big)
    assert min(before[i] for i in big) > max_norm
    small_factors = {i: [p.detach().clone() for p in m.parameters()] for i, m in enumerate(modules) if i not in big}

    scaled, mean_norm, largest = losses.scale_weight_norms(net, max_norm)

    after = [added_update(m).norm().item() for m in modules]
    assert scaled == len(big)
    assert all(n <= max_norm * (1 + 1e-4) for n in after)
    assert [after[i] for i in big] == pytest.approx([max_norm] * len(big), rel=1e-4)
    for i, factors in small_factors.items():
        assert all(torch.equal(old, new) for old, new in zip(factors, modules[i].parameters()))
    assert largest == pytest.approx(max_norm, rel=1e-4)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    # Nothing is over the bound any more: nothing is scaled, and the norms are still reported.
    assert losses.scale_weight_norms(net, max_norm) == (0, pytest.approx(mean_norm, rel=1e-4),
                                                        pytest.approx(largest, rel=1e-4))


def file_update(module) -> torch.Tensor:
    """ΔW where the forward pass cannot show it plainly: Full keeps the absolute weight, DyLoRA's
    forward picks a random rank; both files store up/down (or the difference) as defined here."""
    state = module.custom_state_dict()
    if "diff" in state:
        return state["diff"]
    return state["lora_up.weight"] @ state["lora_down.weight"].flatten(1) * module.scale


@pytest.mark.parametrize("algo", ["ia3", "full", "dylora", "glora"])
def test_scale_weight_norms_bounds_other_algorithms(algo):
    from lycoris.modules import DyLoraModule, FullModule, GLoRAModule, IA3Module

    kind = {"ia3": IA3Module, "full": FullModule, "dylora": DyLoraModule, "glora": GLoRAModule}[algo]
    torch.manual_seed(0)
    module = kind("lora_test", torch.nn.Linear(24, 16), 1.0, 4, 1.0)
    module.apply_to()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 5.0)
    measure = file_update if algo in ("full", "dylora") else added_update
    before = measure(module).norm().item()
    scaled, _, largest = losses.scale_weight_norms(SimpleNamespace(unet_loras=[module], text_encoder_loras=[]),
                                                   before / 4)
    assert scaled == 1 and largest == pytest.approx(before / 4, rel=1e-5)
    assert measure(module).norm().item() == pytest.approx(before / 4, rel=1e-4)


def test_scale_weight_norms_refuses_what_it_cannot_bound():
    from lycoris.modules import DiagOFTModule, LoConModule

    dora = LoConModule("lora_dora", torch.nn.Linear(8, 8), 1.0, 2, 1.0, weight_decompose=True)
    with pytest.raises(ValueError, match="DoRA"):
        losses.scale_weight_norms(SimpleNamespace(unet_loras=[dora], text_encoder_loras=[]), 1.0)
    oft = DiagOFTModule("lora_oft", torch.nn.Linear(8, 8), 1.0, 2, 1.0)
    with pytest.raises(ValueError, match="DiagOFTModule"):
        losses.scale_weight_norms(SimpleNamespace(unet_loras=[], text_encoder_loras=[oft]), 1.0)
