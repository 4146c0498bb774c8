"""The project file's entries besides runs: samples, merges, extracts, resizes, svd-merges and post-hoc
EMAs, and
`ProjectFile`, the model of `configs/config.yaml` as a whole (bases and datasets are config's).

On the config floor with lorabake.config: no torch, nothing above it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lorabake import block_weights as lbw, names
from lorabake.config import BaseSpec, DatasetSpec
from lorabake.config_fields import (MAX_RANK, MAX_SEED, PROMPT_CHECK_DEFAULTS, RANK_WHY, SEED_WHY, SIDE_BOUND, Name,
                                    Strict, check_bounds, option)
from lorabake.data.buckets import MAX_SIDE
from lorabake.prompts import FIELDS as PROMPT_OPTIONS, parse_prompt
from lorabake.samplers import SAMPLERS, canonical
from lorabake.unet_blocks import _per_block


# ---------------------------------------------------------------- samples, merges, extracts

class Samples(Strict):
    prompts: list[str] = Field(min_length=1, description="kohya syntax: prompt --n neg --w --h --d seed --l cfg --s steps; "
                                                         f"--w and --h are 64 to {MAX_SIDE:,}, the others have the "
                                                         "bounds of steps, cfg and seed")
    strengths: list[float] = Field([0.0, 0.5, 1.0], min_length=1,
                                   description="LoRA strengths, the grid's columns (0 = the base alone)")
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
    batch_size: int = option(4, "images rendered per pipeline call (prompts and seeds of the same size, steps and "
                                "cfg share a call)", ge=1, most=64, why="a batch of 64 512-px images needs most of an 80 GB GPU")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, sampler: str) -> str:
        return canonical(sampler)

    @field_validator("prompts")
    @classmethod
    def _prompts_parse(cls, prompts: list[str]) -> list[str]:
        return check_prompts(prompts)


def check_prompts(prompts: list[str]) -> list[str]:
    """Each prompt parses, and the options it sets itself are within the bounds of the same keys
    (samples.steps, cfg and seed; sides 64 px to MAX_SIDE)."""
    bounds = {"width": SIDE_BOUND, "height": SIDE_BOUND,
              **{name: Samples.model_fields[name].json_schema_extra["bound"] for name in ("seed", "cfg", "steps")}}
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


AXES = ("runs", "epochs", "strengths", "te_strengths", "prompts", "seeds", "bases", "samplers", "cfg", "steps",
        "block_weights")
Placement = str | list[str] | None


class Comparison(Strict):
    """An X/Y/Z grid over runs, epochs, strengths, prompts, seeds, bases, samplers, cfg, steps and block
    weights. Axes left out take the samples' setting; axes with several values go where rows, columns
    and pages say, and the rest stack as sections of the page."""

    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    runs: list[str] = Field(min_length=1, description="run names, or a run file's name meaning all its sweep points")
    epochs: list[int] | Literal["last", "all"] = Field("last", description="epochs to show: a list, `last` (the "
                                                                           "final LoRA) or `all` kept epoch files")
    strengths: list[float] | None = Field(None, min_length=1, description="LoRA strengths (default: samples.strengths)")
    te_strengths: list[float] | None = Field(None, min_length=1, description="separate text-encoder strengths "
                                                                             "(default: the strength of the cell)")
    prompts: list[str] | None = Field(None, min_length=1, description="kohya-syntax prompts (default: samples.prompts)")
    seeds: list[int] | None = Field(None, min_length=1, description="seeds, each prompt rendered with every one "
                                                                    "(default: samples.seed or the prompt's --d)")
    bases: list[str] | None = Field(None, min_length=1, description="keys of bases to render the LoRAs on "
                                                                    "(default: each run's own base)")
    samplers: list[str] | None = Field(None, min_length=1, description="sampler names (default: samples.sampler)")
    cfg: list[float] | None = Field(None, min_length=1, description="CFG scales (default: samples.cfg or --l)")
    steps: list[int] | None = Field(None, min_length=1, description="sampling steps (default: samples.steps or --s)")
    block_weights: list[str | list[float]] | None = Field(
        None, min_length=1, description="lora-block-weight presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, "
                                        "OUTALL, ALL0.5) or lists: 17 (LBW), 25 (kohya) or 26 values on SD1/SD2, 12 (LBW), "
                                        "20 (LBW LyCORIS) or 23 (kohya) on SDXL")
    rows: Placement = Field("runs", description="the axis (or list of axes) along the rows")
    columns: Placement = Field("strengths", description="the axis (or list of axes) along the columns")
    pages: Placement = Field(None, description="axes with one page each (page-NN.png instead of grid.png)")
    concept: str | None = Field(None, description="the concept scored under each cell (default: samples.concept)")

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, samplers: list[str] | None) -> list[str] | None:
        return None if samplers is None else [canonical(s) for s in samplers]

    @field_validator("prompts")
    @classmethod
    def _prompts_parse(cls, prompts: list[str] | None) -> list[str] | None:
        return None if prompts is None else check_prompts(prompts)

    @field_validator("block_weights")
    @classmethod
    def _block_weights(cls, values: list | None) -> list | None:
        for value in values or []:
            lbw.check(value)
        return values

    @field_validator("seeds", "steps", "cfg")
    @classmethod
    def _within_sample_bounds(cls, values: list | None, info: ValidationInfo) -> list | None:
        """Each value within the bounds of the samples key of the same meaning (seed, steps, cfg)."""
        bound = Samples.model_fields[{"seeds": "seed"}.get(info.field_name, info.field_name)].json_schema_extra["bound"]
        for value in values or []:
            check_bounds(value, bound)
        return values

    @model_validator(mode="after")
    def _placements(self) -> "Comparison":
        placed = [axis for where in (self.rows, self.columns, self.pages) for axis in placement(where)]
        unknown = [axis for axis in placed if axis not in AXES]
        if unknown:
            raise ValueError(f"rows/columns/pages name unknown axes {unknown}; the axes are {', '.join(AXES)}")
        twice = sorted({axis for axis in placed if placed.count(axis) > 1})
        if twice:
            raise ValueError(f"axes {twice} are placed twice in rows/columns/pages")
        return self


def placement(where: Placement) -> list[str]:
    """rows/columns/pages as a list of axis names."""
    return [] if where is None else [where] if isinstance(where, str) else list(where)


class MergeLora(Strict):
    run: str = Field(description="the run whose final LoRA is merged")
    ratio: float = Field(1.0, description="the LoRA's strength in the merge (kohya's --ratios)")
    block_weights: list[float] | None = Field(
        None, description="weights multiplying the ratio per UNet block, in the base's vocabulary: 25 on SD1/SD2 "
                          "(IN00–IN11, MID, OUT00–OUT11), 23 on SDXL (EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, "
                          "OUT); text encoder modules keep the ratio")

    @field_validator("block_weights")
    @classmethod
    def _25_blocks(cls, value):
        return _per_block(value, "block_weights")


class Merge(Strict):
    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    base: str | None = Field(None, description="key of bases to merge into; default: the base its LoRAs' runs "
                                               "trained on")
    loras: list[MergeLora] = Field(min_length=1, description="the runs' LoRAs merged in, in order")
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"
    diffusers: bool = Field(False, description="also write results/merged/{name}.diffusers/ (a diffusers folder)")


class Extract(Strict):
    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    tuned: str = Field(description="the tuned model: the name of a merge, or a key of bases (e.g. a fine-tuned "
                                   "single-file checkpoint)")
    base: str | None = Field(None, description="key of bases the tuned model is compared with; default: the "
                                               "base of the `tuned` merge (required when `tuned` is a key of bases)")
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

    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    run: str = Field(description="the run whose final LoRA is resized")
    rank: int = option(..., "new rank (with `dynamic`: the most any module gets)", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_rank: int | None = option(None, "new rank of 3×3 convolutions (default: rank)", ge=1, most=MAX_RANK,
                                   why=RANK_WHY)
    dynamic: Literal["sv_ratio", "sv_fro", "sv_cumulative"] | None = Field(
        None, description="choose each module's rank: σ ≥ σmax / param, Frobenius fraction ≥ param, or Σσ fraction ≥ param")
    dynamic_param: float | None = Field(None, gt=0.0, description="the threshold `dynamic` uses (e.g. 0.9)")
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"

    @model_validator(mode="after")
    def _dynamic_needs_param(self) -> "Resize":
        if (self.dynamic is None) != (self.dynamic_param is None):
            raise ValueError("dynamic and dynamic_param go together (e.g. dynamic: sv_fro, dynamic_param: 0.9)")
        return self


class SvdMergeLora(Strict):
    run: str = Field(description="the run whose final LoRA goes in")
    ratio: float = Field(1.0, description="its weight in Σ ratio × ΔW (kohya's --ratios)")


class SvdMerge(Strict):
    """Several runs' LoRAs merged into one LoRA: Σ ratio × ΔW per module, re-factored by SVD (kohya's
    svd_merge_lora.py)."""

    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    loras: list[SvdMergeLora] = Field(min_length=1, description="the runs' LoRAs and their ratios")
    rank: int = option(..., "rank of the merged LoRA", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_rank: int | None = option(None, "rank of 3×3 convolutions (default: rank)", ge=1, most=MAX_RANK,
                                   why=RANK_WHY)
    clamp_quantile: float | None = Field(None, gt=0.0, le=1.0, description="clamp the factors to this quantile "
                                                                             "(kohya's default 0.99); none: exact")
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class PostHocEma(Strict):
    """A run's saved epoch files averaged into one LoRA, as an EMA updated once per file: ema = decay × ema
    + (1 − decay) × file, from the first file on. The decay is per saved file, not per step: 0.8 over 10
    files weights the last file 0.2 and the first 0.8⁹ ≈ 0.13."""

    name: Name = Field(description="the artifact's name (its file or folder under results/)")
    run: str = Field(description="the run whose epoch files are averaged (it saves them with save.every_n_epochs)")
    decay: float = Field(ge=0.0, lt=1.0, description="weight of the average per saved file: ema = decay × ema + "
                                                     "(1 − decay) × file; 0: the last file alone")
    epochs: list[int] | None = Field(None, min_length=2, description="the epochs whose files are averaged, in order "
                                                                     "(default: every epoch file the run keeps)")
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"

    @field_validator("epochs")
    @classmethod
    def _ascending(cls, epochs: list[int] | None) -> list[int] | None:
        if epochs is not None and epochs != sorted(set(epochs)):
            raise ValueError(f"epochs {epochs} must ascend, each once: the EMA takes the files in training order")
        return epochs


NAMED_LIST = {"written_as": "list"}  # for docs/options.md: the YAML holds a list of named entries


class ProjectFile(Strict):
    bases: dict[Name, BaseSpec] = Field(description="base models by name: a builtin, or a path (single file or "
                                                    "diffusers folder); runs name one with `base`")
    datasets: dict[Name, DatasetSpec] = Field(description="datasets by name: kohya-layout folders "
                                                          "(<repeats>_<concept>/image + caption)")
    defaults: dict[str, Any] = Field(default_factory=dict, description="run settings under every "
                                                                       "configs/runs/*.yaml (the keys below)")
    samples: Samples | None = Field(None, description="each run's sample grid (results/runs/{run}/grid.png); "
                                                      "none: no grids")
    # Written as lists of entries with a `name` (the YAML stays as users write it), held keyed by name
    # like bases, so every caller looks an entry up the same way.
    merges: dict[str, Merge] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="LoRAs merged into a base: single-file checkpoints (results/merged/)")
    extracts: dict[str, Extract] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="LoRAs extracted from (tuned − base) by SVD (results/extracted/)")
    resizes: dict[str, Resize] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="runs' LoRAs at a lower rank (results/resized/)")
    svd_merges: dict[str, SvdMerge] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="several runs' LoRAs as one LoRA (results/svd-merged/)")
    emas: dict[str, PostHocEma] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="runs' epoch files averaged into one LoRA, post hoc (results/ema/)")
    comparisons: dict[str, Comparison] = Field(default_factory=dict, json_schema_extra=NAMED_LIST,
                               description="X/Y/Z grids over runs, epochs, strengths, prompts, seeds, … (results/comparisons/)")
    trainer_version: int = Field(1, description="bump by hand when training semantics change")

    @field_validator("merges", "extracts", "resizes", "svd_merges", "emas", "comparisons",
                     mode="before")
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
