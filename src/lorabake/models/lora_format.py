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


MIB = 0x100000


def addnet_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash` (sd-webui-additional-networks' hashes, which
    kohya precalculates in train_util.precalculate_safetensors_hashes): the file as
    `safetensors.torch.save` writes these tensors with only the `ss_*` metadata, then sha256 of
    everything after the header, and sha256 of the 64 KiB at offset 1 MiB (first 8 hex digits)."""
    blob = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[MIB:MIB + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def cast(state: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", DTYPES[precision]).contiguous() for k, v in sorted(state.items())}


def save_lora(state: dict[str, torch.Tensor], path: str | Path, precision: str, metadata: dict[str, str]) -> None:
    state = cast(state, precision)
    model_hash, legacy_hash = addnet_hashes(state, metadata)
    store.write_safetensors(path, state, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})


def network_module(algo: str) -> str:
    """What kohya's tools expect in `ss_network_module` to rebuild the network."""
    return "networks.lora" if algo == "lora" else "lycoris.kohya"


STABILITY = "https://github.com/Stability-AI/generative-models"
# The spec version kohya's library/sai_model_spec.py writes, and who wrote the file (kohya writes
# sd-scripts/<commit>); in every LoRA and checkpoint lorabake saves.
MODELSPEC_VERSION = {"modelspec.sai_model_spec": "1.0.1", "modelspec.implementation_version": f"lorabake/{__version__}"}


def architecture_metadata(arch: str, prediction: str) -> dict[str, str]:
    """The base-model keys as kohya writes them (train_network.py, library/sai_model_spec.py): SDXL
    and SD2 LoRAs name their base, v-prediction says so, and an SDXL LoRA's implementation is
    Stability's (its key names are the original UNet's)."""
    v = prediction == "v_prediction"
    version, spec = {"sd1": ("sd_v1", "stable-diffusion-v1"),
                     "sd2": ("sd_v2", "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"),
                     "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")}[arch]
    return {"ss_base_model_version": version, "ss_v2": str(arch == "sd2"), "ss_v_parameterization": str(v),
            "modelspec.architecture": f"{spec}/lora",
            "modelspec.implementation": STABILITY if arch == "sdxl" else "diffusers",
            "modelspec.prediction_type": "v" if v else "epsilon"}


def lora_metadata(*, run_name: str, algo: str, dim: int, alpha: float, network_args: dict[str, str],
                  base: dict, resolution: tuple[int, int], epoch: int, steps: int, facts: dict) -> dict[str, str]:
    """kohya's `ss_*` keys, `modelspec.*` keys, and lorabake's own provenance. `base` is the base's
    base.json (id, architecture, prediction)."""
    meta = {
        "ss_output_name": run_name,
        "ss_network_module": network_module(algo),
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(network_args, sort_keys=True),
        **architecture_metadata(base.get("architecture", "sd1"), base.get("prediction", "epsilon")),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_sd_model_name": base.get("source", {}).get("path", base.get("builtin", base["id"])),
        **MODELSPEC_VERSION,
        "modelspec.title": f"{run_name} (epoch {epoch})",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "lorabake_version": __version__,
        "lorabake_base_id": base["id"],
    }
    for key, value in facts.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta
