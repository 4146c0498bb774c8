"""Base models: the embedded `tiny-sd`, built deterministically, the pretrained `toy-shapes`, and
loading a built base.

tiny-sd keeps Stable Diffusion 1's *topology* — a UNet with 4 levels of 2 layers each and
cross-attention in the first three, a 4-level VAE whose latents are 1/8 of the image, a CLIP text
encoder with the real BPE tokenizer — and only makes the widths tiny. So the 25-block vocabulary,
kohya's key names and the single-file layout all apply unchanged, and a training step is milliseconds.
toy-shapes has the same topology, a little wider, and was really pretrained (by
scripts/pretrain_toy_shapes.py, on the world of lorabake.models.toy_world); its weights ship in
`weights/toy-shapes/` with a manifest of their sha256.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorabake import store

TINY_SEED = 0
TINY_WIDTHS = (32, 32, 64, 64)
TEXT_WIDTH = 32
SDXL_TIME_EMBED = 8  # per size/crop number (SDXL: 256)
# SDXL's second encoder is wider than its first (1280 vs 768); diffusers tells them apart by width.
SDXL_TEXT_WIDTH_2 = 64
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
    """CLIP's BPE merges file, shipped in the package (models/vocab/, with its MIT licence)."""
    return Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write vocab.json + merges.txt in the layout transformers' CLIPTokenizer reads. SD1 pads with
    the end token; OpenCLIP's tokenizer (SD2, SDXL's second encoder) pads with "!" (id 0)."""
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
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    })


def write_tokenizers(folder: Path, arch: str) -> None:
    """The tokenizer folders an architecture's pipeline reads: CLIP's vocabulary for every encoder;
    OpenCLIP's (SD2, SDXL's second) pads with "!"."""
    write_clip_tokenizer(Path(folder) / "tokenizer", pad_token="!" if arch == "sd2" else "<|endoftext|>")
    if arch == "sdxl":
        write_clip_tokenizer(Path(folder) / "tokenizer_2", pad_token="!")


# ---------------------------------------------------------------- the tiny models

def tiny_unet(arch: str = "sd1"):
    """SD1: conv projections, 4 levels; SD2: linear projections; SDXL: 3 levels (no attention in the
    first), 2 transformer layers deeper down, size/crop time ids and the pooled text embedding."""
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)
    if arch == "sdxl":
        return UNet2DConditionModel(
            **common, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 4, 4), cross_attention_dim=TEXT_WIDTH + SDXL_TEXT_WIDTH_2, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=SDXL_TEXT_WIDTH_2 + 6 * SDXL_TIME_EMBED,
        )
    return UNet2DConditionModel(
        **common, block_out_channels=TINY_WIDTHS, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4 if arch == "sd1" else (2, 2, 4, 4), use_linear_projection=arch == "sd2",
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=128,
        block_out_channels=TINY_WIDTHS, norm_num_groups=32, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def tiny_text_encoder(act: str = "quick_gelu", projection: bool = False, width: int = TEXT_WIDTH):
    """OpenAI CLIP-L (SD1, SDXL's first encoder) uses quick_gelu; OpenCLIP (SD2, SDXL's second,
    which also keeps its projection for the pooled embedding) uses gelu and pads with "!"."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if act == "gelu" else 49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


# ---------------------------------------------------------------- toy-shapes: pretrained, shipped

TOY_SHAPES_DIR = Path(__file__).parent / "weights" / "toy-shapes"
TOY_PARTS = ("unet", "vae", "text_encoder")
TOY_UNET_WIDTHS = (32, 64, 64, 64)
TOY_VAE_WIDTHS = (16, 16, 32, 64)
TOY_TEXT_WIDTH = 64
# One group: on flat colours, GroupNorm with a channel or two per group normalizes the colour away
# (a uniform region's channels all become the norm's bias); one group keeps their ratios.
TOY_NORM_GROUPS = 1


class ShippedWeightsError(RuntimeError):
    """The shipped toy-shapes files are missing or differ from their manifest."""


def toy_unet():
    """SD1's UNet topology for 8×8 latents (64 px images); 2 attention heads (diffusers calls the
    head count of SD1 UNets `attention_head_dim`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=TOY_UNET_WIDTHS,
        norm_num_groups=TOY_NORM_GROUPS, cross_attention_dim=TOY_TEXT_WIDTH, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def toy_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=64,
        block_out_channels=TOY_VAE_WIDTHS, norm_num_groups=TOY_NORM_GROUPS, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def toy_text_encoder():
    return tiny_text_encoder(width=TOY_TEXT_WIDTH)


def toy_shapes_manifest() -> dict:
    path = TOY_SHAPES_DIR / "manifest.json"
    if not path.is_file():
        raise ShippedWeightsError(f"{path} is missing: the toy-shapes weights are not installed "
                                  "(scripts/pretrain_toy_shapes.py writes them)")
    return json.loads(path.read_text())


def shipped_file(name: str) -> Path:
    """A toy-shapes file (e.g. "unet.safetensors"), after checking its sha256 against the manifest."""
    manifest, path = toy_shapes_manifest(), TOY_SHAPES_DIR / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise ShippedWeightsError(f"{name} is not in {TOY_SHAPES_DIR / 'manifest.json'}")
    found = store.file_sha256(path) if path.is_file() else "no file"
    if found != expected:
        raise ShippedWeightsError(
            f"{path}: sha256 {found}, but manifest.json says {expected}: the shipped toy-shapes weights were "
            "changed or damaged; reinstall lorabake, or rerun scripts/pretrain_toy_shapes.py to make new ones")
    return path


def load_shipped(part: str) -> torch.nn.Module:
    """A toy-shapes model from its shipped config and weights; stored as fp16, loaded as fp32."""
    from safetensors.torch import load_file

    config = json.loads(shipped_file(f"{part}.json").read_text())
    model = _toy_model_from_config(part, config)
    weights = load_file(shipped_file(f"{part}.safetensors"))
    model.load_state_dict({key: tensor.float() for key, tensor in weights.items()}, strict=True)
    return model.eval()


def _toy_model_from_config(part: str, config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if part == "text_encoder":
        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part].from_config(config)


@dataclass(frozen=True)
class TinySpec:
    arch: str
    prediction: str
    parts: tuple  # (folder, maker) in build order: each gets its own seed
    pipeline: str
    scheduler: dict


TINY = {
    "tiny-sd": TinySpec("sd1", "epsilon", (("unet", lambda: tiny_unet("sd1")), ("vae", tiny_vae),
                                           ("text_encoder", tiny_text_encoder)),
                        "StableDiffusionPipeline", SD1_NOISE_SCHEDULE),
    "tiny-sd2-v": TinySpec("sd2", "v_prediction", (("unet", lambda: tiny_unet("sd2")), ("vae", tiny_vae),
                                                   ("text_encoder", lambda: tiny_text_encoder("gelu"))),
                           "StableDiffusionPipeline", {**SD1_NOISE_SCHEDULE, "prediction_type": "v_prediction"}),
    "tiny-sdxl": TinySpec("sdxl", "epsilon", (("unet", lambda: tiny_unet("sdxl")), ("vae", lambda: tiny_vae(0.13025)),
                                              ("text_encoder", tiny_text_encoder),
                                              ("text_encoder_2", lambda: tiny_text_encoder("gelu", True, SDXL_TEXT_WIDTH_2))),
                          "StableDiffusionXLPipeline", SD1_NOISE_SCHEDULE),
    # pretrained: its "makers" load the shipped weights (checked against the manifest) instead
    "toy-shapes": TinySpec("sd1", "epsilon", tuple((part, lambda part=part: load_shipped(part)) for part in TOY_PARTS),
                           "StableDiffusionPipeline", SD1_NOISE_SCHEDULE),
}
COMPONENT_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                     "scheduler": ("diffusers", "DDPMScheduler"), "tokenizer": ("transformers", "CLIPTokenizer"),
                     "tokenizer_2": ("transformers", "CLIPTokenizer")}


def build_tiny(builtin: str, out_dir: Path) -> None:
    """Build a tiny model into `out_dir` (diffusers layout). Same torch version → same bytes.
    toy-shapes is not built but copied: its shipped fp16 weights are written out as fp32."""
    from diffusers import DDPMScheduler

    spec, out_dir = TINY[builtin], Path(out_dir)
    classes = dict(COMPONENT_CLASSES)
    for offset, (name, make) in enumerate(spec.parts):
        torch.manual_seed(TINY_SEED + offset)
        model = make()
        model.save_pretrained(out_dir / name, safe_serialization=True)
        classes[name] = (model.__module__.split(".")[0], type(model).__name__)
    DDPMScheduler(**spec.scheduler).save_pretrained(out_dir / "scheduler")
    write_tokenizers(out_dir, spec.arch)
    index = {"_class_name": spec.pipeline, "feature_extractor": [None, None]}
    if spec.arch != "sdxl":
        index |= {"safety_checker": [None, None], "requires_safety_checker": False}
    index |= {name: list(classes[name]) for name in sorted(classes) if (out_dir / name).exists()}
    store.write_json(out_dir / "model_index.json", index)


def build_base(builtin: str, out_dir: Path) -> str:
    """Build a base into `out_dir` (atomically, via a sibling temp folder) and return its id."""

    def build(tmp: Path) -> str:
        build_tiny(builtin, tmp)
        base_id = store.tree_sha256(tmp)[:16]
        record = {"id": base_id, "builtin": builtin, "architecture": TINY[builtin].arch,
                  "prediction": TINY[builtin].prediction}
        if builtin == "toy-shapes":  # which pretraining made the shipped weights
            manifest = toy_shapes_manifest()
            record["weights"] = {key: manifest[key] for key in ("script", "script_version", "seed", "files")}
        store.write_json(tmp / "base.json", record)
        return base_id

    return store.build_folder(out_dir, build)


# ---------------------------------------------------------------- loading a built base

@dataclass
class Base:
    id: str
    arch: str                            # sd1 | sd2 | sdxl
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None  # SDXL's OpenCLIP bigG (with projection)
    tokenizer_2: object = None

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def resolution(self) -> int:
        """The image side the base was made for: the UNet's latent size × the VAE's downscale."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def te(self):
        """The text encoder argument of networks and key names: one encoder, or SDXL's two as a list
        (named `lora_te1_…`, `lora_te2_…`)."""
        return self.text_encoders if self.text_encoder_2 is not None else self.text_encoder


def base_info(base_dir: Path) -> dict:
    return json.loads((Path(base_dir) / "base.json").read_text())


def base_id(base_dir: Path) -> str:
    return base_info(base_dir)["id"]


def load_base(base_dir: Path, parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> Base:
    """Load a base built by `build_base`, offline; parts not asked for are left as None. Asking for
    the text encoder of SDXL loads both."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base_dir = Path(base_dir)
    info = base_info(base_dir)
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    wanted = set(parts) | ({"text_encoder_2"} if "text_encoder" in parts else set())
    loaded = {name: loader.from_pretrained(base_dir / name).eval()
              if name in wanted and (base_dir / name).is_dir() else None for name, loader in loaders.items()}
    for module in loaded.values():
        if module is not None:
            module.requires_grad_(False)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base_dir / "tokenizer_2") if (base_dir / "tokenizer_2").is_dir() else None
    return Base(
        id=info["id"], arch=info.get("architecture", "sd1"),
        tokenizer=CLIPTokenizer.from_pretrained(base_dir / "tokenizer"), tokenizer_2=tokenizer_2,
        noise_scheduler=DDPMScheduler.from_pretrained(base_dir / "scheduler"),
        **loaded,
    )
