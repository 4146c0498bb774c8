"""The config's building blocks: `Strict` models, `option` fields with the text docs/options.md prints,
and the bounds past any real setting (about ten times the largest of the SDXL era), each with its
reason in the error: they refuse typos and absurd values before any job, where the code would
otherwise hang, overflow, or fail at save after hours of training.

Below lorabake.config, on the bottom floor: no torch, nothing of lorabake but names, buckets and prompts.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from lorabake import names
from lorabake.data.buckets import MAX_SIDE
from lorabake.prompts import Prompt

# A config name that becomes part of a path under results/ (a key of bases or datasets, a merge's
# name, …): refused while the config is read, before anything is written.
Name = Annotated[str, AfterValidator(names.safe_name)]


# ---------------------------------------------------------------- bounds
# Each is about ten times the largest real setting; the reason is part of the error message.
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000
STEPS_WHY = ("the largest fine-tunes run about a million steps, and 10 million steps at 10 steps/s "
             "are 12 days on one GPU")
MAX_RANK = 10_240
RANK_WHY = ("no SD1, SD2 or SDXL weight has more than 10,240 rows or columns (the UNet's feed-forward), "
            "so a larger rank adds nothing")
MAX_BATCH = 1024
MAX_PROCESSES = 1024
PROCESSES_WHY = "lorabake starts them on one machine, and the largest have 8 to 16 GPUs or a few hundred cores"
MAX_SEED = 2**32 - 1
SEED_WHY = ("seeds are 0 to 2^32 - 1, as in kohya (numpy's seed) and A1111; torch overflows past 2^64 "
            "and maps a negative seed onto a positive one")
SIDE_WHY = f"{MAX_SIDE} px is 8x SDXL's 1024 (a 1024x1024 latent), far past any real run or render"
SIDE_BOUND = {"least": 64, "most": MAX_SIDE, "why": f"sides are 64 px (8 latent pixels) or more; {SIDE_WHY}"}
# What a sample prompt is parsed against when the config is checked: the options it sets itself are then
# the only values that can be out of bounds.
PROMPT_CHECK_DEFAULTS = Prompt("", "", 512, 512, 0, 7.5, 20)


def check_bounds(value: Any, bound: dict[str, Any]) -> Any:
    """`value` (a number, or each number of a list or pair) within bound's least..most, else a
    ValueError that says the bound and why."""
    least = -math.inf if bound["least"] is None else bound["least"]
    for number in value if isinstance(value, (list, tuple)) else (value,):
        if number is None or least <= number <= bound["most"]:
            continue
        problem = ("not a number" if math.isnan(number) else
                   f"less than {_number(least)}, the least lorabake accepts" if number < least else
                   f"more than {_number(bound['most'])}, the most lorabake accepts")
        raise ValueError(f"{_number(number)} is {problem}: {bound['why']}")
    return value


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) < 10**15 else f"{value:.3g}"


def option(default: Any, description: str, kohya: str | None = None, *, most: float | None = None,
           why: str = "", least: float | None = None, **constraints: Any) -> Any:
    """A config field with the text the option reference (docs/options.md) prints for it. With
    `most`, values outside least..most are refused with `why` (Strict._within_bounds); pydantic's own
    `ge`/`gt` constraints keep the ordinary lower bounds."""
    extra: dict[str, Any] = {"kohya": kohya} if kohya else {}
    if most is not None:
        extra["bound"] = {"least": least, "most": most, "why": why}
        description += f"; {_number(least)} to {_number(most)}" if least is not None else f"; at most {_number(most)}"
    extra = extra or None
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _within_bounds(cls, value: Any, info) -> Any:
        """Fields declared with `option(..., most=…, why=…)` are checked against their bound."""
        extra = cls.model_fields[info.field_name].json_schema_extra
        return check_bounds(value, extra["bound"]) if isinstance(extra, dict) and "bound" in extra else value
