"""lora_tools: resize (fixed and dynamic), SVD merge and SVD factors on kohya-format state dicts."""
from __future__ import annotations

import pytest
import torch

from lorabake.models import bases, network as lorabake_network
from lorabake.tools import lora_tools

# (module name, ΔW shape): Linear layers, a 3×3 conv (LoCon) and a 1×1 conv
SHAPES = {"lora_unet_attn_to_q": (24, 16), "lora_te_mlp_fc1": (40, 12),
          "lora_unet_resnet_conv1": (8, 6, 3, 3), "lora_unet_proj_in": (10, 7, 1, 1)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def random_lora(rank: int, alpha: float, seed: int, true_rank: int | None = None,
                shapes: dict = SHAPES) -> dict[str, torch.Tensor]:
    """A kohya LoRA of random factors; with `true_rank`, up @ down has only that rank."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        down = torch.randn(rank, *shape[1:], generator=generator)
        up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=generator)
        if true_rank is not None:  # rows past true_rank repeat mixes of the first ones
            mix = torch.randn(rank - true_rank, true_rank, generator=generator)
            down[true_rank:] = (mix @ down[:true_rank].reshape(true_rank, -1)).reshape(down[true_rank:].shape)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(alpha)}
    return state


def lora_with_singular_values(S: list[float], shape=(20, 30), seed: int = 0) -> dict[str, torch.Tensor]:
    """One module whose ΔW has exactly these singular values (orthonormal U, V from QR)."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(shape[0], len(S), generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(shape[1], len(S), generator=generator, dtype=torch.float64))[0]
    up = U * torch.tensor(S, dtype=torch.float64)
    return {"m.lora_down.weight": V.T.float(), "m.lora_up.weight": up.float(), "m.alpha": torch.tensor(float(len(S)))}


# ---------------------------------------------------------------- resize

@pytest.mark.parametrize("new_rank", [4, 6])
def test_resize_at_or_above_the_true_rank_reproduces_every_delta(new_rank):
    state = random_lora(rank=8, alpha=2.0, seed=1, true_rank=4)
    resized, report = lora_tools.resize_lora(state, new_rank)
    assert lora_tools.module_names(resized) == sorted(SHAPES)
    for name in SHAPES:
        assert relative_error(lora_tools.module_delta(resized, name), lora_tools.module_delta(state, name)) < 1e-3
        assert resized[f"{name}.lora_down.weight"].shape[0] == new_rank
        # alpha / rank is kept, so the same multiplier applies the same ΔW
        assert float(resized[f"{name}.alpha"]) / new_rank == pytest.approx(2.0 / 8)
    assert [m.old_rank for m in report.modules] == [8] * len(SHAPES)
    assert report.min_retained == pytest.approx(1.0, abs=1e-9)


def test_resize_to_rank_2_reports_the_energy_of_the_kept_singular_values():
    state = random_lora(rank=8, alpha=8.0, seed=2)
    resized, report = lora_tools.resize_lora(state, 2)
    for module in report.modules:
        S = torch.linalg.svdvals(lora_tools.module_delta(state, module.name).double().flatten(1))
        expected = float((S[:2] ** 2).sum() / (S ** 2).sum())
        assert module.new_rank == 2
        assert module.retained_energy == pytest.approx(expected, rel=1e-6)
        assert module.retained_energy < 1
        # the resized module is the best rank-2 approximation: what it misses is exactly the rest
        missing = lora_tools.module_delta(state, module.name) - lora_tools.module_delta(resized, module.name)
        assert float(missing.double().norm() ** 2) == pytest.approx(float((S[2:] ** 2).sum()), rel=1e-3)
    retained = [m.retained_energy for m in report.modules]
    assert report.mean_retained == pytest.approx(sum(retained) / len(retained))
    assert report.min_retained == min(retained)
    assert "energy retained" in report.summary() and "from 8 to 2" in report.describe()


# σ² = 64, 16, 4, 1, .25, so the energy kept at rank 1…5 is .751 .938 .985 .997 1 (its root is the
# Frobenius fraction sv_fro compares), and the Σσ fraction kept is .516 .774 .903 .968 1
KNOWN_S = [8.0, 4.0, 2.0, 1.0, 0.5]


@pytest.mark.parametrize("method, param, expected_rank", [
    ("sv_ratio", 5.0, 3),        # σ ≥ 8 / 5 = 1.6 → 8, 4, 2
    ("sv_ratio", 10.0, 4),       # σ ≥ 0.8 → 8, 4, 2, 1
    ("sv_ratio", 1.0, 1),        # only σ_max itself
    ("sv_fro", 0.95, 2),         # √.938 = .969 ≥ .95 but √.751 = .866 is not
    ("sv_fro", 0.99, 3),         # √.985 = .9926
    ("sv_cumulative", 0.5, 1),   # .516
    ("sv_cumulative", 0.95, 4),  # .968, while .903 is short
    ("sv_cumulative", 1.0, 5),
])
def test_dynamic_methods_choose_the_rank_their_definition_implies(method, param, expected_rank):
    state = lora_with_singular_values(KNOWN_S)
    resized, report = lora_tools.resize_lora(state, 16, dynamic=method, dynamic_param=param)
    assert report.modules[0].new_rank == expected_rank
    kept = torch.linalg.svdvals(lora_tools.module_delta(resized, "m").double())[:expected_rank]
    assert torch.allclose(kept, torch.tensor(KNOWN_S[:expected_rank], dtype=torch.float64), rtol=1e-4)


def test_dynamic_rank_is_capped_at_rank():
    state = lora_with_singular_values(KNOWN_S)
    _, report = lora_tools.resize_lora(state, 2, dynamic="sv_ratio", dynamic_param=100.0)
    assert report.modules[0].new_rank == 2


def test_an_empty_module_keeps_rank_1_and_its_scale():
    state = random_lora(rank=4, alpha=1.0, seed=3, shapes={"m": (6, 5)})
    state["m.lora_up.weight"].zero_()
    resized, report = lora_tools.resize_lora(state, 4)
    assert report.modules[0].new_rank == 1 and float(resized["m.alpha"]) == pytest.approx(0.25)
    assert not lora_tools.module_delta(resized, "m").any()


# ---------------------------------------------------------------- SVD merge

def test_svd_merge_at_the_sum_of_ranks_reproduces_the_weighted_sum():
    first = random_lora(rank=4, alpha=2.0, seed=4)
    second = random_lora(rank=3, alpha=3.0, seed=5)
    only_in_second = random_lora(rank=3, alpha=1.5, seed=6, shapes={"lora_te_extra": (9, 11)})
    second |= only_in_second
    merged = lora_tools.svd_merge([(first, 0.7), (second, -0.3)], rank=7)
    assert lora_tools.module_names(merged) == sorted([*SHAPES, "lora_te_extra"])
    for name in SHAPES:
        expected = 0.7 * lora_tools.module_delta(first, name) - 0.3 * lora_tools.module_delta(second, name)
        assert relative_error(lora_tools.module_delta(merged, name), expected) < 1e-3
        assert float(merged[f"{name}.alpha"]) == merged[f"{name}.lora_down.weight"].shape[0]  # applies at scale 1
    extra = -0.3 * lora_tools.module_delta(second, "lora_te_extra")
    assert relative_error(lora_tools.module_delta(merged, "lora_te_extra"), extra) < 1e-3
    assert merged["lora_te_extra.lora_down.weight"].shape[0] == 3  # its delta has no more rank to give


def test_svd_merge_below_the_sum_of_ranks_is_the_best_approximation():
    first, second = random_lora(rank=4, alpha=4.0, seed=7), random_lora(rank=4, alpha=4.0, seed=8)
    merged = lora_tools.svd_merge([(first, 1.0), (second, 0.5)], rank=3, conv_rank=2)
    for name, shape in SHAPES.items():
        target = lora_tools.module_delta(first, name) + 0.5 * lora_tools.module_delta(second, name)
        kept = 2 if lora_tools.is_3x3(shape) else 3
        assert merged[f"{name}.lora_down.weight"].shape[0] == kept
        energy = 1 - float((lora_tools.module_delta(merged, name) - target).double().norm() ** 2
                           / target.double().norm() ** 2)
        assert energy == pytest.approx(lora_tools.retained_energy(target, kept), abs=1e-4)


# ---------------------------------------------------------------- conv modules and SVD factors

def test_conv_modules_round_trip_with_3x3_down_and_1x1_up():
    state = random_lora(rank=5, alpha=5.0, seed=9)
    resized, _ = lora_tools.resize_lora(state, 8, conv_rank=5)
    down, up = resized["lora_unet_resnet_conv1.lora_down.weight"], resized["lora_unet_resnet_conv1.lora_up.weight"]
    assert down.shape == (5, 6, 3, 3) and up.shape == (8, 5, 1, 1)
    assert resized["lora_unet_proj_in.lora_down.weight"].shape == (5, 7, 1, 1)  # 1×1 convs follow rank
    for name in ("lora_unet_resnet_conv1", "lora_unet_proj_in"):
        assert relative_error(lora_tools.module_delta(resized, name), lora_tools.module_delta(state, name)) < 1e-3
    # a full conv delta factored at full rank is the same delta
    delta = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(10))
    down, up = lora_tools.svd_factors(delta, rank=54)
    assert down.shape == (8, 6, 3, 3) and up.shape == (8, 8, 1, 1)  # rank capped at min(out, in·3·3)
    rebuilt = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape)
    assert relative_error(rebuilt, delta) < 1e-5


def test_svd_factors_is_the_best_rank_r_approximation():
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(11))
    down, up = lora_tools.svd_factors(delta, rank=5)
    U, S, Vh = torch.linalg.svd(delta.double())
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    assert relative_error(up @ down, best) < 1e-5
    assert lora_tools.retained_energy(delta, 5) == pytest.approx(float((S[:5] ** 2).sum() / (S ** 2).sum()))


def test_clamp_quantile_clamps_both_factors_to_the_quantile():
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(12))
    down, up = lora_tools.svd_factors(delta, rank=6)
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
    clamped_down, clamped_up = lora_tools.svd_factors(delta, rank=6, clamp_quantile=0.9)
    assert max(up.abs().max(), down.abs().max()) > high  # something to clamp
    assert torch.allclose(clamped_up, up.clamp(-high, high), atol=1e-6)
    assert torch.allclose(clamped_down, down.clamp(-high, high), atol=1e-6)
    assert float(clamped_up.abs().max()) == pytest.approx(float(high), rel=1e-5)
    with pytest.raises(ValueError, match="clamp_quantile"):
        lora_tools.svd_factors(delta, rank=6, clamp_quantile=1.5)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("key, algo", [("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"),
                                       ("lora_unet_x.lora_mid.weight", "use_tucker"),
                                       ("lora_unet_x.dora_scale", "DoRA"), ("emb_params", "not a LoRA")])
def test_modules_of_other_algos_are_refused_by_name(key, algo):
    state = random_lora(rank=2, alpha=1.0, seed=13, shapes={"lora_unet_ok": (4, 4)}) | {key: torch.zeros(2)}
    module = key.split(".")[0]
    for call in (lambda: lora_tools.resize_lora(state, 2), lambda: lora_tools.svd_merge([(state, 1.0)], 2)):
        with pytest.raises(lora_tools.NotLoraModule, match=rf"module {module}: key '{key}'.*{algo}"):
            call()


def test_incomplete_or_mismatched_modules_are_refused():
    state = random_lora(rank=2, alpha=1.0, seed=14, shapes={"m": (4, 5)})
    with pytest.raises(lora_tools.NotLoraModule, match="module m has .*not both"):
        lora_tools.module_names({k: v for k, v in state.items() if "lora_up" not in k})
    with pytest.raises(lora_tools.NotLoraModule, match=r"module m: lora_up \(4, 3\) does not fit"):
        lora_tools.module_names(state | {"m.lora_up.weight": torch.zeros(4, 3)})
    with pytest.raises(KeyError, match="no LoRA module 'n'"):
        lora_tools.module_delta(state, "n")
    with pytest.raises(ValueError, match=r"ΔW shapes differ.*\{1: \(4, 5\), 2: \(4, 6\)\}"):
        lora_tools.svd_merge([(state, 1.0), (random_lora(2, 1.0, 15, shapes={"m": (4, 6)}), 1.0)], rank=2)


@pytest.mark.parametrize("options, message", [
    (dict(dynamic="sv_fro"), "needs dynamic_param"),
    (dict(dynamic="sv_max", dynamic_param=2.0), "must be one of"),
    (dict(dynamic_param=0.9), "without a dynamic method"),
    (dict(dynamic="sv_fro", dynamic_param=1.5), r"in \(0, 1\]"),
    (dict(dynamic="sv_ratio", dynamic_param=0.5), "≥ 1"),
    (dict(conv_rank=0), "conv_rank must be"),
])
def test_resize_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        lora_tools.resize_lora(random_lora(2, 1.0, 16), 2, **options)


# ---------------------------------------------------------------- files and a real lycoris LoRA

def test_resized_metadata_and_load_lora(tmp_path):
    from lorabake.models import lora_format

    state = random_lora(rank=8, alpha=4.0, seed=17)
    resized, report = lora_tools.resize_lora(state, 4, conv_rank=2)
    old = {"ss_network_dim": "8", "ss_network_alpha": "4", "sshs_legacy_hash": "stale", "ss_training_comment": "hi"}
    meta = lora_tools.resized_metadata(old, report)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); hi"
    assert "sshs_legacy_hash" not in meta
    lora_format.save_lora(resized, tmp_path / "small.safetensors", "fp32", meta)
    loaded, loaded_meta = lora_tools.load_lora(tmp_path / "small.safetensors")
    assert loaded_meta["ss_network_dim"] == "4" and len(loaded_meta["sshs_model_hash"]) == 64
    assert all(torch.equal(loaded[k], resized[k]) for k in resized)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        lora_tools.load_lora(tmp_path / "missing.safetensors")


@torch.no_grad()
def test_a_real_lycoris_locon_on_the_tiny_unet():
    from lycoris.kohya import create_network

    torch.manual_seed(18)
    text_encoder, unet = bases.tiny_text_encoder(), bases.tiny_unet()
    network = create_network(1.0, 4, 2.0, None, text_encoder, unet, algo="lora",
                             preset=str(lorabake_network.CONV_PRESET), conv_dim=4, conv_alpha=1.0,
                             warn_on_unmatched=False)
    # apply_to registers the modules, so that state_dict() holds them
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    for lora in network.loras:
        torch.nn.init.normal_(lora.lora_up.weight)  # lycoris starts up at zero: give each module a delta
    state = network.state_dict()
    assert any(lora_tools.is_3x3(lora.shape) for lora in network.loras)
    for lora in network.loras:  # ΔW as read from the file is what lycoris applies
        expected = lora.get_diff_weight(multiplier=1.0, shape=lora.shape)[0]
        assert relative_error(lora_tools.module_delta(state, lora.lora_name), expected) < 1e-5
    resized, report = lora_tools.resize_lora(state, 4)
    assert report.min_retained == pytest.approx(1.0, abs=1e-6)
    for lora in network.loras:
        assert relative_error(lora_tools.module_delta(resized, lora.lora_name),
                              lora_tools.module_delta(state, lora.lora_name)) < 1e-3
    _, dynamic = lora_tools.resize_lora(state, 4, dynamic="sv_fro", dynamic_param=0.9)
    assert all(1 <= m.new_rank <= 4 and m.retained_energy >= 0.81 - 1e-6 for m in dynamic.modules)
