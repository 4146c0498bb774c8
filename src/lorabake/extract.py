"""Extracting a LoRA from (tuned − base) by truncated SVD, with kohya key names.

The modules considered are the ones kohya's LoRA trains (found with the same lycoris preset the
trainer uses), plus the 3×3 convolutions when `conv_dim` is set. A module whose weights did not move
is skipped. Each delta ΔW ≈ (U·S)[:, :r] · Vᵀ[:r]; alpha = r so the file applies at scale 1.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lorabake import lora_format, merge, models, network


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-`rank` approximation of a 2-D delta."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, S.numel())
    return Vh[:rank].float(), (U[:, :rank] * S[:rank]).float()


def module_factors(name: str, delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    out_ch = delta.shape[0]
    down, up = low_rank(delta.reshape(out_ch, -1), rank)
    if delta.dim() == 4:  # conv: down keeps the kernel, up is 1×1
        down = down.reshape(down.shape[0], *delta.shape[1:])
        up = up.reshape(out_ch, up.shape[1], 1, 1)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(down.shape[0]))}


def target_modules(unet, text_encoder, conv: bool) -> dict[str, torch.nn.Module]:
    """kohya module name → module, for every module a LoRA of this kind would touch."""
    from lycoris.kohya import create_network as lycoris_network

    network._quiet_lycoris()
    preset = str(network.CONV_PRESET if conv else network.LINEAR_PRESET)  # LoCon: + ResNet/sampler 3x3 convs
    net = lycoris_network(1.0, 1, 1.0, None, text_encoder, unet, algo="lora", preset=preset,
                          conv_dim=1 if conv else 0, warn_on_unmatched=False)
    return {lora.lora_name: lora.org_module[0] for lora in net.unet_loras + net.text_encoder_loras}


@torch.no_grad()
def extract(base_dir: Path, tuned_checkpoint: Path, dim: int, conv_dim: int | None, out: Path,
            precision: str = "fp32") -> int:
    base = models.load_base(base_dir, parts=("unet", "text_encoder"))
    tuned = merge.load_merged(base_dir, tuned_checkpoint)
    base_modules = target_modules(base.unet, base.text_encoder, conv=conv_dim is not None)
    tuned_modules = target_modules(tuned.unet, tuned.text_encoder, conv=conv_dim is not None)
    state = {}
    for name, module in base_modules.items():
        delta = tuned_modules[name].weight.float() - module.weight.float()
        if not delta.any():
            continue
        is_3x3 = delta.dim() == 4 and delta.shape[2:] != (1, 1)
        state |= module_factors(name, delta, conv_dim if is_3x3 else dim)
    if not state:
        raise ValueError(f"{tuned_checkpoint} does not differ from the base in any LoRA-targeted module")
    metadata = lora_format.lora_metadata(
        run_name=out.stem, algo="lora", dim=dim, alpha=float(dim), preset="extracted", base_id=base.id,
        resolution=(512, 512), epoch=0, steps=0, facts={"ss_training_comment": f"extracted from {tuned_checkpoint.name}",
                                                         "ss_conv_dim": str(conv_dim or 0)})
    lora_format.save_lora(network.to_kohya_keys(state, base.unet, base.te), out, precision, metadata)
    modules = len(state) // 3
    print(f"extract: {modules} modules at dim {dim}" + (f", conv_dim {conv_dim}" if conv_dim else ""))
    return modules
