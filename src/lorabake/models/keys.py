"""What a `.safetensors` file says about itself before a tensor is read: its keys, shapes and
metadata, and which Stable Diffusion architecture its key prefixes belong to. The one place that
knows the original single-file layout's key prefixes (sd_layout and base_files read them here).

This is the bottom floor of checkpoint handling (no torch), so `lorabake validate` and the
Snakefile's parse can refuse a malformed base or `init_weights` file before any job runs.
safetensors itself checks the header (length, JSON, dtypes, offsets covering the file exactly);
this module turns its errors into messages that name the file and the config key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each text encoder's weights live in a single file, in the order the original models take
# them (diffusers' component names as keys).
TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
# Every prefix a single-file SD checkpoint uses, for telling such a file from a diffusers state dict.
ORIGINAL_PREFIXES = (UNET, VAE) + tuple(p for ps in TEXT_ENCODER_PREFIXES.values() for p in ps.values())
# Each text encoder's token embedding (vocabulary × width), in the original layout.
TOKEN_EMBEDDINGS = {
    "sd1": {"text_encoder": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"},
    "sd2": {"text_encoder": "cond_stage_model.model.token_embedding.weight"},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "text_encoder_2": "conditioner.embedders.1.model.token_embedding.weight"},
}
# Key prefixes that tell the architectures apart (the original repos' module names): SDXL's encoders
# sit under `conditioner.embedders` and its UNet has the size/crop embedding `label_emb`; SD2's
# OpenCLIP under `cond_stage_model.model.`; SD1's OpenAI CLIP under `cond_stage_model.transformer.`.
ARCH_MARKERS = {
    "sdxl": ("conditioner.embedders.1.model.", UNET + "label_emb."),
    "sd2": ("cond_stage_model.model.",),
    "sd1": ("cond_stage_model.transformer.",),
}
# Pickled checkpoints: loading one can run code, so they are refused unless a base opts in.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# kohya's network files: every key starts with one of these (lora_te1_/lora_te2_ for SDXL).
NETWORK_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class HeaderError(ValueError):
    """A file that is not a readable safetensors file; the message names it and says why."""


@dataclass(frozen=True)
class Header:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """Keys, shapes and metadata of a safetensors file, validated by safetensors (header length,
    JSON, dtypes, offsets that cover the file). Reads the header only."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HeaderError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            return Header(path, shapes, dict(f.metadata() or {}))
    except (SafetensorError, OSError) as e:
        raise HeaderError(f"{path}: not a readable .safetensors file ({e}); it may be truncated or "
                          "not a safetensors file at all") from None


def architecture_of(keys) -> str | None:
    """sd1 | sd2 | sdxl from a single-file checkpoint's keys, or None when they are none of these."""
    keys = list(keys)
    for arch, prefixes in ARCH_MARKERS.items():
        if all(any(key.startswith(prefix) for key in keys) for prefix in prefixes):
            return arch
    return None


def describe_markers() -> str:
    return "; ".join(f"{arch}: " + " and ".join(f"{p}…" for p in prefixes) for arch, prefixes in ARCH_MARKERS.items())


def folder_architecture(folder: str | os.PathLike) -> str:
    """sd1 | sd2 | sdxl of a diffusers folder, from its configs: SDXL pipelines list a second text
    encoder; SD2 differs from SD1 by its OpenCLIP encoder, which uses gelu where OpenAI's CLIP-L
    uses quick_gelu (the models' own config.json files)."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if (index.get("text_encoder_2") or [None])[0] is not None:
        return "sdxl"
    encoder = read_json(folder / "text_encoder" / "config.json")
    return "sd2" if encoder.get("hidden_act") == "gelu" else "sd1"


def read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HeaderError(f"{path}: missing; a diffusers folder has model_index.json and a config.json "
                          "per component (as save_pretrained writes them)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HeaderError(f"{path}: a JSON object was expected, got {type(data).__name__}")
    return data
