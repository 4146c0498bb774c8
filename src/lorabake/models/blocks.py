"""The UNet's block vocabularies: SD1/SD2's 25 (IN00–IN11, MID, OUT00–OUT11) and SDXL's 23 (EMB,
IN00–IN08, MID00–MID02, OUT00–OUT08, OUT).

Block-wise options (block_dims, block_alphas, block_lr_weights) name the layers of the *original*
Stable Diffusion UNet: its twelve `input_blocks`, the `middle_block` and its twelve `output_blocks`.
diffusers regroups those layers into four down blocks of (2 resnets + 2 attentions + 1 downsampler)
and four up blocks of (3 resnets + 3 attentions + 1 upsampler); kohya's `get_block_index`
(sd-scripts networks/lora.py) maps them back:

- `down_blocks.{i}.{resnets,attentions}.{j}` → IN(3i + j + 1); `down_blocks.{i}.downsamplers` → IN(3i + 3)
- `mid_block` → MID
- `up_blocks.{i}.{resnets,attentions}.{j}` → OUT(3i + j); `up_blocks.{i}.upsamplers` → OUT(3i + 2),
  the last layer of that up block, where the original UNet keeps its upsampling conv.

kohya's SD1 LoRA never trains the layers outside these groups; we still give them the block the
original UNet puts them in, as kohya's SDXL vocabulary does for its first and last block: `conv_in` is
`input_blocks.0` (IN00), `conv_norm_out`/`conv_out` finish the output (OUT11). The time embedding and
the text encoder belong to no block (None).

SDXL's UNet has three levels, so the same formulas give its nine input blocks (IN00 is conv_in, IN03
and IN06 the downsamplers) and nine output blocks (OUT02 and OUT05 end with the upsamplers). Its
vocabulary is kohya's (sd-scripts networks/lora.py `get_block_index` for SDXL, sdxl_train's --block_lr):
the time and label (size/pooled-text) embeddings are EMB, the middle block is split into its three
layers, MID00 (resnet), MID01 (attention), MID02 (resnet), and the final norm and conv are OUT. SDXL
file names use the original UNet's paths (`input_blocks_4_1_…`), which are read the same way.

Names may be module paths (`down_blocks.0.attentions.0.proj_in`) or kohya names
(`lora_unet_down_blocks_0_attentions_0_proj_in`, with or without a `.lora_down.weight` suffix).
"""
from __future__ import annotations

import re

from lorabake.unet_blocks import BLOCKS, SDXL_BLOCKS, block_names

LAYERS_PER_LEVEL = 3  # the original UNet's input/output blocks per resolution level
UNET_PREFIX = re.compile(r"^(?:lora_unet_)?")
UP_DOWN = re.compile(r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(?:_|$)")


def _whole(table: dict[str, str]) -> tuple[tuple[re.Pattern, str], ...]:
    """Layers that fall in one block as a whole: (a name pattern, then `_` or the end) → block."""
    return tuple((re.compile(rf"(?:{pattern})(?:_|$)"), block) for pattern, block in table.items())


WHOLE_BLOCKS = _whole({"mid_block": "MID", "conv_in": "IN00", r"conv_(?:norm_)?out": "OUT11"})


def _unet_path(name: str) -> str | None:
    """A module path or kohya name as an underscored UNet path, or None if it names the text encoder."""
    flat = name.replace(".", "_")
    if flat.startswith("lora_") and not flat.startswith("lora_unet_"):
        return None
    return UNET_PREFIX.sub("", flat, count=1)


def _up_down_block(path: str) -> str | None:
    """IN/OUT of a down or up block's layer (any number: the caller checks it exists), else None."""
    match = UP_DOWN.match(path)
    if not match:
        return None
    direction, level, kind, index = match.groups()
    samplers = kind in ("downsamplers", "upsamplers")
    layer = LAYERS_PER_LEVEL * int(level) + (LAYERS_PER_LEVEL - 1 if samplers else int(index))
    return f"IN{layer + 1:02d}" if direction == "down" else f"OUT{layer:02d}"


SDXL_MIDDLE = re.compile(r"mid_block_(resnets|attentions)_(\d+)(?:_|$)")
SDXL_ORIGINAL = re.compile(r"(input_blocks|middle_block|output_blocks)_(\d+)(?:_|$)")
SDXL_WHOLE = _whole({"time_embedding|add_embedding|time_embed|label_emb": "EMB", "conv_in": "IN00",
                     r"conv_norm_out|conv_out|out_\d+": "OUT"})
ORIGINAL_BLOCK = {"input_blocks": "IN", "middle_block": "MID", "output_blocks": "OUT"}


def block_of(name: str, arch: str = "sd1") -> str | None:
    """The block (one of config.block_names(arch)) a UNet module belongs to; None outside them."""
    path = _unet_path(name)
    if path is None:
        return None
    if arch == "sdxl":
        return _sdxl_block(path)
    block = _up_down_block(path)
    if block is not None:
        return block if block in BLOCKS else None
    return next((block for pattern, block in WHOLE_BLOCKS if pattern.match(path)), None)


def _sdxl_block(path: str) -> str | None:
    block = _up_down_block(path) or _sdxl_named_block(path)
    return block if block in SDXL_BLOCKS else None


def _sdxl_named_block(path: str) -> str | None:
    """The block of a middle-block layer, an original-UNet path or a layer outside the levels."""
    if match := SDXL_MIDDLE.match(path):  # resnet 0, attention 0, resnet 1 → middle_block.0, .1, .2
        kind, index = match.groups()
        return "MID01" if kind == "attentions" else f"MID{2 * int(index):02d}"
    if match := SDXL_ORIGINAL.match(path):
        group, index = match.groups()
        return f"{ORIGINAL_BLOCK[group]}{int(index):02d}"
    return next((block for pattern, block in SDXL_WHOLE if pattern.match(path)), None)


def block_values(values: list[float] | None, default: float, arch: str = "sd1") -> dict[str, float]:
    """A per-block list from the config as {block: value} in the architecture's vocabulary; `default`
    everywhere when it is None."""
    names = block_names(arch)
    if values is None:
        return dict.fromkeys(names, default)
    return dict(zip(names, values, strict=True))
