"""LoRA networks from lycoris-lora, named the way kohya names them.

lycoris' kohya wrapper prefixes module paths with `lora_unet_` / `lora_te_` and replaces dots by
underscores, which is exactly kohya's key scheme. Our preset (presets/kohya-lora.toml) targets what kohya's
own LoRA targets: the Linear and 1×1 conv layers inside the UNet's transformer blocks, and the CLIP text
encoder's attention and MLP layers.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorabake.config import Network

PRESET_DIR = Path(__file__).parent / "presets"
PRESET = {"lora": str(PRESET_DIR / "kohya-lora.toml")}
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"


def _quiet_lycoris() -> None:
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)


def use_preset(name: str) -> None:
    """lycoris keeps its target preset on the class; set it before building any network."""
    from lycoris.config import PRESET as BUILTIN
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    _quiet_lycoris()
    LycorisNetworkKohya.apply_preset(BUILTIN[name] if name in BUILTIN else read_preset(name))


def create_network(unet, text_encoder, cfg: Network, seed: int):
    """A fresh network wrapped around the models (forward hooks); up-weights start at zero."""
    from lycoris.kohya import create_network as lycoris_network

    _quiet_lycoris()
    torch.manual_seed(seed)
    network = lycoris_network(1.0, cfg.dim, cfg.alpha, None, text_encoder, unet, warn_on_unmatched=False,
                              algo=cfg.algo, preset=PRESET[cfg.algo])
    network.apply_to(text_encoder, unet, apply_text_encoder=cfg.train_text_encoder,
                     apply_unet=cfg.train_unet)
    return network


# transformers 5 dropped CLIPTextModel's `text_model.` level, so lycoris names its modules
# `lora_te_encoder_…`; kohya, A1111 and ComfyUI expect `lora_te_text_model_encoder_…`.
FLAT_TE_PREFIX = f"{TEXT_ENCODER_PREFIX}_"
KOHYA_TE_PREFIX = f"{TEXT_ENCODER_PREFIX}_text_model_"


def _flat(text_encoder) -> bool:
    return text_encoder is not None and not hasattr(text_encoder, "text_model")


def _swap_te_prefix(state: dict, text_encoder, old: str, new: str) -> dict:
    if not _flat(text_encoder):
        return state
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}


def to_kohya_keys(state: dict, text_encoder) -> dict:
    """Module-path keys of this model → the key names every other tool expects."""
    return _swap_te_prefix(state, text_encoder, FLAT_TE_PREFIX, KOHYA_TE_PREFIX)


def from_kohya_keys(state: dict, text_encoder) -> dict:
    return _swap_te_prefix(state, text_encoder, KOHYA_TE_PREFIX, FLAT_TE_PREFIX)


class UnmatchedKeys(ValueError):
    """A LoRA file names modules this model does not have ("lora key not loaded")."""


def load_weights(path: Path, unet, text_encoder, multiplier: float = 1.0):
    """Build a network from a LoRA file, checking that every key finds its module."""
    from lycoris.kohya import create_network_from_weights

    use_preset(PRESET["lora"])  # any preset works for loading; the default one fails on SD1 UNets
    weights = from_kohya_keys(load_file(str(path)), text_encoder)
    network, _ = create_network_from_weights(multiplier, str(path), None, text_encoder, unet, weights_sd=weights)
    loaded = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras}
    unmatched = sorted({key.split(".")[0] for key in weights} - loaded)
    if unmatched:
        raise UnmatchedKeys(f"{path}: {len(unmatched)} LoRA module(s) match nothing in the model, e.g. {unmatched[:3]}")
    network.load_state_dict(weights, strict=False)
    return network


def apply_weights(path: Path, unet, text_encoder, multiplier: float = 1.0):
    """Apply a LoRA file at run time (the original weights stay untouched); returns the network."""
    network = load_weights(path, unet, text_encoder, multiplier)
    for lora in network.unet_loras + network.text_encoder_loras:
        lora.apply_to()
    return network


@torch.no_grad()
def merge_weights(path: Path, unet, text_encoder, multiplier: float = 1.0) -> int:
    """Add `multiplier` × the LoRA's weight deltas into the models' weights; returns modules merged."""
    network = load_weights(path, unet, text_encoder, multiplier)
    loras = network.unet_loras + network.text_encoder_loras
    for lora in loras:
        lora.merge_to(multiplier)
    return len(loras)


def module_deltas(path: Path, unet, text_encoder, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """The weight delta each LoRA module adds, by kohya module name (for checks and extraction tests)."""
    network = load_weights(path, unet, text_encoder, multiplier)
    deltas = {}
    for lora in network.unet_loras + network.text_encoder_loras:
        weight = lora.org_module[0].weight
        delta, _ = lora.get_diff_weight(multiplier=multiplier, shape=weight.shape, device=weight.device)
        deltas[lora.lora_name] = delta.detach().float()
    return deltas
