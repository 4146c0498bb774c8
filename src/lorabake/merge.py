"""Merging LoRAs into a base: weights + Σ ratio × delta, saved as one `.safetensors` checkpoint.

The checkpoint holds every component's weights under `unet.`, `text_encoder.` and `vae.` prefixes
(diffusers names), so `load_merged` can rebuild the models from the base's configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorabake import lora_format, models, network, store

COMPONENTS = ("unet", "text_encoder", "vae")


def merge(base_dir: Path, loras: list[tuple[Path, float]], out: Path, precision: str = "fp32") -> None:
    base = models.load_base(base_dir)
    for path, ratio in loras:
        merged = network.merge_weights(path, base.unet, base.text_encoder, ratio)
        broken = [name for name, p in list(base.unet.named_parameters()) + list(base.text_encoder.named_parameters())
                  if not torch.isfinite(p).all()]
        if broken:
            raise ValueError(f"merging {path} at ratio {ratio:g} made non-finite weights in {broken[:3]}")
        print(f"merge: {path} × {ratio:g} → {merged} modules")
    state = {f"{name}.{key}": value for name in COMPONENTS for key, value in getattr(base, name).state_dict().items()}
    metadata = {"lorabake_base_id": base.id, "lorabake_layout": "diffusers-prefixed",
                "lorabake_loras": json.dumps([[str(p), r] for p, r in loras])}
    store.write_safetensors(out, lora_format.cast(state, precision), metadata)


def load_merged(base_dir: Path, checkpoint: Path) -> models.Base:
    """The base's architecture with the merged checkpoint's weights (in fp32)."""
    base = models.load_base(base_dir)
    state = load_file(str(checkpoint))
    for name in COMPONENTS:
        prefix = f"{name}."
        part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        getattr(base, name).load_state_dict(part, strict=True)
    return base
