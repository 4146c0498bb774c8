"""The UNet's block vocabularies, by architecture, as kohya and LBW number them (see models/blocks.py
for which layer falls in which): the names, and the checks a per-block list of the config gets.

Torch-free, on the bottom floor with lorabake.config, which validates per-block lists with it.
"""
from __future__ import annotations

# The UNet's blocks, as the original (CompVis / sgm) UNet numbers them. SD1/SD2: 12 input blocks, the
# middle block, 12 output blocks (kohya's and LBW's 25). SDXL: kohya's 23 of sdxl_train's --block_lr and
# its LoRA's block_dims: the time/label embedding, 9 input blocks, the middle block's 3 parts, 9 output
# blocks and the final norm/conv (`out`). See models/blocks.py for which layer falls in which.
BLOCKS = tuple([f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)])
SDXL_BLOCKS = tuple(["EMB"] + [f"IN{i:02d}" for i in range(9)] + [f"MID{i:02d}" for i in range(3)]
                    + [f"OUT{i:02d}" for i in range(9)] + ["OUT"])
VOCABULARIES = {"sd1/sd2": ("IN00–IN11, MID, OUT00–OUT11", BLOCKS),
                "sdxl": ("EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT", SDXL_BLOCKS)}


def block_names(arch: str) -> tuple[str, ...]:
    """The block vocabulary of an architecture (sd1, sd2 or sdxl)."""
    return SDXL_BLOCKS if arch == "sdxl" else BLOCKS


def vocabulary_of(values: list[float]) -> str | None:
    """Which vocabulary ("sd1/sd2" or "sdxl") a per-block list's length is, or None."""
    return next((name for name, (_, names) in VOCABULARIES.items() if len(values) == len(names)), None)


def _per_block(values: list[float] | None, key: str) -> list[float] | None:
    if values is not None and vocabulary_of(values) is None:
        raise ValueError(f"{key} needs {len(BLOCKS)} values on SD1/SD2 ({VOCABULARIES['sd1/sd2'][0]}) or "
                         f"{len(SDXL_BLOCKS)} on SDXL ({VOCABULARIES['sdxl'][0]}, kohya's order), got {len(values)}")
    return values


def block_list_problem(values: list[float] | None, key: str, arch: str) -> str | None:
    """A per-block list whose length is the other architecture's vocabulary, said with what to give."""
    if values is None or not arch:
        return None
    wanted = "sdxl" if arch == "sdxl" else "sd1/sd2"
    given = vocabulary_of(values)
    if given in (None, wanted):
        return None
    words, names = VOCABULARIES[wanted]
    return (f"{key} has {len(values)} values, the {given.upper()} block vocabulary; an {arch.upper()} base has "
            f"{len(names)} blocks: give {len(names)} values ({words})")
