"""LoRA block weights as the webui's lora-block-weight extension (LBW) writes them, and as kohya's merge
tools do: one multiplier per UNet block, and for LBW a first value, BASE, for the text encoder.

Three list lengths are accepted:
- 17 values, LBW's form for LoRA: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11 (the blocks
  that hold attention layers; the others get 0, as LBW does);
- 26 values, LBW's form for LyCORIS: BASE, IN00–IN11, MID, OUT00–OUT11;
- 25 values, kohya's (merge `block_weights`): IN00–IN11, MID, OUT00–OUT11, the text encoder unweighted.

Presets are LBW's own names (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5), 17 values each.
Torch-free: the config check reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabake.config import BLOCKS

LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{i:02d}" for i in range(3, 12))
LBW26 = ("BASE",) + BLOCKS

PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}


@dataclass(frozen=True)
class BlockWeights:
    """A block-weight setting resolved: the text encoder's factor and one factor per block of BLOCKS."""

    text_encoder: float
    blocks: tuple[float, ...]  # in the order of config.BLOCKS

    @property
    def is_identity(self) -> bool:
        return self.text_encoder == 1.0 and all(w == 1.0 for w in self.blocks)

    def of(self, block: str) -> float:
        return self.blocks[BLOCKS.index(block)]


def resolve(value: str | list[float] | tuple[float, ...]) -> BlockWeights:
    """A preset name or a 17-, 25- or 26-value list; ValueError naming what is accepted otherwise."""
    if isinstance(value, str):
        key = value.strip().upper()
        if key not in PRESETS:
            raise ValueError(f"unknown block-weight preset {value!r}; give one of {', '.join(PRESETS)} "
                             "or a list of 17 (LBW), 25 (kohya) or 26 (LBW LyCORIS) numbers")
        value = PRESETS[key]
    values = [float(v) for v in value]
    if len(values) == len(BLOCKS):
        return BlockWeights(1.0, tuple(values))
    names = {len(LBW17): LBW17, len(LBW26): LBW26}.get(len(values))
    if names is None:
        raise ValueError(f"block weights need 17 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11), "
                         f"25 (IN00–IN11, MID, OUT00–OUT11) or 26 (BASE, then the 25) values, got {len(values)}")
    given = dict(zip(names, values))
    return BlockWeights(given["BASE"], tuple(given.get(block, 0.0) for block in BLOCKS))


def label(value: str | list[float]) -> str:
    """How a grid names the setting: the preset's name, or the values."""
    return value.strip().upper() if isinstance(value, str) else ",".join(f"{float(v):g}" for v in value)
