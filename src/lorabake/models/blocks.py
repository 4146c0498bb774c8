"""The 25-block vocabulary of the SD1 UNet: IN00–IN11, MID, OUT00–OUT11.

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

Names may be module paths (`down_blocks.0.attentions.0.proj_in`) or kohya names
(`lora_unet_down_blocks_0_attentions_0_proj_in`, with or without a `.lora_down.weight` suffix).
"""
from __future__ import annotations

import re

from lorabake.config import BLOCKS

LAYERS_PER_LEVEL = 3  # the original UNet's input/output blocks per resolution level
UNET_PREFIX = re.compile(r"^(?:lora_unet_)?")
UP_DOWN = re.compile(r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(?:_|$)")
WHOLE_BLOCKS = (
    (re.compile(r"mid_block(?:_|$)"), "MID"),
    (re.compile(r"conv_in(?:_|$)"), "IN00"),
    (re.compile(r"conv_(?:norm_)?out(?:_|$)"), "OUT11"),
)


def _unet_path(name: str) -> str | None:
    """A module path or kohya name as an underscored UNet path, or None if it names the text encoder."""
    flat = name.replace(".", "_")
    if flat.startswith("lora_") and not flat.startswith("lora_unet_"):
        return None
    return UNET_PREFIX.sub("", flat, count=1)


def _up_down_block(direction: str, level: int, kind: str, index: int) -> str:
    samplers = kind in ("downsamplers", "upsamplers")
    layer = LAYERS_PER_LEVEL * level + (LAYERS_PER_LEVEL - 1 if samplers else index)
    return f"IN{layer + 1:02d}" if direction == "down" else f"OUT{layer:02d}"


def block_of(name: str) -> str | None:
    """The block (one of config.BLOCKS) a UNet module belongs to; None outside the 25 blocks."""
    path = _unet_path(name)
    if path is None:
        return None
    match = UP_DOWN.match(path)
    if match:
        direction, level, kind, index = match.groups()
        block = _up_down_block(direction, int(level), kind, int(index))
        return block if block in BLOCKS else None
    return next((block for pattern, block in WHOLE_BLOCKS if pattern.match(path)), None)


def block_values(values: list[float] | None, default: float) -> dict[str, float]:
    """A 25-value list from the config as {block: value}; `default` everywhere when it is None."""
    if values is None:
        return dict.fromkeys(BLOCKS, default)
    return dict(zip(BLOCKS, values, strict=True))
