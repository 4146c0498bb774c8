"""The config vocabulary: pydantic models of a run and of the project file, checked field by field.

`configs/config.yaml` holds `bases`, `datasets`, `defaults` (merged under every run), `samples`,
`merges` and `extracts`; each `configs/runs/<name>.yaml` is one run (defaults ⊕ file). Field names
follow kohya's vocabulary. Unknown keys are refused. Reading the files, sweeps and cross-references
are `lorabake.project`'s; checks that open a checkpoint are `lorabake.checks`'.

Sizes have bounds far past any real setting, each with its reason in the error (lorabake.config_fields,
with `Strict` and `option`); per-block lists use lorabake.unet_blocks' vocabularies.

The bottom floor: this module imports no torch and nothing of lorabake but names, buckets, prompts,
its two helper modules and the optimizer vocabulary (lorabake.optimizers).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorabake import optimizers
from lorabake.config_fields import (MAX_BATCH, MAX_EPOCHS, MAX_PROCESSES, MAX_RANK, MAX_SEED, MAX_STEPS, PROCESSES_WHY,
                                    RANK_WHY, SEED_WHY, SIDE_WHY, STEPS_WHY, Strict, option)
from lorabake.data.buckets import MAX_SIDE, BucketSpec
from lorabake.unet_blocks import _per_block, block_list_problem


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and the key path."""


# ---------------------------------------------------------------- project-level entries

BUILTIN_ARCHITECTURES = {"tiny-sd": "sd1", "tiny-sd2-v": "sd2", "tiny-sdxl": "sdxl", "toy-shapes": "sd1"}
SCORED_BUILTINS = ("toy-shapes",)  # builtins that ship a concept scorer (lorabake.render.scorer)


class BaseSpec(Strict):
    """A base model: an embedded tiny model, or a checkpoint you have (a diffusers folder or a single
    SD1.x / SD2.x / SDXL file), loaded offline with the configs lorabake ships."""

    builtin: Literal["tiny-sd", "tiny-sd2-v", "tiny-sdxl", "toy-shapes"] | None = Field(
        None, description="an embedded tiny model (SD1, SD2 v-prediction or SDXL topology; toy-shapes: SD1, "
                          "pretrained on a world of shapes)")
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
            raise ValueError("give exactly one of builtin (tiny-sd, tiny-sd2-v, tiny-sdxl, toy-shapes) or path")
        if self.builtin is not None and (self.allow_pickle or self.prediction):
            raise ValueError("allow_pickle and prediction apply to path bases only")
        return self


class FolderSettings(Strict):
    """One concept folder's own settings (kohya's dataset subsets)."""

    num_repeats: int | None = option(None, "repeats of this folder's images (default: the number in its name)",
                                     "[[datasets.subsets]] num_repeats", ge=1, most=10_000,
                                     why="real datasets use at most a few hundred repeats; use more epochs instead")
    keep_tokens: int | None = option(None, "this folder's captions.keep_tokens", "[[datasets.subsets]] keep_tokens",
                                     ge=0)
    shuffle: bool | None = option(None, "this folder's captions.shuffle", "[[datasets.subsets]] shuffle_caption")
    caption_prefix: str = option("", "text put before every caption of the folder (a space between)",
                                 "[[datasets.subsets]] caption_prefix")
    caption_suffix: str = option("", "text put after every caption of the folder (a space between)",
                                 "[[datasets.subsets]] caption_suffix")
    loss_weight: float = option(1.0, "multiplies the loss of this folder's images", "[[datasets.subsets]] loss_weight",
                                ge=0.0)
    flip: bool | None = option(None, "this folder's augment.flip: its images are mirrored at random (true) or "
                               "never (false), whatever the run says", "[[datasets.subsets]] flip_aug")


class DatasetSpec(Strict):
    path: str = Field(description="dataset folder, relative to the project root")
    folders: dict[str, FolderSettings] = option(dict, "settings of single folders, by the folder's name as on "
                                                "disk (`10_lbk_star`, `reg/1_shape`)")


# ---------------------------------------------------------------- one training run

class Buckets(Strict):
    enabled: bool = option(True, "sort images into aspect-ratio buckets (off: every image is resized and "
                                 "center-cropped to resolution)", "--enable_bucket")
    min: int = option(256, "smallest bucket side in px", "--min_bucket_reso", ge=64, most=MAX_SIDE, why=SIDE_WHY)
    max: int = option(1024, "largest bucket side in px", "--max_bucket_reso", ge=64, most=MAX_SIDE, why=SIDE_WHY)
    step: int = option(64, "bucket sides are multiples of this", "--bucket_reso_steps", ge=8)
    no_upscale: bool = option(False, "never enlarge an image to reach a bucket: small images get buckets of "
                                     "their own size", "--bucket_no_upscale")

    @model_validator(mode="after")
    def _ordered(self) -> "Buckets":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        if self.step % 8:
            raise ValueError(f"step ({self.step}) must be a multiple of 8 (latents are 1/8 of the image)")
        return self


ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "glora", "diag-oft", "boft")
PRECISIONS = Literal["fp16", "bf16", "fp32"]


class Network(Strict):
    algo: Literal[ALGOS] = option("lora", "network type, from lycoris-lora", "--network_module / network_args algo")
    dim: int = option(8, "rank of the update (network dim)", "--network_dim", ge=1, most=MAX_RANK, why=RANK_WHY)
    alpha: float = option(1.0, "scale: the update is multiplied by alpha / dim", "--network_alpha", gt=0)
    conv_dim: int | None = option(None, "rank for 3×3 convolutions (locon, loha, lokr…); null: convs not trained",
                                  "network_args conv_dim", ge=1, most=MAX_RANK, why=RANK_WHY)
    conv_alpha: float | None = option(None, "alpha for 3×3 convolutions (default: conv_dim)", "network_args conv_alpha", gt=0)
    factor: int = option(-1, "lokr: Kronecker factor (-1: as balanced as the shape allows)", "network_args factor")
    dropout: float = option(0.0, "dropout on the update's output (lora/locon; runs them in lycoris' bypass mode)",
                            "--network_dropout", ge=0.0, lt=1.0)
    rank_dropout: float = option(0.0, "drops ranks of the update per step", "network_args rank_dropout", ge=0.0, lt=1.0)
    module_dropout: float = option(0.0, "skips a whole module's update per step", "network_args module_dropout",
                                   ge=0.0, lt=1.0)
    block_dims: list[int] | None = option(None, "per-block ranks of the UNet: 25 on SD1/SD2 (IN00…IN11, MID, "
                                          "OUT00…OUT11), 23 on SDXL (EMB, IN00…IN08, MID00…MID02, OUT00…OUT08, OUT)",
                                          "network_args block_dims", most=MAX_RANK, why=RANK_WHY)
    block_alphas: list[float] | None = option(None, "per-block alphas (25 on SD1/SD2, 23 on SDXL)",
                                              "network_args block_alphas")
    block_lr_weights: list[float] | None = option(None, "per-block multipliers of the UNet learning rate (25 on "
                                                  "SD1/SD2, 23 on SDXL)",
                                                  "network_args down_lr_weight/mid_lr_weight/up_lr_weight")
    block_lr_zero_threshold: float = option(0.0, "blocks whose lr weight is at or below this get no module at all",
                                            "network_args block_lr_zero_threshold", ge=0.0)
    init_weights: str | None = option(None, "a LoRA file (same algo and dims) to continue from, relative to the project root",
                                      "--network_weights")
    args: dict[str, Any] = option(dict, "further lycoris-lora arguments (use_tucker, use_scalar, constraint, "
                                  "rescaled, block_size, bypass_mode…)", "--network_args")
    train_unet: bool = option(True, "train modules on the UNet", "not --network_train_text_encoder_only")
    train_text_encoder: bool = option(True, "train modules on the text encoder", "not --network_train_unet_only")
    loraplus_lr_ratio: float | None = option(None, "LoRA+ (Hayou et al. 2024): the up matrices learn this many "
                                             "times faster than the down ones (16 is the paper's choice)",
                                             "network_args loraplus_lr_ratio", gt=0)
    loraplus_unet_lr_ratio: float | None = option(None, "LoRA+ ratio of the UNet's modules (default: "
                                                  "loraplus_lr_ratio)", "network_args loraplus_unet_lr_ratio", gt=0)
    loraplus_text_encoder_lr_ratio: float | None = option(None, "LoRA+ ratio of the text encoders' modules "
                                                          "(default: loraplus_lr_ratio)",
                                                          "network_args loraplus_text_encoder_lr_ratio", gt=0)

    def loraplus_ratio(self, part: str) -> float:
        """The LoRA+ multiplier of the up matrices of `part` ("unet" or "text_encoder"); 1 when off."""
        own = self.loraplus_unet_lr_ratio if part == "unet" else self.loraplus_text_encoder_lr_ratio
        return own or self.loraplus_lr_ratio or 1.0

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
        loraplus = self.loraplus_lr_ratio or self.loraplus_unet_lr_ratio or self.loraplus_text_encoder_lr_ratio
        if loraplus and self.algo not in ("lora", "locon"):
            raise ValueError(f"LoRA+ speeds up the up matrices of lora/locon modules; {self.algo} has none "
                             "(drop the loraplus_* keys or train lora/locon)")
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
    text_encoder_2_lr: float | None = option(None, "SDXL's second text encoder's learning rate (default: "
                                             "text_encoder_lr)", "--text_encoder_lr's second value", gt=0)
    args: dict[str, Any] = option(dict, "keyword arguments of the optimizer (weight_decay, betas, decouple, "
                                  "d_coef, use_bias_correction, safeguard_warmup, relative_step…)", "--optimizer_args")

    @model_validator(mode="after")
    def _known_args(self) -> "Optimizer":
        optimizers.check_args(self.type, self.args)
        return self


class Scheduler(Strict):
    type: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                  "adafactor"] = option("constant", "learning-rate schedule (diffusers.optimization; adafactor: "
                                        "the optimizer's own relative step)", "--lr_scheduler")
    warmup: float = option(0.0, "warm-up as a fraction of total steps", "--lr_warmup_steps (as a ratio)", ge=0.0, lt=1.0)
    cycles: int = option(1, "hard restarts of cosine_with_restarts", "--lr_scheduler_num_cycles", ge=1)
    power: float = option(1.0, "exponent of polynomial decay", "--lr_scheduler_power", gt=0)


class Training(Strict):
    epochs: int = option(10, "passes over the data (images × repeats)", "--max_train_epochs", ge=1,
                         most=MAX_EPOCHS, why="real runs take at most a few thousand epochs (a tiny dataset "
                         "with one repeat); stop a run by steps with max_steps")
    max_steps: int | None = option(None, "stop after this many optimizer steps, if fewer than epochs give",
                                   "--max_train_steps", ge=1, most=MAX_STEPS, why=STEPS_WHY)
    batch_size: int = option(1, "images per step (one bucket per batch)", "--train_batch_size", ge=1,
                             most=MAX_BATCH, why="it is per process, and an 80 GB GPU fits a few dozen SDXL "
                             "images; add processes or grad_accum for a larger global batch")
    grad_accum: int = option(1, "batches per optimizer step", "--gradient_accumulation_steps", ge=1,
                             most=MAX_BATCH, why="real runs accumulate at most about a hundred batches per step")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast dtype of the forward pass",
                                                            "--mixed_precision")
    max_grad_norm: float = option(1.0, "clip the gradients' global norm to this before each optimizer step "
                                  "(0: off)", "--max_grad_norm", ge=0.0)
    full_precision: bool = option(False, "train fully in mixed_precision's dtype: the network's weights, "
                                  "gradients and optimizer state are bf16/fp16 too, not fp32 (less memory, "
                                  "coarser updates; fp16 needs a GPU)",
                                  "--full_bf16 / --full_fp16")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory",
                                          "--gradient_checkpointing")
    attention: Literal["sdpa", "eager"] = option("sdpa", "attention kernel: torch scaled_dot_product_attention "
                                                 "or the plain matmul", "--sdpa")
    channels_last: bool = option(False, "keep the UNet's weights and inputs in channels-last memory format (faster "
                                 "convolutions on tensor-core GPUs; the same numbers)")
    compile: bool = option(False, "torch.compile the UNet's forward (the first steps compile, later ones run faster "
                           "on a GPU)", "--torch_compile")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = option(
        "inductor", "torch.compile backend (inductor generates kernels and needs a C++ compiler on the CPU; "
        "aot_eager needs none)", "--dynamo_backend")
    cache_text_encoder_outputs: bool = option(False, "encode each distinct caption once and reuse it, in this run "
                                              "and later ones on the same base (results/cache/text/; the text "
                                              "encoders must be frozen: train_text_encoder false, no pivotal)",
                                              "--cache_text_encoder_outputs(_to_disk)")
    cache_latents: bool | None = option(None, "encode images once (null: yes unless color/crop augmentation "
                                        "needs the pixels each step)", "--cache_latents")
    processes: int = option(1, "data-parallel processes (GPUs, or CPU processes with gloo); batch_size is per "
                            "process, so the global batch is batch_size × processes", "accelerate --num_processes",
                            ge=1, most=MAX_PROCESSES, why=PROCESSES_WHY)
    seed: int = option(42, "seed of everything random; same seed, same bytes on the CPU", "--seed",
                       least=0, most=MAX_SEED, why=SEED_WHY)
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
    type: Literal["l2", "l1", "huber", "smooth_l1"] = option(
        "l2", "the regression loss: squared error, absolute error, or pseudo-Huber (L2 for residuals below "
        "huber_c, linear above; smooth_l1 is the same divided by huber_c)", "--loss_type")
    huber_c: float = option(0.1, "huber / smooth_l1 threshold (per timestep, as huber_schedule says)", "--huber_c",
                            gt=0.0, le=1.0)
    huber_schedule: Literal["constant", "exponential", "snr"] = option(
        "snr", "huber_c per timestep: constant; exponential from 1 at t=0 to huber_c at the last timestep; "
        "snr: (1 − c)/(1 + σ_t)² + c", "--huber_schedule")
    huber_scale: float = option(1.0, "multiplies the constant and exponential schedules' threshold", "--huber_scale",
                                gt=0.0)
    debiased_estimation: bool = option(False, "weight each image's loss by 1/√SNR (ε) or 1/(SNR + 1) (v), "
                                       "SNR capped at 1000 (Yu et al. 2023)", "--debiased_estimation_loss")
    v_pred_like_loss: float | None = option(None, "add this × the loss rescaled as a v-prediction loss",
                                            "--v_pred_like_loss", gt=0.0)
    ip_noise_gamma: float | None = option(None, "input perturbation: noise the latents with noise + γ·ε′ but "
                                          "regress on the noise (Ning et al. 2023; 0.1 is usual)",
                                          "--ip_noise_gamma", gt=0.0)
    ip_noise_gamma_random_strength: bool = option(False, "draw γ uniformly in [0, ip_noise_gamma) each step",
                                                  "--ip_noise_gamma_random_strength")
    zero_terminal_snr: bool = option(False, "rescale the noise schedule so the last timestep is pure noise "
                                     "(Lin et al. 2023; pair it with v-prediction)", "--zero_terminal_snr")
    min_timestep: int = option(0, "the smallest timestep trained", "--min_timestep", ge=0)
    max_timestep: int | None = option(None, "train timesteps below this (default: the scheduler's count, 1000)",
                                      "--max_timestep", ge=1)
    masked: bool = option(False, "masked loss: each latent pixel's loss is multiplied by the image's mask "
                          "(white 1: trained, black 0: ignored), downsampled to the latents", "--masked_loss")
    mask_source: Literal["alpha", "folder"] = option(
        "alpha", "where masks come from: the image's alpha channel (an image without one is trained everywhere, "
        "as kohya does), or a mask image of the same stem in mask_folder", "[[datasets.subsets]] alpha_mask")
    mask_folder: str = option("masks", "with mask_source folder: the folder inside each image folder that holds "
                              "the masks (grayscale, same size and stem as the image, e.g. 10_cat/masks/a.png)",
                              "[[datasets.subsets]] conditioning_data_dir")

    @field_validator("mask_folder")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or name != name.strip() or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"mask_folder must be one folder's name (no slashes, not hidden), got {name!r}")
        return name

    @model_validator(mode="after")
    def _offsets(self) -> "Loss":
        if self.adaptive_noise_scale is not None and self.noise_offset == 0:
            raise ValueError("adaptive_noise_scale needs noise_offset > 0 (it adjusts the offset)")
        if self.noise_offset and self.multires_noise.iterations:
            raise ValueError("noise_offset and multires_noise are exclusive in kohya; choose one")
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"max_timestep ({self.max_timestep}) must be above min_timestep ({self.min_timestep})")
        if self.ip_noise_gamma_random_strength and self.ip_noise_gamma is None:
            raise ValueError("ip_noise_gamma_random_strength needs ip_noise_gamma (the most it draws)")
        if "mask_folder" in self.model_fields_set and self.mask_source != "folder":
            raise ValueError("mask_folder is read only with mask_source: folder (masks now come from the alpha "
                             "channel); set mask_source: folder or drop mask_folder")
        return self

    @property
    def mask_folder_used(self) -> str | None:
        """The folder masks are read from (masked loss with mask_source folder), else None."""
        return self.mask_folder if self.masked and self.mask_source == "folder" else None


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


class EMA(Strict):
    decay: float = option(0.999, "weight of the average per update: ema = decay × ema + (1 − decay) × weights",
                          "OneTrainer ema_decay", gt=0.0, lt=1.0)
    every_n_steps: int = option(1, "update the average every N optimizer steps", "OneTrainer ema_update_step_interval",
                                ge=1)
    start: int = option(0, "optimizer steps before the average starts; until then it copies the weights", ge=0)


class Validation(Strict):
    split: float = option(..., "share of each concept folder's images held out: never trained on, scored "
                          "after epochs", "--validation_split", gt=0.0, lt=1.0)
    seed: int | None = option(None, "seed of the choice of held-out images (default: training.seed)",
                              "--validation_seed", least=0, most=MAX_SEED, why=SEED_WHY)
    every_n_epochs: int = option(1, "score the held-out images after every N-th epoch (and the last)",
                                 "--validate_every_n_epochs", ge=1)


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

    gpu: int = option(0, "GPUs for the train job (SLURM --gres=gpu:N); > 1 also means processes = gpu", ge=0,
                      most=MAX_PROCESSES, why=PROCESSES_WHY)
    mem_mb: int = option(8000, "memory for the train job in MB", ge=100)
    runtime: int = option(240, "wall-clock limit of the train job in minutes", ge=1)
    threads: int = option(1, "CPU threads of the train job (also OMP_NUM_THREADS; bytes depend on it on the CPU)",
                          ge=1)


class RunConfig(Strict):
    base: str = option("tiny", "key of config.yaml bases")
    datasets: list[str] = option(..., "keys of config.yaml datasets", "--train_data_dir", min_length=1)
    resolution: int | tuple[int, int] = option(512, "training size, or [width, height]", "--resolution",
                                               most=MAX_SIDE, why=SIDE_WHY)
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
    ema: EMA | None = option(None, "an exponential moving average of the network, saved beside every "
                             "checkpoint as …-ema.safetensors")
    validation: Validation | None = option(None, "held-out images and their loss per epoch (val_loss in "
                                           "train.jsonl and loss.png)")
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
        if self.buckets.enabled and max(self.size) > self.buckets.max:  # kohya refuses it too
            raise ValueError(f"resolution {self.size[0]}x{self.size[1]} has a side larger than buckets.max "
                             f"({self.buckets.max}): every image would train at most {self.buckets.max} px wide; "
                             "raise buckets.max or lower the resolution")
        pixels = [name for name in ("color", "random_crop") if getattr(self.augment, name)]
        if pixels and self.training.cache_latents:
            raise ValueError(f"augment.{pixels[0]} changes the pixels every step, so latents cannot be cached: "
                             "set training.cache_latents to false (or null), or turn the augmentation off")
        optimizers.check_schedule(self.scheduler.type, self.scheduler.warmup, self.optimizer.type, self.optimizer.args)
        if self.optimizer.type in ("prodigy", "dadapt_adam", "dadapt_lion"):
            opt, weights = self.optimizer, self.network.block_lr_weights or [1.0]
            lrs = {opt.unet_lr or opt.lr, opt.text_encoder_lr or opt.lr, opt.text_encoder_2_lr or opt.text_encoder_lr or opt.lr}
            lrs |= {(opt.unet_lr or opt.lr) * w for w in weights if w}
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
        if self.training.cache_text_encoder_outputs and (self.network.train_text_encoder or self.pivotal):
            raise ValueError("training.cache_text_encoder_outputs reuses the text encoders' outputs, so they must not "
                             "train: set network.train_text_encoder: false (and no pivotal), as kohya requires")
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
        """Options that have no meaning on this architecture: refused, never silently ignored."""
        blocks = [block_list_problem(getattr(self.network, key), f"network.{key}", arch)
                  for key in ("block_dims", "block_alphas", "block_lr_weights")]
        return [problem for problem in blocks if problem] + self._unsupported_options(arch)

    def _unsupported_options(self, arch: str) -> list[str]:
        if arch != "sdxl":
            return [f"optimizer.text_encoder_2_lr is the learning rate of SDXL's second text encoder; a {arch} base "
                    "has one text encoder (use text_encoder_lr)"] if arch and self.optimizer.text_encoder_2_lr else []
        if self.training.clip_skip != 1:  # kohya's SDXL trainers warn that clip_skip does nothing
            return ["training.clip_skip has no meaning for SDXL, which always uses the penultimate layers"]
        return []

    def bucket_spec(self) -> BucketSpec:
        b = self.buckets
        return BucketSpec(self.size, b.enabled, b.min, b.max, b.step, b.no_upscale)
