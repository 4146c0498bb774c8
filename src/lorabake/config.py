"""The project config: YAML in, validated pydantic models out, before any job runs.

`configs/config.yaml` holds `bases`, `datasets`, `defaults` (merged under every run), `samples`,
`merges` and `extracts`; each `configs/runs/<name>.yaml` is one run (defaults ⊕ file). Field names
follow kohya's vocabulary. Unknown keys are refused, and every error names the file and key path.
"""
from __future__ import annotations

import copy
import itertools
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from lorabake import checkpoint_header, names
from lorabake.checkpoint_header import PICKLE_SUFFIXES, HeaderError
from lorabake.buckets import BucketSpec

# A config name that becomes part of a path under results/ (a key of bases or datasets, a merge's
# name, …): refused while the config is read, before anything is written.
Name = Annotated[str, AfterValidator(names.safe_name)]


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- project-level entries

BUILTIN_ARCHITECTURES = {"tiny-sd": "sd1", "tiny-sd2-v": "sd2", "tiny-sdxl": "sdxl"}


class BaseSpec(Strict):
    """A base model: an embedded tiny model, or a checkpoint you have (a diffusers folder or a single
    SD1.x / SD2.x / SDXL file), loaded offline with the configs lorabake ships."""

    builtin: Literal["tiny-sd", "tiny-sd2-v", "tiny-sdxl"] | None = Field(
        None, description="an embedded tiny model (SD1, SD2 v-prediction or SDXL topology)")
    path: str | None = Field(None, description="a diffusers folder or a single .safetensors checkpoint "
                                               "(absolute, or relative to the project root)")
    allow_pickle: bool = Field(False, description="accept a pickled .ckpt/.pt/.bin, read with torch's restricted "
                                               "loader only: tensors and plain containers; a pickle that needs "
                                               "more (code) is refused")
    prediction: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="override the detected prediction type (SD2 768-v checkpoints are v_prediction)")

    @model_validator(mode="after")
    def _one_source(self) -> "BaseSpec":
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of builtin (tiny-sd, tiny-sd2-v, tiny-sdxl) or path")
        if self.builtin is not None and (self.allow_pickle or self.prediction):
            raise ValueError("allow_pickle and prediction apply to path bases only")
        return self


class DatasetSpec(Strict):
    path: str = Field(description="dataset folder, relative to the project root")


# ---------------------------------------------------------------- one training run

class Buckets(Strict):
    enabled: bool = True
    min: int = Field(256, ge=64)
    max: int = Field(1024, ge=64)
    step: int = Field(64, ge=8)
    no_upscale: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Buckets":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        if self.step % 8:
            raise ValueError(f"step ({self.step}) must be a multiple of 8 (latents are 1/8 of the image)")
        return self


ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "glora", "diag-oft", "boft")
BLOCKS = tuple([f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)])
PRECISIONS = Literal["fp16", "bf16", "fp32"]


def option(default: Any, description: str, kohya: str | None = None, **constraints: Any) -> Any:
    """A config field with the text the option reference (docs/options.md) prints for it."""
    extra = {"kohya": kohya} if kohya else None
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def _per_block(values: list[float] | None, key: str) -> list[float] | None:
    if values is not None and len(values) != len(BLOCKS):
        raise ValueError(f"{key} needs {len(BLOCKS)} values (IN00–IN11, MID, OUT00–OUT11), got {len(values)}")
    return values


class Network(Strict):
    algo: Literal[ALGOS] = option("lora", "network type, from lycoris-lora", "--network_module / network_args algo")
    dim: int = option(8, "rank of the update (network dim)", "--network_dim", ge=1)
    alpha: float = option(1.0, "scale: the update is multiplied by alpha / dim", "--network_alpha", gt=0)
    conv_dim: int | None = option(None, "rank for 3×3 convolutions (locon, loha, lokr…); null: convs not trained",
                                  "network_args conv_dim", ge=1)
    conv_alpha: float | None = option(None, "alpha for 3×3 convolutions (default: conv_dim)", "network_args conv_alpha", gt=0)
    factor: int = option(-1, "lokr: Kronecker factor (-1: as balanced as the shape allows)", "network_args factor")
    dropout: float = option(0.0, "dropout on the update's output (lora/locon; runs them in lycoris' bypass mode)",
                            "--network_dropout", ge=0.0, lt=1.0)
    rank_dropout: float = option(0.0, "drops ranks of the update per step", "network_args rank_dropout", ge=0.0, lt=1.0)
    module_dropout: float = option(0.0, "skips a whole module's update per step", "network_args module_dropout",
                                   ge=0.0, lt=1.0)
    block_dims: list[int] | None = option(None, "25 per-block ranks IN00…IN11, MID, OUT00…OUT11 (UNet)",
                                          "network_args block_dims")
    block_alphas: list[float] | None = option(None, "25 per-block alphas", "network_args block_alphas")
    block_lr_weights: list[float] | None = option(None, "25 per-block multipliers of the UNet learning rate",
                                                  "network_args down_lr_weight/mid_lr_weight/up_lr_weight")
    block_lr_zero_threshold: float = option(0.0, "blocks whose lr weight is at or below this get no module at all",
                                            "network_args block_lr_zero_threshold", ge=0.0)
    init_weights: str | None = option(None, "a LoRA file (same algo and dims) to continue from, relative to the project root",
                                      "--network_weights")
    args: dict[str, Any] = option(dict, "further lycoris-lora arguments (use_tucker, use_scalar, constraint, "
                                  "rescaled, block_size, bypass_mode…)", "--network_args")
    train_unet: bool = option(True, "train modules on the UNet", "not --network_train_text_encoder_only")
    train_text_encoder: bool = option(True, "train modules on the text encoder", "not --network_train_unet_only")

    @field_validator("block_dims", "block_alphas", "block_lr_weights")
    @classmethod
    def _twenty_five(cls, values, info):
        return _per_block(values, info.field_name)

    @field_validator("args")
    @classmethod
    def _known_network_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(args) - LYCORIS_ARGS)
        if unknown:
            raise ValueError(f"unknown lycoris argument(s) {unknown}; known: {sorted(LYCORIS_ARGS)} "
                             "(dim, alpha, conv_dim, dropouts and factor have their own keys)")
        return args

    @model_validator(mode="after")
    def _something_to_train(self) -> "Network":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet and train_text_encoder are both false: nothing would be trained")
        if self.alpha > self.dim:
            warnings.warn(
                f"network.alpha ({self.alpha:g}) > network.dim ({self.dim}): the LoRA update is scaled "
                f"up by {self.alpha / self.dim:g}, which usually makes training unstable",
                stacklevel=2,
            )
        # lycoris 4 reads these only in some modules; elsewhere they would be accepted and ignored
        if self.dropout and self.algo not in ("lora", "locon"):
            raise ValueError(f"dropout is applied by LoRA/LoCon modules only, not {self.algo}: "
                             "use module_dropout (or rank_dropout for loha, lokr, glora)")
        if self.rank_dropout and self.algo not in ("lora", "locon", "loha", "lokr", "glora"):
            raise ValueError(f"rank_dropout is applied by lora, locon, loha, lokr and glora modules, not {self.algo}: "
                             "use module_dropout")
        if self.conv_alpha is not None and self.conv_dim is None:
            raise ValueError("conv_alpha is set but conv_dim is not: set conv_dim to train 3×3 convolutions")
        return self


LYCORIS_ARGS = {"use_tucker", "use_scalar", "rank_dropout_scale", "constraint", "rescaled", "block_size",
                "bypass_mode", "train_norm", "dora_wd", "weight_decompose", "full_matrix", "decompose_both",
                "unbalanced_factorization", "rs_lora"}
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "sgd_nesterov", "sgd_nesterov8bit", "adafactor",
              "dadapt_adam", "dadapt_lion", "prodigy")


class Optimizer(Strict):
    type: Literal[OPTIMIZERS] = option("adamw", "optimizer; the 8-bit ones come from bitsandbytes, prodigy from "
                                       "prodigyopt, dadapt_* from dadaptation", "--optimizer_type")
    lr: float = option(1.0e-4, "learning rate (adaptive optimizers: a multiplier, usually 1.0)", "--learning_rate", gt=0)
    unet_lr: float | None = option(None, "UNet learning rate (default: lr)", "--unet_lr", gt=0)
    text_encoder_lr: float | None = option(None, "text encoder learning rate (default: lr)", "--text_encoder_lr", gt=0)
    args: dict[str, Any] = option(dict, "keyword arguments of the optimizer (weight_decay, betas, decouple, "
                                  "d_coef, use_bias_correction, safeguard_warmup, relative_step…)", "--optimizer_args")

    @model_validator(mode="after")
    def _known_args(self) -> "Optimizer":
        from lorabake import optim

        optim.check_args(self.type, self.args)
        return self


class Scheduler(Strict):
    type: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                  "adafactor"] = option("constant", "learning-rate schedule (diffusers.optimization; adafactor: "
                                        "the optimizer's own relative step)", "--lr_scheduler")
    warmup: float = option(0.0, "warm-up as a fraction of total steps", "--lr_warmup_steps (as a ratio)", ge=0.0, lt=1.0)
    cycles: int = option(1, "hard restarts of cosine_with_restarts", "--lr_scheduler_num_cycles", ge=1)
    power: float = option(1.0, "exponent of polynomial decay", "--lr_scheduler_power", gt=0)


class Training(Strict):
    epochs: int = option(10, "passes over the data (images × repeats)", "--max_train_epochs", ge=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps, if fewer than epochs give",
                                   "--max_train_steps", ge=1)
    batch_size: int = option(1, "images per step (one bucket per batch)", "--train_batch_size", ge=1)
    grad_accum: int = option(1, "batches per optimizer step", "--gradient_accumulation_steps", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast dtype of the forward pass",
                                                            "--mixed_precision")
    full_precision: bool = option(False, "keep the trained weights in the mixed-precision dtype too",
                                  "--full_bf16 / --full_fp16")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory",
                                          "--gradient_checkpointing")
    attention: Literal["sdpa", "eager"] = option("sdpa", "attention kernel: torch scaled_dot_product_attention "
                                                 "or the plain matmul", "--sdpa")
    cache_latents: bool | None = option(None, "encode images once (null: yes unless color/crop augmentation "
                                        "needs the pixels each step)", "--cache_latents")
    processes: int = option(1, "data-parallel processes (GPUs, or CPU processes with gloo); batch_size is per "
                            "process, so the global batch is batch_size × processes", "accelerate --num_processes",
                            ge=1)
    seed: int = option(42, "seed of everything random; same seed, same bytes on the CPU", "--seed")
    clip_skip: int = option(1, "use the text encoder's n-th last layer", "--clip_skip", ge=1)
    max_token_length: Literal[75, 150, 225] = option(75, "caption tokens, encoded in chunks of 75",
                                                     "--max_token_length")
    stop_text_encoder_at: float | None = option(None, "fraction of total steps after which the text encoder "
                                                "stops training", "--stop_text_encoder_training (as a ratio)",
                                                gt=0.0, le=1.0)


class MultiresNoise(Strict):
    iterations: int = option(0, "pyramid levels of added noise (0: off; 6–10 typical)",
                             "--multires_noise_iterations", ge=0)
    discount: float = option(0.3, "weight falloff per level", "--multires_noise_discount", gt=0.0, le=1.0)


class Loss(Strict):
    min_snr_gamma: float | None = option(None, "Min-SNR weighting γ (Hang et al. 2023); 5 is usual",
                                         "--min_snr_gamma", gt=0)
    noise_offset: float = option(0.0, "offset noise strength (Guttenberg 2023)", "--noise_offset", ge=0.0)
    adaptive_noise_scale: float | None = option(None, "adds |mean latent| × this to noise_offset",
                                                "--adaptive_noise_scale")
    multires_noise: MultiresNoise = option(MultiresNoise, "multi-resolution (pyramid) noise")
    prior_loss_weight: float = option(1.0, "loss weight of regularization images", "--prior_loss_weight", ge=0.0)
    prediction: Literal["auto", "epsilon", "v_prediction"] = option(
        "auto", "training target (auto: what the base's scheduler says)", "--v_parameterization")
    scale_weight_norms: float | None = option(None, "max-norm of each module's update (scaled down past it)",
                                              "--scale_weight_norms", gt=0)

    @model_validator(mode="after")
    def _offsets(self) -> "Loss":
        if self.adaptive_noise_scale is not None and self.noise_offset == 0:
            raise ValueError("adaptive_noise_scale needs noise_offset > 0 (it adjusts the offset)")
        if self.noise_offset and self.multires_noise.iterations:
            raise ValueError("noise_offset and multires_noise are exclusive in kohya; choose one")
        return self


class Captions(Strict):
    extension: str = option(".txt", "caption file extension", "--caption_extension")
    shuffle: bool = option(False, "shuffle the comma-separated tags each step", "--shuffle_caption")
    keep_tokens: int = option(0, "first N tags stay in place (and are never dropped)", "--keep_tokens", ge=0)
    separator: str = option(",", "what separates tags", "--caption_separator", min_length=1)
    dropout_rate: float = option(0.0, "probability of training an image with an empty caption",
                                 "--caption_dropout_rate", ge=0.0, le=1.0)
    dropout_every_n_epochs: int = option(0, "every N-th epoch trains with empty captions (0: never)",
                                         "--caption_dropout_every_n_epochs", ge=0)
    tag_dropout_rate: float = option(0.0, "probability of dropping each tag (after keep_tokens)",
                                     "--caption_tag_dropout_rate", ge=0.0, le=1.0)
    weighted: bool = option(False, "read (tag:1.2) / [tag] emphasis as A1111 does", "--weighted_captions")

    @field_validator("extension")
    @classmethod
    def _dotted(cls, extension: str) -> str:
        if not extension.startswith(".") or "/" in extension:
            raise ValueError(f"extension must look like '.txt', got {extension!r}")
        return extension


class Augment(Strict):
    flip: bool = option(False, "random horizontal flip (both states are cached)", "--flip_aug")
    color: bool = option(False, "random hue shift (reads images each step: no latent cache)", "--color_aug")
    random_crop: bool = option(False, "random crop instead of center crop (no latent cache)", "--random_crop")


class Save(Strict):
    every_n_epochs: int | None = option(1, "write epochs/{run}-eNNNN.safetensors every N epochs",
                                        "--save_every_n_epochs", ge=1)
    every_n_steps: int | None = option(None, "write steps/{run}-sNNNNNN.safetensors every N steps",
                                       "--save_every_n_steps", ge=1)
    keep_last: int | None = option(None, "keep only the last N epoch/step files", "--save_last_n_epochs", ge=1)
    precision: PRECISIONS = option("fp16", "dtype of saved weights", "--save_precision")
    state: bool = option(False, "save optimizer/scheduler/RNG state at each save; a rerun resumes from "
                         "the latest one", "--save_state / --resume")


class Pivotal(Strict):
    token: str = option(..., "placeholder in captions and prompts, replaced by the new tokens", "--token_abstraction")
    num_new_tokens: int = option(2, "new embedding vectors <s0><s1>…", "--num_new_tokens_per_abstraction", ge=1)
    frac: float = option(0.5, "fraction of total steps during which the embeddings train",
                         "--train_text_encoder_ti_frac", gt=0.0, le=1.0)
    init: str | None = option(None, "a word whose embedding starts the new vectors (null: random, as CLIP's "
                              "std)", "--initializer_token")
    lr: float | None = option(None, "learning rate of the embeddings (default: text_encoder_lr or lr)",
                              "--text_encoder_lr (TI)", gt=0)

    @field_validator("token")
    @classmethod
    def _word(cls, token: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]+", token):
            raise ValueError(f"token must be one word of letters, digits or '_', got {token!r}")
        return token


class Resources(Strict):
    """What a run's train job asks the scheduler for. Not part of the run's identity: changing it
    never retrains."""

    gpu: int = option(0, "GPUs for the train job (SLURM --gres=gpu:N); > 1 also means processes = gpu", ge=0)
    mem_mb: int = option(8000, "memory for the train job in MB", ge=100)
    runtime: int = option(240, "wall-clock limit of the train job in minutes", ge=1)
    threads: int = option(1, "CPU threads of the train job (also OMP_NUM_THREADS; bytes depend on it on the CPU)",
                          ge=1)


class RunConfig(Strict):
    base: str = option("tiny", "key of config.yaml bases")
    datasets: list[str] = option(..., "keys of config.yaml datasets", "--train_data_dir", min_length=1)
    resolution: int | tuple[int, int] = option(512, "training size, or [width, height]", "--resolution")
    buckets: Buckets = option(Buckets, "aspect-ratio buckets", "--enable_bucket …")
    network: Network = option(Network, "the trained network")
    optimizer: Optimizer = option(Optimizer, "the optimizer")
    scheduler: Scheduler = option(Scheduler, "the learning-rate schedule")
    training: Training = option(Training, "steps, batches, precision, text encoding")
    loss: Loss = option(Loss, "loss weighting and noise")
    captions: Captions = option(Captions, "caption processing")
    augment: Augment = option(Augment, "augmentation")
    save: Save = option(Save, "what is saved, when")
    pivotal: Pivotal | None = option(None, "pivotal tuning: textual-inversion tokens trained with the LoRA")
    resources: Resources = option(Resources, "scheduler resources of this run's train job (not hashed)")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, resolution: int | tuple[int, int]) -> int | tuple[int, int]:
        for side in (resolution,) if isinstance(resolution, int) else resolution:
            if side < 64 or side % 8:
                raise ValueError(f"resolution sides must be multiples of 8 and >= 64, got {resolution}")
        return resolution

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        pixels = [name for name in ("color", "random_crop") if getattr(self.augment, name)]
        if pixels and self.training.cache_latents:
            raise ValueError(f"augment.{pixels[0]} changes the pixels every step, so latents cannot be cached: "
                             "set training.cache_latents to false (or null), or turn the augmentation off")
        from lorabake import optim

        optim.check_schedule(self.scheduler.type, self.scheduler.warmup, self.optimizer.type, self.optimizer.args)
        if self.optimizer.type in ("prodigy", "dadapt_adam", "dadapt_lion"):
            opt, weights = self.optimizer, self.network.block_lr_weights or [1.0]
            lrs = {opt.unet_lr or opt.lr, opt.text_encoder_lr or opt.lr} | {(opt.unet_lr or opt.lr) * w for w in weights if w}
            if len(lrs) > 1:
                raise ValueError(f"optimizer.type {opt.type} estimates one step size for all parameters: "
                                 "unet_lr, text_encoder_lr and block_lr_weights must give one learning rate "
                                 f"(they give {sorted(lrs)})")
        decomposed = self.network.args.get("dora_wd") or self.network.args.get("weight_decompose")
        if self.loss.scale_weight_norms is not None and (self.network.algo in ("diag-oft", "boft") or decomposed):
            raise ValueError("loss.scale_weight_norms bounds an additive weight update; "
                             f"{'DoRA' if decomposed else self.network.algo} does not add one: turn one of them off")
        if self.training.stop_text_encoder_at is not None and not self.network.train_text_encoder:
            raise ValueError("training.stop_text_encoder_at is set but network.train_text_encoder is false")
        return self

    @property
    def processes(self) -> int:
        """Data-parallel processes: training.processes, or one per GPU when the job asks for several."""
        return max(self.training.processes, self.resources.gpu)

    @property
    def global_batch(self) -> int:
        return self.training.batch_size * self.processes

    def identity(self) -> dict[str, Any]:
        """What decides the run's bytes (everything but scheduler resources), JSON-able."""
        return {**self.model_dump(mode="json", exclude={"resources"}), "processes": self.processes}

    @property
    def caches_latents(self) -> bool:
        if self.training.cache_latents is not None:
            return self.training.cache_latents
        return not (self.augment.color or self.augment.random_crop)

    @property
    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    def unsupported_on(self, arch: str) -> list[str]:
        """Options that have no meaning (yet) on this architecture: refused, never silently ignored."""
        if arch != "sdxl":
            return []
        n, problems = self.network, []
        if any(v is not None for v in (n.block_dims, n.block_alphas, n.block_lr_weights)):
            problems.append("network.block_dims/block_alphas/block_lr_weights use the 25-block SD1/SD2 vocabulary; "
                            "not supported for SDXL yet")
        if self.pivotal is not None:
            problems.append("pivotal: not supported for SDXL yet")
        if self.training.clip_skip != 1:  # kohya's SDXL trainers warn that clip_skip does nothing
            problems.append("training.clip_skip has no meaning for SDXL, which always uses the penultimate layers")
        return problems

    def bucket_spec(self) -> BucketSpec:
        b = self.buckets
        return BucketSpec(self.size, b.enabled, b.min, b.max, b.step, b.no_upscale)


# ---------------------------------------------------------------- samples, merges, extracts

class Samples(Strict):
    prompts: list[str] = Field(min_length=1, description="kohya syntax: prompt --n neg --w --h --d seed --l cfg --s steps")
    strengths: list[float] = Field([0.0, 0.5, 1.0], min_length=1)
    sampler: Literal["euler_a", "euler", "ddim"] = "euler_a"
    steps: int = Field(20, ge=1)
    cfg: float = 7.5
    seed: int = 42


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
    dim: int = Field(8, ge=1)
    conv_dim: int | None = Field(None, ge=1, description="rank for 3×3 convolutions (LoCon); none: not extracted")
    clamp_quantile: float | None = Field(0.99, gt=0.0, le=1.0, description="clamp the factors to this quantile "
                                                                            "of their values (kohya's default 0.99)")
    min_diff: float = Field(0.01, ge=0.0, description="text encoders are extracted only if some weight moved more "
                                                      "than this (kohya's --min_diff)")
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"


class Resize(Strict):
    """A run's LoRA re-factored to a lower rank by SVD (kohya's resize_lora.py)."""

    name: Name
    run: str = Field(description="the run whose final LoRA is resized")
    rank: int = Field(ge=1, description="new rank (with `dynamic`: the most any module gets)")
    conv_rank: int | None = Field(None, ge=1, description="new rank of 3×3 convolutions (default: rank)")
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
    rank: int = Field(ge=1)
    conv_rank: int | None = Field(None, ge=1)
    clamp_quantile: float | None = Field(None, gt=0.0, le=1.0)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class ProjectFile(Strict):
    bases: dict[Name, BaseSpec]
    datasets: dict[Name, DatasetSpec]
    defaults: dict[str, Any] = Field(default_factory=dict)
    samples: Samples | None = None
    merges: list[Merge] = Field(default_factory=list)
    extracts: list[Extract] = Field(default_factory=list)
    resizes: list[Resize] = Field(default_factory=list)
    svd_merges: list[SvdMerge] = Field(default_factory=list)
    trainer_version: int = Field(1, description="bump by hand when training semantics change")


class Project(BaseModel):
    """Everything the workflow needs, resolved: paths are absolute, runs are merged with defaults."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    root: Path
    config_file: Path
    file: ProjectFile
    runs: dict[str, RunConfig]
    run_files: dict[str, Path]
    warnings: tuple[str, ...] = ()

    def dataset_root(self, name: str) -> Path:
        return self.root / self.file.datasets[name].path

    def base_path(self, name: str) -> Path | None:
        path = self.file.bases[name].path
        return None if path is None else self.root / path

    def runs_using(self, dataset: str) -> list[str]:
        return [name for name, run in self.runs.items() if dataset in run.datasets]


# ---------------------------------------------------------------- loading

def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, recursively for nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _has_key(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


Source = tuple[Path, dict[str, Any], str]  # file, the data it contributed, key prefix inside it


def format_errors(error: ValidationError, sources: list[Source]) -> str:
    """One line per problem: the file it came from, the dotted key path there, and pydantic's message.
    The first source that spells the key is blamed (a run file before the defaults under it)."""
    lines = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        is_key = loc[-1:] == ("[key]",)  # a mapping's key was refused, not its value
        if is_key:
            loc = loc[:-2]
        path, _, prefix = next((s for s in sources if _has_key(s[1], loc)), sources[0])
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {prefix}{key}: {'key ' if is_key else ''}{message}")
    return "\n".join(lines)


def _validated(model: type[BaseModel], data: dict[str, Any], sources: list[Source]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = model.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_errors(e, sources)) from None
    return value, [f"{sources[0][0]}: {w.message}" for w in caught]


def load_project(config_file: str | Path, runs_dir: str | Path | None = None) -> Project:
    """Read config.yaml and every runs/*.yaml, validate them and check cross-references."""
    config_file = Path(config_file).resolve()
    root = config_file.parent.parent if config_file.parent.name == "configs" else config_file.parent
    runs_dir = Path(runs_dir).resolve() if runs_dir else config_file.parent / "runs"
    raw = read_yaml(config_file)
    project_file, notes = _validated(ProjectFile, raw, [(config_file, raw, "")])
    runs, run_files = {}, {}
    for run_file in sorted(runs_dir.glob("*.yaml")):
        name = run_file.stem
        if names.name_problem(name):
            raise ConfigError(f"{run_file}: the run name (the file's name) {names.name_problem(name)}")
        run_raw = read_yaml(run_file)
        for point_name, point in expand_sweep(name, run_raw, run_file):
            if names.name_problem(point_name):
                raise ConfigError(f"{run_file}: sweep: the run name of a point {names.name_problem(point_name)}; "
                                  "use shorter or plainer values, or split the sweep")
            if point_name in runs:
                raise ConfigError(f"{run_file}: sweep: run name '{point_name}' is also the name of another run")
            merged = deep_merge(deep_merge(project_file.defaults, run_raw), point)
            sources = [(run_file, point, "sweep point "), (run_file, run_raw, ""),
                       (config_file, project_file.defaults, "defaults.")]
            runs[point_name], run_notes = _validated(RunConfig, merged, sources)
            run_files[point_name] = run_file
            notes += run_notes
    project = Project(root=root, config_file=config_file, file=project_file, runs=runs,
                      run_files=run_files, warnings=tuple(notes))
    check_references(project)
    return project


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _name_part(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def expand_sweep(name: str, run_raw: dict[str, Any], run_file: Path) -> list[tuple[str, dict[str, Any]]]:
    """`sweep: {network.dim: [4, 8], optimizer.type: [adamw, prodigy]}` → the cartesian product, one run
    per point, named `{file stem}-{last key part}_{value}-…` (e.g. `style-dim_4-type_prodigy`).
    Without a sweep the file is one run named after the file. `sweep` is removed from run_raw."""
    sweep = run_raw.pop("sweep", None)
    if sweep is None:
        return [(name, {})]
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{run_file}: sweep: must be a mapping of dotted keys to lists of values, "
                          "e.g. {{network.dim: [4, 8]}}")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{run_file}: sweep.{key}: must be a non-empty list of values")
    points = []
    for combo in itertools.product(*sweep.values()):
        point: dict[str, Any] = {}
        for key, value in zip(sweep, combo):
            point = deep_merge(point, _nested(key, value))
        suffix = "-".join(f"{key.rsplit('.', 1)[-1]}_{_name_part(v)}" for key, v in zip(sweep, combo))
        points.append((f"{name}-{suffix}", point))
    return points


def check_references(project: Project) -> None:
    """Names that point at other entries must exist; dataset folders must exist."""
    f = project.file
    problems = []
    for name, path in sorted(f.datasets.items()):
        if not project.dataset_root(name).is_dir():
            problems.append(f"{project.config_file}: datasets.{name}.path: folder {project.dataset_root(name)} does not exist")
    for name, run in project.runs.items():
        where = project.run_files[name]
        if run.base not in f.bases:
            problems.append(f"{where}: base: '{run.base}' is not a key of bases in {project.config_file.name} ({sorted(f.bases)})")
        problems += _check_init_weights(project, name)
        for ds in run.datasets:
            if ds not in f.datasets:
                problems.append(f"{where}: datasets: '{ds}' is not a key of datasets in {project.config_file.name} ({sorted(f.datasets)})")
    architectures = {}
    for name in sorted(f.bases):
        base_problems, architectures[name] = _check_base(project, name)
        problems += base_problems
    for name, run in project.runs.items():
        problems += [f"{project.run_files[name]}: {p} (base {run.base} is {architectures[run.base]})"
                     for p in run.unsupported_on(architectures.get(run.base, ""))]
    merge_names = [m.name for m in f.merges]
    for i, merge in enumerate(f.merges):
        if merge.base not in f.bases:
            problems.append(f"{project.config_file}: merges.{i}.base: '{merge.base}' is not a key of bases")
        for j, lora in enumerate(merge.loras):
            if lora.block_weights is not None and architectures.get(merge.base) == "sdxl":
                problems.append(f"{project.config_file}: merges.{i}.loras.{j}.block_weights: the 25-block vocabulary "
                                f"is SD1/SD2's; base {merge.base} is SDXL (give a ratio only)")
            if lora.run not in project.runs:
                problems.append(f"{project.config_file}: merges.{i}.loras.{j}.run: no run named '{lora.run}' in {project.config_file.parent / 'runs'}")
    for i, extract in enumerate(f.extracts):
        if extract.tuned not in merge_names and extract.tuned not in f.bases:
            problems.append(f"{project.config_file}: extracts.{i}.tuned: '{extract.tuned}' is neither a merge "
                            f"({merge_names}) nor a key of bases ({sorted(f.bases)})")
        if extract.base not in f.bases:
            problems.append(f"{project.config_file}: extracts.{i}.base: '{extract.base}' is not a key of bases")
    for kind, entries in (("resizes", f.resizes), ("svd_merges", f.svd_merges)):
        for i, entry in enumerate(entries):
            runs = [entry.run] if kind == "resizes" else [lora.run for lora in entry.loras]
            problems += [f"{project.config_file}: {kind}.{i}: no run named '{run}' in {project.config_file.parent / 'runs'}"
                         for run in runs if run not in project.runs]
    for kind, names in (("merges", merge_names), ("extracts", [e.name for e in f.extracts]),
                        ("resizes", [r.name for r in f.resizes]), ("svd_merges", [m.name for m in f.svd_merges])):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            problems.append(f"{project.config_file}: {kind}: names used twice: {duplicated}")
    if problems:
        raise ConfigError("\n".join(problems))


def _check_base(project: Project, name: str) -> tuple[list[str], str]:
    """(problems, architecture) of a base: a path base must exist, a pickle needs the opt-in, and a
    safetensors file must have a sound header of a Stable Diffusion checkpoint — all before any job."""
    path, spec = project.base_path(name), project.file.bases[name]
    where = f"{project.config_file}: bases.{name}.path"
    if path is not None and not path.exists():
        return [f"{where}: {path} does not exist (a diffusers folder or a .safetensors file; relative paths "
                "start at the project root)"], ""
    if path is not None and path.suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
        return [f"{where}: {path} is a pickled checkpoint, and loading a pickle can run arbitrary code. "
                f"Convert it to .safetensors, or, if you trust its source, set `allow_pickle: true` under "
                f"bases.{name} in {project.config_file.name} (pickles are then read with torch's "
                "restricted loader, which refuses files that need more than tensors)"], ""
    try:
        return [], _architecture(project, name)
    except HeaderError as e:
        return [f"{where}: {e}"], ""


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers folder's components (one level down)."""
    return sorted(p for p in folder.glob("*/*.safetensors") if p.is_file())


def _architecture(project: Project, name: str) -> str:
    """sd1 | sd2 | sdxl, from the builtin's name, a folder's configs or a checkpoint's header; ""
    for a pickle (only the base_model job can read it). HeaderError when the file is unusable."""
    spec = project.file.bases[name]
    if spec.builtin is not None:
        return BUILTIN_ARCHITECTURES[spec.builtin]
    path = project.base_path(name)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ""
    if path.is_dir():
        for weights in _weight_files(path):
            checkpoint_header.read_header(weights)
        return checkpoint_header.folder_architecture(path)
    arch = checkpoint_header.architecture_of(checkpoint_header.read_header(path).shapes)
    if arch is None:
        raise HeaderError(f"{path}: not a Stable Diffusion 1/2/XL checkpoint in the original single-file "
                          f"layout (looked for keys starting with {checkpoint_header.describe_markers()}); "
                          "a diffusers folder can be given as `path:` instead")
    return arch


def _check_init_weights(project: Project, run: str) -> list[str]:
    """network.init_weights must be a kohya-keyed safetensors network file whose ranks fit the run."""
    network, where = project.runs[run].network, f"{project.run_files[run]}: network.init_weights"
    if network.init_weights is None:
        return []
    path = project.root / network.init_weights
    if not path.is_file():
        return [f"{where}: file {path} does not exist (paths are relative to the project root)"]
    if path.suffix.lower() != ".safetensors":
        return [f"{where}: {path} is not a .safetensors file; a LoRA to continue from is read with safetensors "
                "only (convert a pickled one first)"]
    try:
        shapes = checkpoint_header.read_header(path).shapes
    except HeaderError as e:
        return [f"{where}: {e}"]
    foreign = sorted(k for k in shapes if not k.startswith(checkpoint_header.NETWORK_PREFIXES))
    if not shapes or foreign:
        return [f"{where}: {path} is not a LoRA/LyCORIS file in kohya's key layout (keys "
                f"{', '.join(checkpoint_header.NETWORK_PREFIXES)}…); e.g. {foreign[:3] or 'no keys at all'}"]
    if network.algo in ("lora", "locon") and network.block_dims is None:
        allowed = {network.dim, network.conv_dim or network.dim}
        ranks = sorted({shape[0] for key, shape in shapes.items() if key.endswith(".lora_down.weight")})
        if not ranks or not set(ranks) <= allowed:
            return [f"{where}: {path} has ranks {ranks or 'none (no lora_down weights)'}, but this run trains "
                    f"algo {network.algo} with dim {network.dim}" + (f", conv_dim {network.conv_dim}" if network.conv_dim else "")
                    + ": set network.dim (and conv_dim) to the file's, or start without init_weights"]
    return []
