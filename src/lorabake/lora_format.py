"""Saving LoRA files as kohya does: `lora_unet_…`/`lora_te_…` keys, `ss_*` and `modelspec.*` metadata.

Metadata holds no timestamps, so the same config and seed give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save

from lorabake import __version__, store

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: sha256 over each tensor's serialized bytes, in key order."""
    h = hashlib.sha256()
    for tensor in state.values():
        blob = save({"tensor": tensor})
        header_length = int.from_bytes(blob[:8], "little")
        h.update(blob[8 + header_length:])
    return f"0x{h.hexdigest()}"


def cast(state: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", DTYPES[precision]).contiguous() for k, v in sorted(state.items())}


def save_lora(state: dict[str, torch.Tensor], path: str | Path, precision: str, metadata: dict[str, str]) -> None:
    state = cast(state, precision)
    store.write_safetensors(path, state, {**metadata, "sshs_model_hash": tensor_hash(state)})


def network_module(algo: str) -> str:
    """What kohya's tools expect in `ss_network_module` to rebuild the network."""
    return "networks.lora" if algo == "lora" else "lycoris.kohya"


def lora_metadata(*, run_name: str, algo: str, dim: int, alpha: float, preset: str, base_id: str,
                  resolution: tuple[int, int], epoch: int, steps: int, facts: dict) -> dict[str, str]:
    """kohya's `ss_*` keys, a few `modelspec.*` keys, and lorabake's own provenance."""
    meta = {
        "ss_output_name": run_name,
        "ss_network_module": network_module(algo),
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps({"algo": algo, "preset": preset}),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_sd_model_name": base_id,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{run_name} (epoch {epoch})",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "lorabake_version": __version__,
        "lorabake_base_id": base_id,
    }
    for key, value in facts.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta
