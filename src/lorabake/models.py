"""Base models: the embedded `tiny-sd`, built deterministically, and loading a built base.

tiny-sd keeps Stable Diffusion 1's *topology* — a UNet with 4 levels of 2 layers each and
cross-attention in the first three, a 4-level VAE whose latents are 1/8 of the image, a CLIP text
encoder with the real BPE tokenizer — and only makes the widths tiny. So the 25-block vocabulary,
kohya's key names and the single-file layout all apply unchanged, and a training step is milliseconds.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from lorabake import store

TINY_SEED = 0
TINY_WIDTHS = (32, 32, 64, 64)
TEXT_WIDTH = 32
CLIP_VOCAB_SIZE = 49408  # 256 bytes × 2 + 48894 merges + 2 specials
SD1_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


# ---------------------------------------------------------------- the CLIP tokenizer, offline

def _byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet, in vocabulary order: printable bytes first, as
    themselves, then the other bytes mapped past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    alphabet = {byte: chr(byte) for byte in printable}
    for extra, byte in enumerate(b for b in range(256) if b not in alphabet):
        alphabet[byte] = chr(256 + extra)
    return alphabet


def clip_bpe_file() -> Path:
    """The BPE merges file open-clip-torch ships (found without importing open_clip)."""
    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the open-clip-torch package is not installed; it ships the CLIP vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(out_dir: Path) -> None:
    """Write vocab.json + merges.txt in the layout transformers' CLIPTokenizer reads."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_byte_alphabet().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    out_dir.mkdir(parents=True, exist_ok=True)
    store.write_text(out_dir / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    store.write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    store.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    })


# ---------------------------------------------------------------- tiny-sd

def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=TINY_WIDTHS, norm_num_groups=32, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=128,
        block_out_channels=TINY_WIDTHS, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_sd(out_dir: Path) -> None:
    """Build tiny-sd into `out_dir` (diffusers layout). Same torch version → same bytes."""
    from diffusers import DDPMScheduler

    out_dir = Path(out_dir)
    parts = {}
    for offset, (name, make) in enumerate((("unet", tiny_unet), ("vae", tiny_vae), ("text_encoder", tiny_text_encoder))):
        torch.manual_seed(TINY_SEED + offset)
        parts[name] = make()
        parts[name].save_pretrained(out_dir / name, safe_serialization=True)
    DDPMScheduler(**SD1_NOISE_SCHEDULE).save_pretrained(out_dir / "scheduler")
    write_clip_tokenizer(out_dir / "tokenizer")
    store.write_json(out_dir / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


BUILDERS = {"tiny-sd": build_tiny_sd}


def build_base(builtin: str, out_dir: Path) -> str:
    """Build a base into `out_dir` (atomically, via a sibling temp folder) and return its id."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        BUILDERS[builtin](tmp)
        base_id = store.tree_sha256(tmp)[:16]
        store.write_json(tmp / "base.json", {"id": base_id, "builtin": builtin, "architecture": "sd1"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base_id


# ---------------------------------------------------------------- loading a built base

@dataclass
class Base:
    id: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def base_id(base_dir: Path) -> str:
    return json.loads((Path(base_dir) / "base.json").read_text())["id"]


def load_base(base_dir: Path, parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> Base:
    """Load a base built by `build_base`, offline; parts not asked for are left as None."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = Path(base_dir)
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    loaded = {name: loaders[name].from_pretrained(base_dir / name).eval() if name in parts else None
              for name in loaders}
    for module in loaded.values():
        if module is not None:
            module.requires_grad_(False)
    return Base(
        id=base_id(base_dir),
        tokenizer=CLIPTokenizer.from_pretrained(base_dir / "tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(base_dir / "scheduler"),
        **loaded,
    )
