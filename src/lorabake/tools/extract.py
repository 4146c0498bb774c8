"""Extracting a LoRA from (tuned − base) by truncated SVD, with kohya key names.

The modules considered are the ones kohya's LoRA trains (found with the same lycoris preset the
trainer uses), plus the 3×3 convolutions when `conv_dim` is set. As in kohya's
`extract_lora_from_models.py`, the text encoders are extracted only when one of their weights moved by
more than `min_diff` (a fine-tune often leaves them alone), and the factors are clamped to the
`clamp_quantile` of their values (kohya's default 0.99), which keeps outliers from dominating the
low-rank file. A UNet module whose weights did not move at all is skipped. Each delta
ΔW ≈ up · down with alpha = rank, so the file applies at scale 1.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lorabake.models import bases, lora_format, network
from lorabake.tools import lora_tools


def target_modules(unet, text_encoder, conv: bool) -> dict[str, tuple[torch.nn.Module, bool]]:
    """lycoris module name → (module, is it in the UNet), for every module a LoRA of this kind touches."""
    from lycoris.kohya import create_network as lycoris_network

    network.use_preset(str(network.CONV_PRESET if conv else network.LINEAR_PRESET))  # LoCon: + ResNet/sampler 3x3
    net = lycoris_network(1.0, 1, 1.0, None, text_encoder, unet, algo="lora", preset=str(network.AS_APPLIED),
                          conv_dim=1 if conv else 0, warn_on_unmatched=False)
    return {lora.lora_name: (lora.org_module[0], lora in net.unet_loras) for lora in net.unet_loras + net.text_encoder_loras}


def module_deltas(base: bases.Base, tuned: bases.Base, conv: bool, min_diff: float) -> dict[str, torch.Tensor]:
    """(tuned − base) weight of every targeted module that moved; text encoders only if one of their
    weights moved by more than min_diff."""
    base_modules = target_modules(base.unet, base.te, conv)
    tuned_modules = target_modules(tuned.unet, tuned.te, conv)
    deltas = {name: tuned_modules[name][0].weight.float() - module.weight.float()
              for name, (module, _) in base_modules.items()}
    text_moved = any(delta.abs().max() > min_diff for name, delta in deltas.items() if not base_modules[name][1])
    if not text_moved:
        print(f"extract: text encoders moved by at most {min_diff:g}: extracting the UNet only")
    return {name: delta for name, delta in deltas.items()
            if delta.any() and (base_modules[name][1] or text_moved)}


@torch.no_grad()
def extract(base: bases.Base, base_info: dict, tuned: bases.Base, out: Path, *, dim: int, conv_dim: int | None,
            clamp_quantile: float | None, min_diff: float, precision: str = "fp32", source: str = "") -> int:
    deltas = module_deltas(base, tuned, conv=conv_dim is not None, min_diff=min_diff)
    if not deltas:
        raise ValueError(f"{source or 'the tuned model'} does not differ from the base in any LoRA-targeted module")
    state = {}
    for name, delta in deltas.items():
        rank = conv_dim if lora_tools.is_3x3(tuple(delta.shape)) else dim
        down, up = lora_tools.svd_factors(delta, rank, clamp_quantile)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(float(down.shape[0]))}
    size = base.resolution
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)} if conv_dim else {}
    metadata = lora_format.lora_metadata(
        run_name=out.stem, algo="lora", dim=dim, alpha=float(dim), network_args=args, base=base_info,
        resolution=(size, size), epoch=0, steps=0,
        facts={"ss_training_comment": f"extracted from {source}: dim {dim}, conv_dim {conv_dim}, "
                                      f"clamp_quantile {clamp_quantile}, min_diff {min_diff:g}"})
    lora_format.save_lora(network.to_kohya_keys(state, base.unet, base.te), out, precision, metadata)
    print(f"extract: {len(deltas)} modules at dim {dim}" + (f", conv_dim {conv_dim}" if conv_dim else ""))
    return len(deltas)
