"""Merging LoRAs into a base: weights + Σ ratio × delta, saved as one single-file checkpoint.

The checkpoint is in the original Stable Diffusion layout (`model.diffusion_model.…`,
`first_stage_model.…`, the text encoders under `cond_stage_model.…` or, for SDXL,
`conditioner.embedders.…`; see sd_layout.py), which A1111, ComfyUI, Forge and kohya load, and which
diffusers' `from_single_file` reads with the base's configs. Each LoRA has a ratio, and optionally
block weights that multiply the ratio per UNet block, in the base's vocabulary: 25 on SD1/SD2 (IN00–IN11,
MID, OUT00–OUT11), 23 on SDXL (EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorabake import store
from lorabake.models import bases, lora_format, network, sd_layout
from lorabake.models.blocks import block_values
from lorabake.unet_blocks import block_list_problem


@dataclass(frozen=True)
class MergeInput:
    path: Path
    ratio: float = 1.0
    block_weights: list[float] | None = None

    def describe(self) -> str:
        blocks = "" if self.block_weights is None else f" (block weights {','.join(f'{w:g}' for w in self.block_weights)})"
        return f"{self.path} × {self.ratio:g}{blocks}"


def merge_into(base: bases.Base, lora: MergeInput) -> int:
    """Add one LoRA's deltas into the base's weights; refuses a merge that makes NaN or inf."""
    problem = block_list_problem(lora.block_weights, f"{lora.path}: block_weights", base.arch)
    if problem:
        raise ValueError(problem)
    weights = block_values(lora.block_weights, 1.0, base.arch) if lora.block_weights is not None else None
    merged = network.merge_weights(lora.path, base.unet, base.te, lora.ratio, block_weights=weights)
    broken = [name for model in (base.unet, *base.text_encoders) for name, p in model.named_parameters()
              if not torch.isfinite(p).all()]
    if broken:
        raise ValueError(f"merging {lora.describe()} made non-finite weights in {broken[:3]}")
    return merged


def checkpoint_metadata(base_dir: Path, base: bases.Base, loras: list[MergeInput], title: str) -> dict[str, str]:
    """modelspec keys of a full checkpoint (kohya's sai_model_spec for a Stable Diffusion ckpt), and
    lorabake's provenance."""
    info = bases.base_info(base_dir)
    arch_meta = lora_format.architecture_metadata(base.arch, info.get("prediction", "epsilon"))
    size = base.resolution
    return {
        **lora_format.MODELSPEC_VERSION,
        "modelspec.architecture": arch_meta["modelspec.architecture"].removesuffix("/lora"),
        "modelspec.implementation": lora_format.STABILITY,
        "modelspec.prediction_type": arch_meta["modelspec.prediction_type"],
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.merged_from": ", ".join(lora.path.stem for lora in loras),
        "lorabake_base_id": base.id,
        "lorabake_loras": json.dumps([[str(l.path), l.ratio, l.block_weights] for l in loras]),
    }


def merge(base_dir: Path, loras: list[MergeInput], out: Path, precision: str = "fp32") -> None:
    base = bases.load_base(base_dir)
    for lora in loras:
        print(f"merge: {lora.describe()} → {merge_into(base, lora)} modules")
    state = sd_layout.to_single_file(base.arch, base.unet, base.vae, base.text_encoders)
    store.write_safetensors(out, lora_format.cast(state, precision),
                            checkpoint_metadata(base_dir, base, loras, title=Path(out).stem))


def load_merged(base_dir: Path, checkpoint: Path) -> bases.Base:
    """A merged (single-file) checkpoint of the base's architecture as models (fp32), read by
    diffusers' own single-file loader with the base folder's configs, offline."""
    import diffusers

    base = bases.load_base(base_dir, parts=())
    pipe_class = getattr(diffusers, json.loads((Path(base_dir) / "model_index.json").read_text())["_class_name"])
    pipe = pipe_class.from_single_file(str(checkpoint), config=str(base_dir), local_files_only=True,
                                       torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(base, name, module.float().eval().requires_grad_(False))
    return base
