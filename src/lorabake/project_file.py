"""The project file's entries besides runs: samples, merges, extracts, resizes and svd-merges, and
`ProjectFile`, the model of `configs/config.yaml` as a whole (bases and datasets are config's).

On the config floor with lorabake.config: no torch, nothing above it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorabake import names
from lorabake.config import (MAX_RANK, MAX_SEED, PROMPT_CHECK_DEFAULTS, RANK_WHY, SEED_WHY, SIDE_BOUND, BaseSpec,
                             DatasetSpec, Name, Strict, _per_block, check_bounds, option)
from lorabake.data.buckets import MAX_SIDE
from lorabake.prompts import FIELDS as PROMPT_OPTIONS, parse_prompt
from lorabake.samplers import SAMPLERS, canonical


# ---------------------------------------------------------------- samples, merges, extracts

class Samples(Strict):
    prompts: list[str] = Field(min_length=1, description="kohya syntax: prompt --n neg --w --h --d seed --l cfg --s steps; "
                                                         f"--w and --h are 64 to {MAX_SIDE:,}, the others have the "
                                                         "bounds of steps, cfg and seed")
    strengths: list[float] = Field([0.0, 0.5, 1.0], min_length=1)
    sampler: str = Field("euler_a", description="a sampler as A1111/ComfyUI name it: " + ", ".join(SAMPLERS)
                                                + "; kohya's names (k_euler_a, dpmsolver++, …) are accepted too")
    steps: int = option(20, "sampling steps (a prompt's --s overrides it)", ge=1, most=1000,
                        why="A1111 offers at most 150 steps, and its samplers converge long before")
    cfg: float = option(7.5, "classifier-free guidance scale (--l overrides it)", least=0.0, most=100.0,
                        why="A1111's CFG slider stops at 30; far above it images burn out")
    seed: int = option(42, "seed of every prompt's cells (--d overrides it)", least=0, most=MAX_SEED, why=SEED_WHY)
    concept: str | None = Field(None, description="what the LoRA should teach, as the base's concept scorer names it "
                                                  "(toy-shapes: a shape such as star, a colour, or 'blue background'); "
                                                  "each cell's score goes under it and into scores.json")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, sampler: str) -> str:
        return canonical(sampler)

    @field_validator("prompts")
    @classmethod
    def _prompts_parse(cls, prompts: list[str]) -> list[str]:
        """Each prompt parses, and the options it sets itself are within the bounds of the same keys."""
        bounds = {"width": SIDE_BOUND, "height": SIDE_BOUND,
                  **{name: cls.model_fields[name].json_schema_extra["bound"] for name in ("seed", "cfg", "steps")}}
        for i, line in enumerate(prompts):
            prompt = parse_prompt(line, PROMPT_CHECK_DEFAULTS)
            for letter, (name, _) in PROMPT_OPTIONS.items():
                if name not in bounds:  # --n, the negative prompt
                    continue
                try:
                    check_bounds(getattr(prompt, name), bounds[name])
                except ValueError as error:
                    raise ValueError(f"prompt {i} ({line!r}): --{letter} {error}") from None
        return prompts


class MergeLora(Strict):
    run: str
    ratio: float = 1.0
    block_weights: list[float] | None = Field(
        None, description="25 weights (IN00–IN11, MID, OUT00–OUT11) multiplying the ratio per UNet block; "
                          "text encoder modules keep the ratio")

    @field_validator("block_weights")
    @classmethod
    def _25_blocks(cls, value):
        return _per_block(value, "block_weights")


class Merge(Strict):
    name: Name
    base: str = "tiny"
    loras: list[MergeLora] = Field(min_length=1)
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"
    diffusers: bool = Field(False, description="also write results/merged/{name}.diffusers/ (a diffusers folder)")


class Extract(Strict):
    name: Name
    tuned: str = Field(description="the tuned model: the name of a merge, or a key of bases (e.g. a fine-tuned "
                                   "single-file checkpoint)")
    base: str = "tiny"
    dim: int = option(8, "rank of the extracted LoRA", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_dim: int | None = option(None, "rank for 3×3 convolutions (LoCon); none: not extracted", ge=1,
                                  most=MAX_RANK, why=RANK_WHY)
    clamp_quantile: float | None = Field(0.99, gt=0.0, le=1.0, description="clamp the factors to this quantile "
                                                                            "of their values (kohya's default 0.99)")
    min_diff: float = Field(0.01, ge=0.0, description="text encoders are extracted only if some weight moved more "
                                                      "than this (kohya's --min_diff)")
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"


class Resize(Strict):
    """A run's LoRA re-factored to a lower rank by SVD (kohya's resize_lora.py)."""

    name: Name
    run: str = Field(description="the run whose final LoRA is resized")
    rank: int = option(..., "new rank (with `dynamic`: the most any module gets)", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_rank: int | None = option(None, "new rank of 3×3 convolutions (default: rank)", ge=1, most=MAX_RANK,
                                   why=RANK_WHY)
    dynamic: Literal["sv_ratio", "sv_fro", "sv_cumulative"] | None = Field(
        None, description="choose each module's rank: σ ≥ σmax / param, Frobenius fraction ≥ param, or Σσ fraction ≥ param")
    dynamic_param: float | None = Field(None, gt=0.0)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"

    @model_validator(mode="after")
    def _dynamic_needs_param(self) -> "Resize":
        if (self.dynamic is None) != (self.dynamic_param is None):
            raise ValueError("dynamic and dynamic_param go together (e.g. dynamic: sv_fro, dynamic_param: 0.9)")
        return self


class SvdMergeLora(Strict):
    run: str
    ratio: float = 1.0


class SvdMerge(Strict):
    """Several runs' LoRAs merged into one LoRA: Σ ratio × ΔW per module, re-factored by SVD (kohya's
    svd_merge_lora.py)."""

    name: Name
    loras: list[SvdMergeLora] = Field(min_length=1)
    rank: int = option(..., "rank of the merged LoRA", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_rank: int | None = option(None, "rank of 3×3 convolutions (default: rank)", ge=1, most=MAX_RANK,
                                   why=RANK_WHY)
    clamp_quantile: float | None = Field(None, gt=0.0, le=1.0)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


NAMED_LIST = {"written_as": "list"}  # for docs/options.md: the YAML holds a list of named entries


class ProjectFile(Strict):
    bases: dict[Name, BaseSpec]
    datasets: dict[Name, DatasetSpec]
    defaults: dict[str, Any] = Field(default_factory=dict)
    samples: Samples | None = None
    # Written as lists of entries with a `name` (the YAML stays as users write it), held keyed by name
    # like bases, so every caller looks an entry up the same way.
    merges: dict[str, Merge] = Field(default_factory=dict, json_schema_extra=NAMED_LIST)
    extracts: dict[str, Extract] = Field(default_factory=dict, json_schema_extra=NAMED_LIST)
    resizes: dict[str, Resize] = Field(default_factory=dict, json_schema_extra=NAMED_LIST)
    svd_merges: dict[str, SvdMerge] = Field(default_factory=dict, json_schema_extra=NAMED_LIST)
    trainer_version: int = Field(1, description="bump by hand when training semantics change")

    @field_validator("merges", "extracts", "resizes", "svd_merges", mode="before")
    @classmethod
    def _keyed_by_name(cls, entries: Any) -> dict[str, Any]:
        if not isinstance(entries, list):
            raise ValueError("must be a list of entries, each with a `name`")
        keyed: dict[str, Any] = {}
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if name is None:
                raise ValueError(f"entry {i} has no `name`")
            if names.name_problem(name):
                raise ValueError(f"entry {i}: name {names.name_problem(name)}")
            if name in keyed:
                raise ValueError(f"entry {i}: the name {name!r} is used twice")
            keyed[name] = entry
        return keyed
