"""The original single-file Stable Diffusion layout, written from the diffusers models we train.

A1111, ComfyUI, Forge and kohya load checkpoints in the layout of the original repositories
(CompVis/Stability `ldm` for SD1/SD2, `sgm` for SDXL): one flat state dict whose key prefix says which
model a tensor belongs to —

    model.diffusion_model.…                      the UNet (`input_blocks`, `middle_block`, `output_blocks`)
    first_stage_model.…                          the VAE (`encoder.down.0.block.1…`)
    cond_stage_model.transformer.text_model.…    SD1: OpenAI CLIP-L, in transformers' own layout
    cond_stage_model.model.…                     SD2: OpenCLIP ViT-H (`transformer.resblocks.N…`)
    conditioner.embedders.0.transformer.text_model.…   SDXL: CLIP-L
    conditioner.embedders.1.model.…              SDXL: OpenCLIP bigG, with its projection

Everything here is renaming (plus a reshape, a transpose and a fused q/k/v), so the converters are tables
of module paths: the longest diffusers path prefix found in a table gives the original prefix, and an
optional inner table renames the first components below it. Block numbers are counted from the
module paths themselves (resnets per level, attentions or not, samplers), so any widths and any
layers_per_block read right. Names were checked against diffusers'
own reader (`diffusers/loaders/single_file_utils.py`, `convert_ldm_unet_checkpoint` & co.), which the
tests use to load our files back, and against kohya's writers (sd-scripts `library/model_util.py`,
`library/sdxl_model_util.py`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from lorabake.models import keys

# The encoders' prefixes per architecture, in the order `to_single_file` takes the encoders.
TEXT_ENCODER_PREFIXES = {arch: tuple(prefixes.values()) for arch, prefixes in keys.TEXT_ENCODER_PREFIXES.items()}
ARCHITECTURES = tuple(TEXT_ENCODER_PREFIXES)

# SD2 conditions on OpenCLIP ViT-H's penultimate layer, so diffusers ships 23 of its 24 layers. Both
# diffusers (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and kohya (`convert_ldm_clip_checkpoint_v2`) drop
# `resblocks.23` *by that name* when they read, and kohya writes a copy of layer 22 there
# (`convert_text_encoder_state_dict_to_sd_v2(make_dummy_weights=True)`), so files have the full 24.
SD2_KEPT_LAYERS = 23
# OpenCLIP clamps its learned temperature at 100 (open_clip `CLIP.forward`), where trained models sit.
# No text-to-image loader reads it; it is written so the OpenCLIP state dict is complete.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)


# ---------------------------------------------------------------- path tables

@dataclass(frozen=True)
class Renamed:
    """Where a diffusers module lives in the original model. `inner` renames the first components of
    paths below it (its keys may span several components, "to_out.0"); None keeps them as they are."""
    original: str
    inner: Mapping[str, str] | None = None

    def below(self, rest: list[str]) -> str | None:
        if not rest:
            return self.original
        if self.inner is None:
            return ".".join([self.original, *rest])
        for old, new in self.inner.items():
            old_parts = old.split(".")
            if rest[: len(old_parts)] == old_parts:
                return ".".join([self.original, new, *rest[len(old_parts):]])
        return None


def _translate(path: str, table: Mapping[str, Renamed]) -> str | None:
    """The original path of a diffusers module path: its longest prefix in `table`, renamed."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is not None:
            return entry.below(parts[cut:])
    return None


def _translate_state(state: Mapping[str, torch.Tensor], table: Mapping[str, Renamed], what: str) -> dict:
    """Rename every key of a state dict (module path + parameter name); a key the table does not
    place is an error rather than a tensor silently left out of the file."""
    renamed = {}
    for key, tensor in state.items():
        module_path, _, parameter = key.rpartition(".")
        original = _translate(module_path, table)
        if original is None:
            raise KeyError(f"{what} weight {key!r} has no place in the original single-file layout; "
                           f"is this a {what} of a Stable Diffusion 1/2/XL topology?")
        renamed[f"{original}.{parameter}"] = tensor
    return renamed


@dataclass(frozen=True)
class Level:
    """One resolution level of a diffusers UNet/VAE half, read off its module paths."""
    index: int
    layers: int              # resnets in the level
    attentions: bool
    sampler: bool


def _levels(paths: Iterable[str], blocks: str, sampler: str) -> list[Level]:
    """The levels under `blocks` ("down_blocks", "decoder.up_blocks", …), counted from the paths
    themselves, so any layers_per_block (int or per level) reads right."""
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.(resnets|attentions|{sampler})\.(\d+)(?:\.|$)")
    found: dict[int, dict[str, set[int]]] = {}
    for path in paths:
        match = pattern.match(path)
        if match:
            level, kind, index = match.groups()
            found.setdefault(int(level), {}).setdefault(kind, set()).add(int(index))
    return [Level(level, len(kinds.get("resnets", ())), "attentions" in kinds, sampler in kinds)
            for level, kinds in sorted(found.items())]


# ---------------------------------------------------------------- the UNet

# ldm's ResBlock: in_layers = (norm, SiLU, conv), emb_layers = (SiLU, linear),
# out_layers = (norm, SiLU, dropout, conv), skip_connection. diffusers' shared `nonlinearity` has no
# single counterpart; it holds no weights.
UNET_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "dropout": "out_layers.2", "conv2": "out_layers.3",
                     "conv_shortcut": "skip_connection"}
# time_embed / label_emb[0] are Sequential(linear, SiLU, linear).
EMBEDDING_INNER = {"linear_1": "0", "act": "1", "linear_2": "2"}
UNET_TOP_LEVEL = {
    "conv_in": Renamed("input_blocks.0.0"),
    "time_embedding": Renamed("time_embed", EMBEDDING_INNER),
    "add_embedding": Renamed("label_emb.0", EMBEDDING_INNER),  # SDXL's size/crop + pooled-text embedding
    "conv_norm_out": Renamed("out.0"),
    "conv_act": Renamed("out.1"),
    "conv_out": Renamed("out.2"),
}


def _input_blocks(levels: list[Level]) -> dict[str, Renamed]:
    """input_blocks.0 is conv_in; then each layer of a level is one input block (resnet at .0,
    attention at .1), and a level's downsampler is an input block of its own (`.0.op`)."""
    table, block = {}, 1
    for level in levels:
        for layer in range(level.layers):
            table[f"down_blocks.{level.index}.resnets.{layer}"] = Renamed(f"input_blocks.{block}.0", UNET_RESNET_INNER)
            if level.attentions:
                table[f"down_blocks.{level.index}.attentions.{layer}"] = Renamed(f"input_blocks.{block}.1")
            block += 1
        if level.sampler:
            table[f"down_blocks.{level.index}.downsamplers.0"] = Renamed(f"input_blocks.{block}.0", {"conv": "op"})
            block += 1
    return table


def _output_blocks(levels: list[Level]) -> dict[str, Renamed]:
    """Each layer of an up level is one output block (resnet .0, attention .1); the upsampler sits in
    the level's last output block, after the attention if there is one (`.2.conv`, else `.1.conv`)."""
    table, block = {}, 0
    for level in levels:
        for layer in range(level.layers):
            table[f"up_blocks.{level.index}.resnets.{layer}"] = Renamed(f"output_blocks.{block}.0", UNET_RESNET_INNER)
            if level.attentions:
                table[f"up_blocks.{level.index}.attentions.{layer}"] = Renamed(f"output_blocks.{block}.1")
            block += 1
        if level.sampler:
            slot = 2 if level.attentions else 1
            table[f"up_blocks.{level.index}.upsamplers.0"] = Renamed(f"output_blocks.{block - 1}.{slot}")
    return table


MID_BLOCK_PART = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.|$)")


def _middle_block(paths: Iterable[str]) -> dict[str, Renamed]:
    """middle_block interleaves resnets and attentions: (resnet, attention, resnet)."""
    parts = set()
    for path in paths:
        match = MID_BLOCK_PART.match(path)
        if match:
            parts.add((match[1], int(match[2])))
    interleaved = any(kind == "attentions" for kind, _ in parts)
    table = {}
    for kind, index in parts:
        if kind == "attentions":
            table[f"mid_block.attentions.{index}"] = Renamed(f"middle_block.{2 * index + 1}")
        else:
            position = 2 * index if interleaved else index
            table[f"mid_block.resnets.{index}"] = Renamed(f"middle_block.{position}", UNET_RESNET_INNER)
    return table


def _unet_table(paths: Iterable[str]) -> dict[str, Renamed]:
    """Diffusers module prefix → original prefix for the UNet whose module paths are `paths`.
    Transformer blocks keep their inner names (norm, proj_in, transformer_blocks.N.attn1.to_q, …)."""
    paths = list(paths)
    down = _levels(paths, "down_blocks", "downsamplers")
    up = _levels(paths, "up_blocks", "upsamplers")
    return {**UNET_TOP_LEVEL, **_input_blocks(down), **_middle_block(paths), **_output_blocks(up)}


def unet_original_names(unet: torch.nn.Module) -> dict[str, str]:
    """{diffusers module path: original ldm/sgm module path} for every submodule of a diffusers
    `UNet2DConditionModel` that has a counterpart, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.
    attn1.to_q` → `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (SDXL). Weightless modules with no
    counterpart (containers such as `down_blocks`, activations, `time_proj`) are left out; a module
    holding weights without one is an error."""
    named = dict(unet.named_modules())
    table = _unet_table(named)
    names = {}
    for path, module in named.items():
        original = _translate(path, table) if path else None
        if original is not None:
            names[path] = original
        elif any(True for _ in module.parameters(recurse=False)):
            raise KeyError(f"UNet module {path!r} ({type(module).__name__}) has no place in the original "
                           "Stable Diffusion UNet; this topology cannot be written as a single file")
    return names


def unet_to_original(unet_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole diffusers UNet state dict under the original UNet's names (no `model.diffusion_model.`
    prefix). Shapes are kept: SD1's 1×1-conv and SD2/SDXL's linear transformer projections are both
    what the original models use."""
    table = _unet_table(key.rpartition(".")[0] for key in unet_state)
    return _translate_state(unet_state, table, "UNet")


# ---------------------------------------------------------------- the VAE

VAE_RESNET_INNER = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "dropout": "dropout", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_INNER = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# ldm's AttnBlock computes q, k, v and the output projection with 1×1 convs; diffusers uses linears.
VAE_CONV_ATTENTION = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _vae_table(paths: Iterable[str]) -> dict[str, Renamed]:
    """Diffusers → ldm prefixes of an AutoencoderKL. The decoder's up levels are numbered from the
    lowest resolution in diffusers and from the highest in ldm (`up.{n-1-i}`)."""
    paths = list(paths)
    table = {name: Renamed(name) for name in ("quant_conv", "post_quant_conv")}
    for half in ("encoder", "decoder"):
        table |= {f"{half}.conv_in": Renamed(f"{half}.conv_in"), f"{half}.conv_out": Renamed(f"{half}.conv_out"),
                  f"{half}.conv_norm_out": Renamed(f"{half}.norm_out"),
                  f"{half}.mid_block.attentions.0": Renamed(f"{half}.mid.attn_1", VAE_ATTENTION_INNER)}
        for index in range(2):
            table[f"{half}.mid_block.resnets.{index}"] = Renamed(f"{half}.mid.block_{index + 1}", VAE_RESNET_INNER)
    for level in _levels(paths, "encoder.down_blocks", "downsamplers"):
        table |= _vae_level(f"encoder.down_blocks.{level.index}", f"encoder.down.{level.index}", level,
                            ("downsamplers.0", "downsample"))
    up = _levels(paths, "decoder.up_blocks", "upsamplers")
    for level in up:
        original = f"decoder.up.{len(up) - 1 - level.index}"
        table |= _vae_level(f"decoder.up_blocks.{level.index}", original, level, ("upsamplers.0", "upsample"))
    return table


def _vae_level(diffusers: str, original: str, level: Level, sampler: tuple[str, str]) -> dict[str, Renamed]:
    """One VAE level: `resnets.j` → `block.j`, and its sampler (diffusers name, ldm name)."""
    table = {f"{diffusers}.resnets.{layer}": Renamed(f"{original}.block.{layer}", VAE_RESNET_INNER)
             for layer in range(level.layers)}
    if level.sampler:
        table[f"{diffusers}.{sampler[0]}"] = Renamed(f"{original}.{sampler[1]}")
    return table


def vae_to_original(vae_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole diffusers AutoencoderKL state dict under ldm's names (no `first_stage_model.`)."""
    renamed = _translate_state(vae_state, _vae_table(key.rpartition(".")[0] for key in vae_state), "VAE")
    return {key: tensor[:, :, None, None] if VAE_CONV_ATTENTION.match(key) and tensor.ndim == 2 else tensor
            for key, tensor in renamed.items()}


# ---------------------------------------------------------------- the text encoders

HF_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
# transformers keeps position_ids as a non-persistent buffer now; older files carried it and newer
# transformers refuse it as unexpected (kohya deletes it when it reads), so it is never written.
POSITION_IDS = "embeddings.position_ids"


def _without_text_model(te_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF CLIP text state dict in one layout whether it came with the `text_model.` level
    (transformers < 5, CLIPTextModelWithProjection) or without it (transformers 5 CLIPTextModel)."""
    return {key.removeprefix("text_model."): tensor for key, tensor in te_state.items()
            if key.removeprefix("text_model.") != POSITION_IDS}


def clip_to_original(te_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L (SD1, SDXL's first encoder): the original keeps transformers' own CLIPTextModel,
    so keys only regain the `text_model.` level (prefix `cond_stage_model.transformer.` goes on top)."""
    flat = _without_text_model(te_state)
    strays = [key for key in flat if not key.startswith(HF_TEXT_MODEL_PARTS)]
    if strays:
        raise KeyError(f"CLIP text encoder keys {strays[:3]} have no place in the original layout (it keeps no "
                       "projection for this encoder); pass the CLIPTextModel, not a model with projection")
    return {f"text_model.{key}": tensor for key, tensor in flat.items()}


OPEN_CLIP_NAMES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^final_layer_norm\.(weight|bias)$", r"ln_final.\1"),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$", r"transformer.resblocks.\1.ln_\2.\3"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.out_proj.\2"),
))
QKV_PROJECTION = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
HF_PROJECTION = "text_projection.weight"


def _open_clip_name(key: str) -> str:
    for pattern, replacement in OPEN_CLIP_NAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise KeyError(f"OpenCLIP text encoder key {key!r} has no place in the original layout")


def _fused_attention(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's nn.MultiheadAttention keeps q, k, v as one `in_proj` matrix, stacked in that order."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        match = QKV_PROJECTION.match(key)
        if match:
            layer, which, kind = match.groups()
            parts.setdefault((layer, kind), {})[which] = tensor
    fused = {}
    for (layer, kind), qkv in parts.items():
        missing = sorted({"q", "k", "v"} - set(qkv))
        if missing:
            raise KeyError(f"OpenCLIP text encoder layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        fused[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return fused


def _pad_sd2_last_layer(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give an SD2 encoder back the 24th layer diffusers dropped, as a copy of the 23rd — what kohya
    writes. Only at SD2's real depth: readers drop `resblocks.23` by name; at any other depth there is
    no 24-layer model to complete, and a reader counting layers from the keys would take the copy
    for a real layer."""
    last, dummy = f"transformer.resblocks.{SD2_KEPT_LAYERS - 1}.", f"transformer.resblocks.{SD2_KEPT_LAYERS}."
    copies = {dummy + key.removeprefix(last): tensor.clone()  # a clone: safetensors refuses shared storage
              for key, tensor in original.items() if key.startswith(last)}
    return original | copies


def open_clip_to_original(te_state: Mapping[str, torch.Tensor], projection: bool) -> dict[str, torch.Tensor]:
    """An HF-layout OpenCLIP text encoder (SD2's ViT-H: `projection=False`; SDXL's bigG, a
    CLIPTextModelWithProjection: `projection=True`) under OpenCLIP's own keys.

    `text_projection` is used as `x @ text_projection` by OpenCLIP and as a Linear (`x @ W.T`) by
    transformers, so it is written transposed — as diffusers' reader expects. SD2 never uses it; it
    gets an identity of the right width there (kohya writes ones), and, at SD2's real depth, the
    dropped last layer back (see `_pad_sd2_last_layer`)."""
    flat = _without_text_model(te_state)
    hf_projection = flat.pop(HF_PROJECTION, None)
    if projection and hf_projection is None:
        raise KeyError(f"OpenCLIP text encoder has no {HF_PROJECTION!r}; SDXL's second encoder must be a "
                       "CLIPTextModelWithProjection")
    if not projection and hf_projection is not None:
        raise ValueError(f"OpenCLIP text encoder carries {HF_PROJECTION!r}; write it with projection=True")
    original = _fused_attention(flat)
    original |= {_open_clip_name(key): tensor for key, tensor in flat.items() if not QKV_PROJECTION.match(key)}
    width = original["ln_final.weight"].shape[0]
    if projection:
        original["text_projection"] = hf_projection.T.contiguous()
    else:
        original["text_projection"] = torch.eye(width, dtype=original["ln_final.weight"].dtype)
        layers = {key.split(".")[2] for key in original if key.startswith("transformer.resblocks.")}
        if len(layers) == SD2_KEPT_LAYERS:
            original = _pad_sd2_last_layer(original)
    original["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=original["ln_final.weight"].dtype)
    return original


# ---------------------------------------------------------------- the whole checkpoint

TEXT_ENCODER_CONVERTERS = {
    "sd1": (clip_to_original,),
    "sd2": (partial(open_clip_to_original, projection=False),),
    "sdxl": (clip_to_original, partial(open_clip_to_original, projection=True)),
}


def _state(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def to_single_file(arch: str, unet: torch.nn.Module | Mapping[str, torch.Tensor],
                   vae: torch.nn.Module | Mapping[str, torch.Tensor],
                   text_encoders: list[torch.nn.Module | Mapping[str, torch.Tensor]],
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole single-file checkpoint of `arch` ("sd1", "sd2", "sdxl") as {key: CPU tensor}, ready for
    `safetensors.torch.save_file`. Each model may be a diffusers/transformers module or its state
    dict (diffusers layout); `text_encoders` in pipeline order (SDXL: [CLIP-L, OpenCLIP bigG with
    projection]). `dtype` casts floating tensors (e.g. torch.float16 for a smaller file)."""
    if arch not in TEXT_ENCODER_CONVERTERS:
        raise ValueError(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    converters = TEXT_ENCODER_CONVERTERS[arch]
    if len(text_encoders) != len(converters):
        raise ValueError(f"{arch} has {len(converters)} text encoder(s); got {len(text_encoders)}")
    parts = [(keys.UNET, unet_to_original(_state(unet))), (keys.VAE, vae_to_original(_state(vae)))]
    parts += [(prefix, convert(_state(encoder)))
              for prefix, convert, encoder in zip(TEXT_ENCODER_PREFIXES[arch], converters, text_encoders)]
    checkpoint = {}
    for prefix, part in parts:
        for key, tensor in part.items():
            tensor = tensor.detach().to("cpu")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            checkpoint[prefix + key] = tensor.contiguous()
    return checkpoint
