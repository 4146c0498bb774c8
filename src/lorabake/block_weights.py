"""LoRA block weights as the webui's lora-block-weight extension (LBW) writes them, and as kohya's merge
tools do: one multiplier per UNet block, and for LBW a first value, BASE, for the text encoder.

On SD1/SD2 (the 25 blocks IN00–IN11, MID, OUT00–OUT11) three list lengths are accepted:
- 17 values, LBW's form for LoRA: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11 (the blocks
  that hold attention layers; the others get 0, as LBW does);
- 26 values, LBW's form for LyCORIS: BASE, IN00–IN11, MID, OUT00–OUT11;
- 25 values, kohya's (merge `block_weights`): IN00–IN11, MID, OUT00–OUT11, the text encoder unweighted.

On SDXL (kohya's 23 blocks EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT; see models/blocks.py):
- 12 values, LBW's SDXL form for LoRA: BASE, IN04, IN05, IN07, IN08, M00, OUT00–OUT05 (the others get 0);
- 20 values, LBW's SDXL form for LyCORIS: BASE, IN00–IN08, M00, OUT00–OUT08;
- 23 values, kohya's SDXL order, the text encoder unweighted.
LBW's M00 is the whole middle block (MID00–MID02). LBW names neither the embeddings (EMB) nor the final
out layer (OUT), where kohya's LoRA puts no module: its lists leave them at 1.

Presets are LBW's own names (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5), 17 values each;
on SDXL only the uniform ones (NONE, ALL, ALL0.5) mean something, as 12 values.
Torch-free: the config check reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorabake.unet_blocks import BLOCKS, block_names

LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{i:02d}" for i in range(3, 12))
LBW26 = ("BASE",) + BLOCKS
LBW12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))
LBW20 = ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
LBW_NAMES = {"sd1": {17: LBW17, 26: LBW26}, "sdxl": {12: LBW12, 20: LBW20}}
UNNAMED_BY_LBW = ("EMB", "OUT")  # SDXL blocks no LBW list names: they keep weight 1
FORMS = {"sd1": "17 (LBW: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11), 25 (kohya: IN00–IN11, "
                "MID, OUT00–OUT11) or 26 (LBW LyCORIS: BASE, then the 25)",
         "sdxl": "12 (LBW: BASE, IN04, IN05, IN07, IN08, M00, OUT00–OUT05), 20 (LBW LyCORIS: BASE, IN00–IN08, "
                 "M00, OUT00–OUT08) or 23 (kohya: EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT)"}

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
    blocks: tuple[float, ...]  # in the order of `names`
    names: tuple[str, ...] = BLOCKS  # the architecture's vocabulary (config.block_names)

    @property
    def is_identity(self) -> bool:
        return self.text_encoder == 1.0 and all(w == 1.0 for w in self.blocks)

    def of(self, block: str) -> float:
        return self.blocks[self.names.index(block)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.blocks))


def resolve(value: str | list[float] | tuple[float, ...], arch: str = "sd1") -> BlockWeights:
    """A preset name or a list of one of the architecture's lengths (see the module's docstring);
    ValueError naming what is accepted otherwise."""
    family = "sdxl" if arch == "sdxl" else "sd1"
    if isinstance(value, str):
        value = _preset(value, family)
    values, names = [float(v) for v in value], block_names(family)
    if len(values) == len(names):
        return BlockWeights(1.0, tuple(values), names)
    lbw = LBW_NAMES[family].get(len(values))
    if lbw is None:
        raise ValueError(f"block weights on {'SDXL' if family == 'sdxl' else 'SD1/SD2'} need {FORMS[family]} "
                         f"values, got {len(values)}")
    given = dict(zip(lbw, values))
    if family == "sdxl":
        given |= {f"MID{i:02d}": given["M00"] for i in range(3)} | dict.fromkeys(UNNAMED_BY_LBW, 1.0)
    return BlockWeights(given["BASE"], tuple(given.get(block, 0.0) for block in names), names)


def _preset(value: str, family: str) -> tuple[float, ...]:
    key = value.strip().upper()
    if key not in PRESETS:
        raise ValueError(f"unknown block-weight preset {value!r}; give one of {', '.join(PRESETS)} "
                         f"or a list of {FORMS[family]} numbers")
    values = PRESETS[key]
    if family == "sd1":
        return values
    if len(set(values)) > 1:
        raise ValueError(f"block-weight preset {key} names SD1 blocks; on SDXL only NONE, ALL and ALL0.5 apply: "
                         f"give a list of {FORMS['sdxl']} numbers")
    return values[:1] * len(LBW12)


def check(value: str | list[float], arch: str = "") -> None:
    """ValueError unless `value` resolves on `arch` (or, with arch unknown, on some architecture)."""
    if arch or isinstance(value, str):
        resolve(value, arch or "sd1")
        return
    lengths = {len(block_names(family)) for family in LBW_NAMES} | {n for forms in LBW_NAMES.values() for n in forms}
    if len(value) not in lengths:
        raise ValueError(f"block weights need, on SD1/SD2, {FORMS['sd1']} values; on SDXL, {FORMS['sdxl']}; "
                         f"got {len(value)}")


def label(value: str | list[float]) -> str:
    """How a grid names the setting: the preset's name, or the values."""
    return value.strip().upper() if isinstance(value, str) else ",".join(f"{float(v):g}" for v in value)
