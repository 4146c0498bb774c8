"""`lorabake import-kohya`: a kohya training config in, a lorabake run config and a migration report out.

Two kinds of input are read:
- a kohya_ss GUI config (`LoRA_type`, `optimizer`, `max_resolution`, `lr_warmup` in percent, …): the JSON
  the GUI's save button writes, or a TOML in the GUI's names (bmaltais/kohya_ss `kohya_gui/lora_gui.py`
  turns it into sd-scripts arguments; that translation is followed here);
- an sd-scripts `--config_file` TOML (argparse names: `network_module`, `network_args`, `optimizer_type`, …;
  top-level tables are flattened as sd-scripts' `read_config_from_file` does), optionally with a
  `--dataset_config` TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`: sd-scripts
  `library/config_util.py`, where a subset's value wins over its dataset's, which wins over `[general]`,
  which wins over the argparse value).

Values are carried over as kohya *used* them, not as they read: GUI percentages become fractions; keys a
TOML leaves out get sd-scripts' default where lorabake's default differs (network_dim 4, no buckets,
`.caption` files…); options kohya silently ignored (`--network_dropout` with LyCORIS, `conv_dim` with the
GUI's "Standard" LoRA) are reported, not switched on. Nothing is guessed: a warm-up given in steps becomes
a fraction only when the run's total step count is known. Every input key ends up either in `mapped`
(kohya key → lorabake key = value) or in `unmapped` with the reason (those whose omission changes
nothing start with "nothing lost: "). The run is validated with `RunConfig`; a single value lorabake
refuses is taken out and reported rather than failing the import. DreamBooth, fine-tuning and
textual-inversion configs, and other model families (FLUX, SD3, …), are refused with a message.
"""
from __future__ import annotations

import ast
import json
import math
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from lorabake import optim, store
from lorabake.config import ALGOS, BLOCKS, LYCORIS_ARGS, OPTIMIZERS, RunConfig


class KohyaImportError(ValueError):
    """A kohya config that cannot be imported; the message names the file (and key) and what to do."""


class _NotCarried(Exception):
    """A well-formed kohya value lorabake has no equivalent for; the message is the reason."""


@dataclass(frozen=True)
class Entry:
    label: str  # the key as its file spells it: "optimizer", "network_args.conv_dim", "datasets[0].resolution"
    value: Any
    file: Path


@dataclass(frozen=True)
class FolderPlan:
    """One kohya image folder and where lorabake wants it: datasets/<dataset>/[reg/]<repeats>_<concept>/."""

    dataset: str
    source: str
    repeats: int
    concept: str
    is_reg: bool = False

    @property
    def target(self) -> str:
        return f"datasets/{self.dataset}/{'reg/' if self.is_reg else ''}{self.repeats}_{self.concept}"


@dataclass
class KohyaImport:
    run: dict[str, Any]  # ready to dump as configs/runs/<name>.yaml
    bases: dict[str, dict[str, Any]]  # suggested configs/config.yaml `bases` entries
    datasets: dict[str, dict[str, Any]]  # suggested configs/config.yaml `datasets` entries
    unmapped: list[tuple[str, Any, str]]  # (kohya key, value, why it is not, or only approximately, carried over)
    notes: list[str]
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)  # (kohya key, lorabake key, value)
    folders: list[FolderPlan] = field(default_factory=list)
    samples: dict[str, Any] | None = None  # a suggested configs/config.yaml `samples` entry
    name: str = "imported"
    sources: tuple[Path, ...] = ()


# ---------------------------------------------------------------- the vocabulary

# kohya key → lorabake key, for every key that is carried over. The GUI's own names (optimizer,
# max_resolution, lr_warmup, epoch, LoRA_type…) are listed beside sd-scripts' argparse names.
# lorabake_key_for and docs/migration.md read this table.
LORABAKE_KEYS: dict[str, str] = {
    "pretrained_model_name_or_path": "bases.<base>.path (configs/config.yaml)",
    "sdxl": "bases.<base> (architecture read from the checkpoint)",
    "v2": "bases.<base> (architecture read from the checkpoint)",
    "v_parameterization": "loss.prediction",
    "train_data_dir": "datasets.<dataset>.path (configs/config.yaml)",
    "reg_data_dir": "datasets/<dataset>/reg/",
    "dataset_config": "datasets, folders and per-dataset settings (read with it)",
    "output_name": "run name (configs/runs/<name>.yaml)",
    "LoRA_type": "network.algo", "network_module": "network.algo", "network_args": "network.*",
    "network_dim": "network.dim", "network_alpha": "network.alpha",
    "conv_dim": "network.conv_dim", "conv_alpha": "network.conv_alpha",
    "network_dropout": "network.dropout", "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout", "factor": "network.factor",
    "block_dims": "network.block_dims", "block_alphas": "network.block_alphas",
    "down_lr_weight": "network.block_lr_weights", "mid_lr_weight": "network.block_lr_weights",
    "up_lr_weight": "network.block_lr_weights", "block_lr_zero_threshold": "network.block_lr_zero_threshold",
    "unit": "network.args.block_size", "use_tucker": "network.args.use_tucker", "use_cp": "network.args.use_tucker",
    "use_scalar": "network.args.use_scalar", "rank_dropout_scale": "network.args.rank_dropout_scale",
    "constrain": "network.args.constraint", "rescaled": "network.args.rescaled",
    "bypass_mode": "network.args.bypass_mode", "train_norm": "network.args.train_norm",
    "dora_wd": "network.args.dora_wd", "decompose_both": "network.args.decompose_both",
    "network_weights": "network.init_weights", "lora_network_weights": "network.init_weights",
    "network_train_unet_only": "network.train_text_encoder (false)",
    "network_train_text_encoder_only": "network.train_unet (false)",
    "optimizer": "optimizer.type", "optimizer_type": "optimizer.type",
    "use_8bit_adam": "optimizer.type", "use_lion_optimizer": "optimizer.type",
    "optimizer_args": "optimizer.args", "learning_rate": "optimizer.lr", "unet_lr": "optimizer.unet_lr",
    "text_encoder_lr": "optimizer.text_encoder_lr",
    "lr_scheduler": "scheduler.type", "lr_warmup": "scheduler.warmup", "lr_warmup_steps": "scheduler.warmup",
    "lr_scheduler_num_cycles": "scheduler.cycles", "lr_scheduler_power": "scheduler.power",
    "epoch": "training.epochs", "max_train_epochs": "training.epochs", "max_train_steps": "training.max_steps",
    "train_batch_size": "training.batch_size", "gradient_accumulation_steps": "training.grad_accum",
    "mixed_precision": "training.mixed_precision", "full_fp16": "training.full_precision",
    "full_bf16": "training.full_precision", "gradient_checkpointing": "training.gradient_checkpointing",
    "xformers": "training.attention", "sdpa": "training.attention", "mem_eff_attn": "training.attention",
    "cache_latents": "training.cache_latents", "seed": "training.seed", "clip_skip": "training.clip_skip",
    "max_token_length": "training.max_token_length",
    "stop_text_encoder_training": "training.stop_text_encoder_at",
    "stop_text_encoder_training_pct": "training.stop_text_encoder_at",
    "num_processes": "training.processes", "num_cpu_threads_per_process": "resources.threads",
    "min_snr_gamma": "loss.min_snr_gamma", "noise_offset": "loss.noise_offset",
    "adaptive_noise_scale": "loss.adaptive_noise_scale", "noise_offset_type": "loss.noise_offset / loss.multires_noise",
    "multires_noise_iterations": "loss.multires_noise.iterations",
    "multires_noise_discount": "loss.multires_noise.discount", "prior_loss_weight": "loss.prior_loss_weight",
    "scale_weight_norms": "loss.scale_weight_norms",
    "caption_extension": "captions.extension", "shuffle_caption": "captions.shuffle",
    "keep_tokens": "captions.keep_tokens", "caption_separator": "captions.separator",
    "caption_dropout_rate": "captions.dropout_rate", "caption_dropout_every_n_epochs": "captions.dropout_every_n_epochs",
    "caption_tag_dropout_rate": "captions.tag_dropout_rate", "weighted_captions": "captions.weighted",
    "flip_aug": "augment.flip", "color_aug": "augment.color", "random_crop": "augment.random_crop",
    "max_resolution": "resolution", "resolution": "resolution", "enable_bucket": "buckets.enabled",
    "min_bucket_reso": "buckets.min", "max_bucket_reso": "buckets.max", "bucket_reso_steps": "buckets.step",
    "bucket_no_upscale": "buckets.no_upscale",
    "save_every_n_epochs": "save.every_n_epochs", "save_every_n_steps": "save.every_n_steps",
    "save_last_n_epochs": "save.keep_last", "save_precision": "save.precision", "save_state": "save.state",
    "sample_prompts": "samples.prompts (configs/config.yaml)", "sample_sampler": "samples.sampler (configs/config.yaml)",
    "batch_size": "training.batch_size", "image_dir": "datasets/<dataset>/<repeats>_<concept>/",
    "num_repeats": "<repeats> in the folder name", "class_tokens": "<concept> in the folder name",
    "is_reg": "datasets/<dataset>/reg/",
}

# The GUI names a few keys differently from sd-scripts (lora_gui.py's config_toml_data says which is which).
GUI_NAMES = {"optimizer": "optimizer_type", "max_resolution": "resolution", "lora_network_weights": "network_weights",
             "lr_warmup": "lr_warmup_pct", "stop_text_encoder_training": "stop_text_encoder_pct",
             "stop_text_encoder_training_pct": "stop_text_encoder_pct"}
SD_SCRIPTS_NAMES = {"caption_extention": "caption_extension"}  # sd-scripts keeps the old misspelling as an alias

# sd-scripts' argparse defaults (library/train_util.py, train_network.py; networks/lora.py for the dim) for
# keys a TOML may leave out. Applied only where they differ from lorabake's default.
SD_SCRIPTS_DEFAULTS: dict[str, Any] = {
    "network_dim": 4, "learning_rate": 2.0e-6, "cache_latents": False, "enable_bucket": False,
    "caption_extension": ".caption", "save_every_n_epochs": None,
    "save_precision": "fp32",  # None: the LoRA is saved in the dtype it trained in, fp32
}
TOTAL_STEPS_DEFAULT = 1600  # sd-scripts' --max_train_steps default, used when no epoch count is given

# Keys whose values apply per dataset or subset in sd-scripts; they come from the dataset TOML's layers
# (subset > dataset > general) or from the main config (the argparse layer).
DATASET_SETTINGS: dict[str, str] = {
    "resolution": "resolution", "batch_size": "training.batch_size", "enable_bucket": "buckets.enabled",
    "min_bucket_reso": "buckets.min", "max_bucket_reso": "buckets.max", "bucket_reso_steps": "buckets.step",
    "bucket_no_upscale": "buckets.no_upscale", "caption_extension": "captions.extension",
    "shuffle_caption": "captions.shuffle", "keep_tokens": "captions.keep_tokens",
    "caption_separator": "captions.separator", "caption_dropout_rate": "captions.dropout_rate",
    "caption_dropout_every_n_epochs": "captions.dropout_every_n_epochs",
    "caption_tag_dropout_rate": "captions.tag_dropout_rate", "flip_aug": "augment.flip",
    "color_aug": "augment.color", "random_crop": "augment.random_crop",
}
MAIN_NAME = {"batch_size": "train_batch_size"}  # the dataset TOML's name → the argparse name
# What a subset gets when no layer sets the key (sd-scripts' argparse defaults).
DATASET_DEFAULTS = {"batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                    "bucket_reso_steps": 64, "bucket_no_upscale": False, "caption_extension": ".caption",
                    "shuffle_caption": False, "keep_tokens": 0, "caption_separator": ",",
                    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
                    "caption_tag_dropout_rate": 0.0, "flip_aug": False, "color_aug": False, "random_crop": False}

OPTIMIZER_NAMES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "lion8bit": "lion8bit",
                   "sgdnesterov": "sgd_nesterov", "sgdnesterov8bit": "sgd_nesterov8bit", "adafactor": "adafactor",
                   "dadaptadam": "dadapt_adam", "dadaptlion": "dadapt_lion", "prodigy": "prodigy"}
PAGED = "bitsandbytes' paged variant only moves optimizer state to the CPU under memory pressure; same update"
OPTIMIZERS_APPROXIMATE = {
    "pagedadamw8bit": ("adamw8bit", PAGED), "pagedlion8bit": ("lion8bit", PAGED),
    "pagedadamw": ("adamw", PAGED), "pagedadamw32bit": ("adamw", PAGED),
    # sd-scripts get_optimizer: "DAdaptation" is DAdaptAdamPreprint, the paper's first version of DAdaptAdam
    "dadaptation": ("dadapt_adam", "kohya's DAdaptation is DAdaptAdamPreprint, an earlier DAdaptAdam"),
    "dadaptadampreprint": ("dadapt_adam", "DAdaptAdamPreprint is an earlier version of DAdaptAdam"),
}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor")
SAMPLERS = {"euler_a": "euler_a", "k_euler_a": "euler_a", "euler": "euler", "k_euler": "euler", "ddim": "ddim"}


@dataclass(frozen=True)
class NetworkKind:
    algo: str
    conv_follows_dim: bool  # LyCORIS: conv_dim/conv_alpha default to network_dim/alpha (lycoris.kohya create_network)
    approximate: str | None = None


MODULES = {
    "networks.lora": NetworkKind("lora", False),
    "networks.lora_fa": NetworkKind("lora", False, "LoRA-FA freezes lora_down and trains lora_up only; lorabake trains both"),
    "networks.dylora": NetworkKind("dylora", False, "sd-scripts' own DyLoRA; lorabake trains LyCORIS' DyLoRA"),
    "networks.loha": NetworkKind("loha", False, "sd-scripts' own LoHa; lorabake trains LyCORIS' (same hada_* factors)"),
    "networks.lokr": NetworkKind("lokr", False, "sd-scripts' own LoKr; lorabake trains LyCORIS' (same lokr_* factors)"),
}
LYCORIS_MODULE = "lycoris.kohya"

# What kohya_ss puts into --network_args for each LoRA_type (lora_gui.py, train_model): (network_module, algo,
# the GUI keys it passes). Keys not listed for a type are not passed, whatever the file says.
KOHYA_BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                    "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
LYCORIS_COMMON = ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                  "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")
OFT_KEYS = ("LyCORIS_preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker", "rank_dropout",
            "rank_dropout_scale", "train_norm")
GUI_NETWORKS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "Standard": ("networks.lora", None, KOHYA_BLOCK_KEYS),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha") + KOHYA_BLOCK_KEYS),
    "LoRA-FA": ("networks.lora_fa", None, KOHYA_BLOCK_KEYS),
    "Kohya DyLoRA": ("networks.dylora", None, ("conv_dim", "conv_alpha", "unit") + KOHYA_BLOCK_KEYS),
    "Kohya LoHa": ("networks.loha", None, ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout")),
    "Kohya LoKr": ("networks.lokr", None, ("conv_dim", "conv_alpha", "use_tucker", "factor", "rank_dropout",
                                           "module_dropout")),
    "LoCon": (LYCORIS_MODULE, "locon", LYCORIS_COMMON),
    "LyCORIS/LoCon": (LYCORIS_MODULE, "locon", LYCORIS_COMMON),
    "LyCORIS/LoHa": (LYCORIS_MODULE, "loha", LYCORIS_COMMON),
    "LyCORIS/LoKr": (LYCORIS_MODULE, "lokr", LYCORIS_COMMON + ("factor", "use_cp", "decompose_both")),
    "LyCORIS/iA3": (LYCORIS_MODULE, "ia3", ("LyCORIS_preset", "conv_dim", "conv_alpha", "train_on_input")),
    "LyCORIS/DyLoRA": (LYCORIS_MODULE, "dylora", ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "unit",
                                                  "rank_dropout", "module_dropout", "train_norm")),
    "LyCORIS/GLoRA": (LYCORIS_MODULE, "glora", OFT_KEYS),
    "LyCORIS/Diag-OFT": (LYCORIS_MODULE, "diag-oft", OFT_KEYS + ("constrain", "rescaled")),
    "LyCORIS/BOFT": (LYCORIS_MODULE, "boft", OFT_KEYS),
    "LyCORIS/Native Fine-Tuning": (LYCORIS_MODULE, "full", ("LyCORIS_preset", "rank_dropout", "module_dropout",
                                                            "rank_dropout_scale", "train_norm")),
}
GUI_NETWORK_KEYS = {key for _, _, keys in GUI_NETWORKS.values() for key in keys} | {"factor", "unit", "use_cp"}
# GUI key → the network_args name it is passed as
GUI_ARG_NAMES = {"LyCORIS_preset": "preset", "constrain": "constraint", "unit": "block_size", "use_cp": "use_tucker"}
TUCKER_ALIASES = ("use_cp", "use_conv_cp")  # older lycoris names of use_tucker

# Why keys without a lorabake equivalent are left out, by group.
NOT_CARRIED: dict[str, tuple[str, ...]] = {
    "nothing lost: kohya_ss / accelerate bookkeeping; lorabake's workflow decides where outputs, logs and caches go": (
        "output_dir", "logging_dir", "log_with", "log_prefix", "log_config", "log_tracker_name", "log_tracker_config",
        "wandb_api_key", "wandb_run_name", "use_wandb", "model_list", "training_comment", "save_model_as",
        "max_data_loader_n_workers", "persistent_data_loader_workers", "vae_batch_size", "cache_latents_to_disk",
        "skip_cache_check", "gpu_ids", "multi_gpu", "num_machines", "main_process_port", "dynamo_backend",
        "dynamo_mode", "dynamo_use_dynamic", "dynamo_use_fullgraph", "extra_accelerate_launch_args", "lowram",
        "highvram", "mem_eff_save", "disable_mmap_load_safetensors", "output_config", "config_file", "debug_dataset",
        "cache_info", "tokenizer_cache_dir", "torch_compile", "ddp_timeout", "ddp_gradient_as_bucket_view",
        "ddp_static_graph", "save_as_bool", "console_log_level", "console_log_file", "console_log_simple"),
    "nothing lost: uploading to the Hugging Face Hub is not part of lorabake": (
        "huggingface_repo_id", "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility",
        "huggingface_path_in_repo", "save_state_to_huggingface", "resume_from_huggingface", "async_upload"),
    "nothing lost: lorabake writes its own ss_* and modelspec.* metadata": (
        "metadata_author", "metadata_description", "metadata_license", "metadata_tags", "metadata_title",
        "no_metadata"),
    "nothing lost: lorabake renders sample grids from the saved checkpoints after training (config.yaml samples)": (
        "sample_every_n_epochs", "sample_every_n_steps", "sample_at_first"),
    "nothing lost: a lorabake rerun resumes from its own saved state (save.state)": (
        "resume", "initial_epoch", "initial_step", "skip_until_initial_step"),
    "nothing lost: lorabake encodes latents with the VAE as loaded, outside autocast (what no_half_vae asks for)": (
        "no_half_vae", "sdxl_no_half_vae"),
    "nothing lost: lorabake decides itself whether to cache text-encoder outputs": (
        "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "sdxl_cache_text_encoder_outputs",
        "text_encoder_batch_size"),
    "not available in lorabake: the run will differ from kohya's here": (
        "ip_noise_gamma", "ip_noise_gamma_random_strength",
        "noise_offset_random_strength", "min_timestep", "max_timestep", "debiased_estimation_loss",
        "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "zero_terminal_snr", "masked_loss", "alpha_mask",
        "fp8_base", "fp8_base_unet", "face_crop_aug_range", "token_warmup_min", "token_warmup_step",
        "caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
        "lr_scheduler_args", "lr_scheduler_type", "lr_decay_steps", "lr_scheduler_min_lr_ratio",
        "lr_scheduler_timescale", "optimizer_schedulefree_wrapper", "schedulefree_wrapper_args",
        "fused_backward_pass", "fused_optimizer_groups", "blockwise_fused_optimizers", "dim_from_weights",
        "base_weights", "base_weights_multiplier", "network_multiplier", "no_token_padding", "save_last_n_steps",
        "save_last_n_epochs_state", "save_last_n_steps_state", "save_state_on_train_end", "save_n_epoch_ratio",
        "vae", "perlin_noise", "resize_interpolation", "validation_seed",
        "validation_split", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
        "custom_attributes", "dataset_repeats", "in_json", "metadata_file", "conditioning_data_dir",
        "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "train_on_input",
        "conv_block_dims", "conv_block_alphas", "wd_on_output"),
}
NOTHING_LOST = "nothing lost: "  # the prefix of reasons for keys whose omission changes nothing
# Values that describe what lorabake does anyway.
LORABAKE_BEHAVIOUR = {"loss_type": "l2", "max_timestep": 1000, "save_model_as": "safetensors"}
SPECIFIC_REASONS = {
    "huber_c": "nothing lost: only used by loss_type huber / smooth_l1",
    "huber_scale": "nothing lost: only used by loss_type huber / smooth_l1",
    "huber_schedule": "nothing lost: only used by loss_type huber / smooth_l1",
    "max_grad_norm": "lorabake does not clip gradients; kohya clipped their norm to this value (0 turns it off)",
    "loss_type": "lorabake trains with the L2 (mean squared error) loss, kohya's l2; huber and smooth_l1 are not available",
    "additional_parameters": "extra sd-scripts flags passed verbatim: carry them over by hand",
    "epoch": "nothing lost: sd-scripts has no --epoch: kohya_ss writes it for its own step count, which max_train_steps carries",
    "num_repeats": "nothing lost: every subset sets its own num_repeats",
    "class_tokens": "nothing lost: every subset sets its own class_tokens",
    "LyCORIS_preset": "lorabake trains kohya's LoRA/LoCon layers (presets/kohya-lora.toml, kohya-locon.toml)",
    "preset": "lorabake trains kohya's LoRA/LoCon layers (presets/kohya-lora.toml, kohya-locon.toml)",
}
# Settings kohya_ss keeps for other model families and tabs; a LoRA on SD1/SD2/SDXL never passes them.
OTHER_FAMILY_PREFIXES = ("flux1_", "flux_", "sd3_", "t5", "clip_l", "clip_g", "ae", "hunyuan", "anima", "lumina",
                         "qwen", "guidance_scale", "discrete_flow_shift", "model_prediction_type", "timestep_sampling",
                         "split_mode", "train_blocks", "apply_t5_attn_mask", "cpu_offload_checkpointing",
                         "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap", "weighting_scheme",
                         "logit_mean", "logit_std", "mode_scale", "enable_scaled_pos_embed", "pos_emb_random_crop_rate",
                         "save_clip", "save_t5xxl", "learning_rate_te", "token_string", "init_word",
                         "num_vectors_per_token", "template", "weights")
GUI_ONLY_KEYS = ("LoRA_type", "max_resolution", "optimizer", "lr_warmup")  # sd-scripts spells these otherwise
NETWORK_KEYS = ("LoRA_type", "network_dim", "network_module", "network_args")
KOHYA_TELLTALES = ("pretrained_model_name_or_path", "network_module", "network_dim", "LoRA_type", "train_data_dir",
                   "optimizer", "optimizer_type", "learning_rate", "max_resolution", "resolution", "output_name")


def lorabake_key_for(kohya_key: str) -> str | None:
    """The lorabake key a kohya key (sd-scripts or kohya_ss GUI name) maps to, or None if it does not map."""
    return LORABAKE_KEYS.get(kohya_key)


# ---------------------------------------------------------------- converting values

def _fail(entry: Entry, expected: str) -> KohyaImportError:
    return KohyaImportError(f"{entry.file}: {entry.label}: expected {expected}, got {entry.value!r}")


def _unset(value: Any) -> bool:
    """Empty in kohya's sense: the GUI writes "" for a field left blank."""
    return value is None or (isinstance(value, str) and not value.strip())


def _off(value: Any) -> bool:
    return _unset(value) or value is False or value == 0 or value in ([], {}) or str(value).lower() == "none"


def _number(entry: Entry) -> float:
    value = entry.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(entry, "a number")


def _integer(entry: Entry) -> int:
    value = _number(entry)
    if not value.is_integer():
        raise _fail(entry, "a whole number")
    return int(value)


def _boolean(entry: Entry) -> bool:
    value = entry.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise _fail(entry, "true or false")


def _text(entry: Entry) -> str:
    if isinstance(entry.value, (dict, list)):
        raise _fail(entry, "a string")
    return str(entry.value).strip()


def _positive_or_none(entry: Entry) -> float | None:
    """kohya_ss passes 0 as "off" (None) for these."""
    return _number(entry) or None


def _count_or_none(entry: Entry) -> int | None:
    return _integer(entry) or None


def _one_of(*allowed: Any, convert: Callable[[Entry], Any] = _text) -> Callable[[Entry], Any]:
    def pick(entry: Entry) -> Any:
        value = convert(entry)
        if value not in allowed:
            raise _NotCarried(f"lorabake takes {', '.join(map(str, allowed))}")
        return value
    return pick


def _save_precision(entry: Entry) -> str:
    value = _text(entry).lower()
    value = {"float": "fp32", "float32": "fp32"}.get(value, value)  # kohya_ss calls fp32 "float"
    if value not in ("fp16", "bf16", "fp32"):
        raise _NotCarried("lorabake saves fp16, bf16 or fp32")
    return value


def _clip_skip(entry: Entry) -> int:
    return _integer(entry) or 1  # kohya_ss passes 0 as None: the last layer, lorabake's 1


def _resolution(entry: Entry) -> int | list[int]:
    """"512", "512,768" (width,height), 512 or [512, 768]; a square becomes one number."""
    value = entry.value
    parts = value if isinstance(value, list) else str(value).split(",")
    try:
        sides = [int(float(str(part).strip())) for part in parts]
    except ValueError:
        raise _fail(entry, '"width,height" or one number') from None
    if len(sides) not in (1, 2):
        raise _fail(entry, '"width,height" or one number')
    return sides[0] if len(set(sides)) == 1 else sides


def _numbers(entry: Entry) -> list[float]:
    """"2,2,4" (kohya_ss), or the list a network_args value "2,2,4" reads as."""
    items = entry.value if isinstance(entry.value, list) else str(entry.value).split(",")
    return [_number(Entry(entry.label, item, entry.file)) for item in items]


def _literal(text: str) -> Any:
    """A network_args / optimizer_args value: sd-scripts reads optimizer args with ast.literal_eval;
    networks read strings and convert them ("True", "4"), which this covers too."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False}.get(lowered, text)
    return list(value) if isinstance(value, tuple) else value


def _key_value_args(entry: Entry, prefix: str) -> list[Entry]:
    """`["k=v", …]` (TOML) or "k=v k=v" (GUI; kohya_ss drops quotes and splits on spaces) as entries."""
    value = entry.value
    items = value.replace('"', "").split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _fail(entry, 'a list of "key=value" strings')
    entries = []
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise _fail(entry, f'"key=value" items (this one is {item!r})')
        entries.append(Entry(f"{prefix}.{key.strip()}", _literal(text.strip()), entry.file))
    return entries


# ---------------------------------------------------------------- the bookkeeping of one import

class _Importer:
    """The input entries, which of them are handled, and the run being built."""

    def __init__(self, entries: dict[str, Entry], flavor: str):
        self.entries = entries  # canonical (sd-scripts) name → entry
        self.flavor = flavor  # "gui" or "sd-scripts"
        self.handled: set[str] = set()  # labels
        self.run: dict[str, Any] = {}
        self.mapped: list[tuple[str, str, Any]] = []
        self.unmapped: list[tuple[str, Any, str]] = []
        self.notes: list[str] = []
        self.bases: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.folders: list[FolderPlan] = []
        self.samples: dict[str, Any] | None = None
        self.total_steps: int | None = None
        self.name = "imported"

    def take(self, name: str) -> Entry | None:
        """The entry for `name`, now handled; None when absent or empty (an empty one is reported)."""
        entry = self.entries.get(name)
        if entry is None or entry.label in self.handled:
            return None
        self.handled.add(entry.label)
        if _unset(entry.value):
            self.unmapped.append((entry.label, entry.value, "nothing lost: empty, not set in kohya"))
            return None
        return entry

    def take_set(self, name: str, convert: Callable[[Entry], Any]) -> tuple[Entry, Any] | None:
        """Like take, for keys where kohya reads 0 as "not set"."""
        entry = self.take(name)
        if entry is None:
            return None
        value = convert(entry)
        if not value:
            self.skip(entry, "nothing lost: 0, not set in kohya")
            return None
        return entry, value

    def value(self, name: str) -> Any:
        """The raw value of a key without handling it (for decisions that depend on it)."""
        entry = self.entries.get(name)
        return None if entry is None or _unset(entry.value) else entry.value

    def set(self, entry: Entry, dotted: str, value: Any, approximate: str | None = None) -> None:
        _put(self.run, dotted, value)
        self.record(entry, dotted, value, approximate)

    def record(self, entry: Entry, lorabake_key: str, value: Any, approximate: str | None = None) -> None:
        self.handled.add(entry.label)
        self.mapped.append((entry.label, lorabake_key, value))
        if approximate:
            self.unmapped.append((entry.label, entry.value, f"approximate: {approximate}"))

    def skip(self, entry: Entry, reason: str) -> None:
        self.handled.add(entry.label)
        self.unmapped.append((entry.label, entry.value, reason))

    def kohya_default(self, key: str, dotted: str) -> None:
        """A key the TOML leaves out, or either file leaves empty (kohya_ss does not pass empty values):
        sd-scripts' default, written where lorabake's default differs."""
        entry = self.entries.get(key)
        absent = entry is None and self.flavor == "sd-scripts"
        if key in SD_SCRIPTS_DEFAULTS and (absent or (entry is not None and _unset(entry.value))):
            value = SD_SCRIPTS_DEFAULTS[key]
            if value != _lorabake_default(dotted):
                _put(self.run, dotted, value)
                self.mapped.append((f"{key} (not set: sd-scripts default)", dotted, value))

    def finish(self) -> None:
        """Every entry nothing mapped goes to unmapped with the reason."""
        for entry in self.entries.values():
            if entry.label not in self.handled:
                self.skip(entry, _reason_not_carried(entry.label.rsplit(".", 1)[-1], entry.value))


def _reason_not_carried(key: str, value: Any) -> str:
    if _off(value):
        return "nothing lost: off or empty in kohya"
    if key in LORABAKE_BEHAVIOUR and LORABAKE_BEHAVIOUR[key] == value:
        return "nothing lost: lorabake does the same"
    if key in SPECIFIC_REASONS:
        return SPECIFIC_REASONS[key]
    group = next((reason for reason, keys in NOT_CARRIED.items() if key in keys), None)
    if group is None and key.startswith(OTHER_FAMILY_PREFIXES):
        group = "nothing lost: a setting of another model family (FLUX, SD3, …) or kohya_ss tab, unused by a LoRA here"
    return group or "no lorabake equivalent (an option of another kohya_ss tab or model family, or unknown)"


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _lorabake_default(dotted: str) -> Any:
    model: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf].get_default(call_default_factory=True)


# ---------------------------------------------------------------- reading the files

def _parse(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KohyaImportError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KohyaImportError(f"{path}: not a text file (expected kohya JSON or TOML)") from None
    suffix = path.suffix.lower()
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text) if suffix == ".toml" else None
    except json.JSONDecodeError as e:
        raise KohyaImportError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except tomllib.TOMLDecodeError as e:
        raise KohyaImportError(f"{path}: not valid TOML ({e})") from None
    if data is None:
        raise KohyaImportError(f"{path}: expected a kohya_ss GUI config (.json) or an sd-scripts config (.toml)")
    if not isinstance(data, dict):
        raise KohyaImportError(f"{path}: the top level must be an object of settings, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> _Importer:
    """The main config as entries under sd-scripts' names (the label keeps the file's own key)."""
    # sd-scripts' read_config_from_file flattens one level of tables away; kohya_ss's TOML settings too
    data = {k: v for key, value in _parse(path).items()
            for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}
    flavor = "gui" if any(key in data for key in GUI_ONLY_KEYS) else "sd-scripts"
    if not any(key in data for key in KOHYA_TELLTALES):
        raise KohyaImportError(f"{path}: does not look like a kohya config: it has none of "
                               f"{', '.join(KOHYA_TELLTALES)}")
    if not any(key in data for key in NETWORK_KEYS):
        raise KohyaImportError(f"{path}: not a LoRA config (it has none of {', '.join(NETWORK_KEYS)}): a DreamBooth, "
                               "fine-tuning or textual-inversion config? lorabake trains LoRA / LyCORIS networks; "
                               "import the config of kohya_ss's LoRA tab or of train_network.py")
    family = next((key for key, value in data.items() if key.endswith("_checkbox") and value is True), None)
    if family is not None:
        raise KohyaImportError(f"{path}: {family} is on: that model family is not one lorabake trains (SD1, SD2, SDXL)")
    renames = GUI_NAMES if flavor == "gui" else SD_SCRIPTS_NAMES
    entries: dict[str, Entry] = {}
    for key, value in data.items():
        name = renames.get(key, key)
        entries[key if name in entries else name] = Entry(key, value, path)
    return _Importer(entries, flavor)


@dataclass
class _Subset:
    """One sd-scripts subset: its layers, most specific first (subset, dataset, general, main config)."""

    dataset: int
    layers: list[dict[str, Entry]]
    own: dict[str, Entry]


def _table_entries(table: dict[str, Any], prefix: str, path: Path, skip: str = "") -> dict[str, Entry]:
    return {key: Entry(f"{prefix}{key}", value, path) for key, value in table.items() if key != skip}


def _read_dataset_toml(path: Path, main: dict[str, Entry]) -> list[_Subset]:
    data = _parse(path)
    if path.suffix.lower() != ".toml":
        raise KohyaImportError(f"{path}: a dataset config is a TOML file (sd-scripts --dataset_config)")
    general = data.get("general", {})
    datasets = data.get("datasets")
    if not isinstance(general, dict):
        raise KohyaImportError(f"{path}: general: must be a table ([general])")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise KohyaImportError(f"{path}: datasets: needs at least one [[datasets]] table")
    general_layer = _table_entries(general, "general.", path)
    subsets = []
    for i, dataset in enumerate(datasets):
        members = dataset.get("subsets")
        if not isinstance(members, list) or not members or not all(isinstance(s, dict) for s in members):
            raise KohyaImportError(f"{path}: datasets[{i}].subsets: needs at least one [[datasets.subsets]] table")
        dataset_layer = _table_entries(dataset, f"datasets[{i}].", path, skip="subsets")
        for j, subset in enumerate(members):
            own = _table_entries(subset, f"datasets[{i}].subsets[{j}].", path)
            subsets.append(_Subset(i, [own, dataset_layer, general_layer, main], own))
    return subsets


def _all_dataset_entries(subsets: list[_Subset]) -> dict[str, Entry]:
    """Every entry of the dataset TOML (the main-config layer left out), by label."""
    return {e.label: e for subset in subsets for layer in subset.layers[:3] for e in layer.values()}


# ---------------------------------------------------------------- model, run name, datasets

def _entry_name(text: str, fallback: str) -> str:
    """A config.yaml key from a path or name: its last part, without the file suffix."""
    last = re.split(r"[\\/]", text.strip().rstrip("\\/"))[-1]
    last = re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", last, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", last).strip("-._")
    return name or fallback


def _map_model(imp: _Importer) -> None:
    entry = imp.take("pretrained_model_name_or_path")
    if entry is None:
        name = "base"
        imp.notes.append("The config names no base model: add bases.base to configs/config.yaml, or edit `base:`.")
    else:
        path = _text(entry)
        name = _entry_name(path, "base")
        imp.bases[name] = {"path": path}
        imp.record(entry, f"bases.{name}.path", path)
        _note_model_path(imp, name, path)
    imp.run["base"] = name
    for key, architecture in (("sdxl", "SDXL"), ("v2", "SD2")):
        flag = imp.take(key)
        if flag is not None and _boolean(flag):
            imp.record(flag, f"bases.{name}", f"{architecture} (read from the checkpoint)")
        elif flag is not None:
            imp.skip(flag, "nothing lost: off in kohya")
    v_param = imp.take("v_parameterization")
    if v_param is not None:  # kohya trains the epsilon target unless told otherwise, whatever the base
        imp.set(v_param, "loss.prediction", "v_prediction" if _boolean(v_param) else "epsilon")


def _note_model_path(imp: _Importer, name: str, path: str) -> None:
    if path.lower().endswith(".ckpt"):
        imp.notes.append(f"bases.{name}: {path} is a pickled .ckpt; lorabake refuses those unless the base entry "
                         "says `allow_pickle: true` (a .safetensors copy is safer).")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).exists():
        imp.notes.append(f"bases.{name}: '{path}' looks like a Hugging Face repo id; lorabake loads bases offline: "
                         "download it first and point `path` at the folder or .safetensors file.")


def _run_name(imp: _Importer, config: Path) -> str:
    entry = imp.take("output_name")
    name = _entry_name(_text(entry), "") if entry is not None else ""
    name = name or _entry_name(config.stem, "imported")
    if entry is not None:
        imp.record(entry, "run name (configs/runs/<name>.yaml)", name)
    return name


def _dataset_names(imp: _Importer, subsets: list[_Subset]) -> list[str]:
    count = max(s.dataset for s in subsets) + 1
    return [imp.name] if count == 1 else [f"{imp.name}-{i + 1}" for i in range(count)]


def _map_datasets(imp: _Importer, subsets: list[_Subset], base_dir: Path, from_toml: bool) -> None:
    names = _dataset_names(imp, subsets)
    for name in names:
        imp.datasets[name] = {"path": f"datasets/{name}"}
    imp.run["datasets"] = names
    for key, dotted in DATASET_SETTINGS.items():
        _map_dataset_setting(imp, subsets, key, dotted)
    if from_toml:
        for key in ("train_data_dir", "reg_data_dir"):
            entry = imp.take(key)
            if entry is not None:
                imp.skip(entry, "nothing lost: sd-scripts ignores it when a dataset config is given")
        _plan_subset_folders(imp, subsets, names)
    else:
        _plan_kohya_folders(imp, names[0], base_dir)


def _in_layers(subset: _Subset, key: str) -> list[Entry]:
    """The subset's entries for `key`, most specific first (the main config spells some keys differently)."""
    names = [key, key, key, MAIN_NAME.get(key, key)]
    return [layer[name] for layer, name in zip(subset.layers, names) if name in layer]


def _layered(subset: _Subset, key: str) -> Entry | None:
    """The entry sd-scripts would use for `key` in this subset: the most specific layer that sets it."""
    return next((entry for entry in _in_layers(subset, key) if not _unset(entry.value)), None)


def _map_dataset_setting(imp: _Importer, subsets: list[_Subset], key: str, dotted: str) -> None:
    """One run-level setting from per-subset values: carried over when every subset agrees on it."""
    convert = _SETTING_CONVERTERS.get(key, _boolean)
    chosen = [_layered(s, key) for s in subsets]
    present = {e.label: e for subset in subsets for e in _in_layers(subset, key)}
    used = {e.label: e for e in chosen if e is not None}
    values = [convert(e) if e is not None else DATASET_DEFAULTS.get(key) for e in chosen]
    distinct = list(dict.fromkeys(json.dumps(v) for v in values))
    if not used:
        imp.kohya_default(key, dotted)
    elif len(distinct) == 1:
        value, approximate = _fit(key, values[0])
        for entry in used.values():
            imp.set(entry, dotted, value, approximate)
    else:
        shown = ", ".join(distinct)
        for entry in used.values():
            imp.skip(entry, f"the subsets disagree ({shown}); lorabake applies one {dotted} to the whole run, "
                            "left at its default: set it in the run file")
    for label, entry in present.items():
        if label not in used and label not in imp.handled:
            imp.skip(entry, "nothing lost: empty, not set in kohya" if _unset(entry.value)
                     else "nothing lost: every subset takes this from a more specific table")


def _fit(key: str, value: Any) -> tuple[Any, str | None]:
    """lorabake's latents are 1/8 of the image, so it wants resolutions in multiples of 8; kohya resizes."""
    if key != "resolution":
        return value, None
    sides = [value] if isinstance(value, int) else value
    fitted = [max(64, side - side % 8) for side in sides]
    if fitted == sides:
        return value, None
    return (fitted[0] if len(fitted) == 1 else fitted), f"rounded down to multiples of 8: {fitted}"


def _caption_extension(entry: Entry) -> str:
    value = _text(entry)
    return value if value.startswith(".") else f".{value}"


_SETTING_CONVERTERS: dict[str, Callable[[Entry], Any]] = {
    "resolution": _resolution, "batch_size": _integer, "min_bucket_reso": _integer, "max_bucket_reso": _integer,
    "bucket_reso_steps": _integer, "caption_extension": _caption_extension, "keep_tokens": _integer,
    "caption_separator": _text, "caption_dropout_rate": _number, "caption_dropout_every_n_epochs": _integer,
    "caption_tag_dropout_rate": _number,
}


def _concept(image_dir: str) -> str:
    """The folder's name without a kohya `<repeats>_` prefix."""
    last = re.split(r"[\\/]", image_dir.strip().rstrip("\\/"))[-1]
    match = re.fullmatch(r"\d+_(.+)", last)
    return match.group(1) if match else last


def _plan_subset_folders(imp: _Importer, subsets: list[_Subset], names: list[str]) -> None:
    for subset in subsets:
        image_dir = subset.own.get("image_dir")
        if image_dir is None or _unset(image_dir.value):
            if "metadata_file" in subset.own:
                imp.skip(subset.own["metadata_file"], "fine-tuning datasets (captions in a metadata JSON) are not "
                         "supported: lorabake reads <repeats>_<concept>/ folders with caption files beside the images")
            continue
        repeats, tokens = _layered(subset, "num_repeats"), _layered(subset, "class_tokens")
        is_reg = subset.own.get("is_reg")
        plan = FolderPlan(names[subset.dataset], _text(image_dir),
                          _integer(repeats) if repeats else 1,  # sd-scripts' default num_repeats
                          _text(tokens) if tokens else _concept(_text(image_dir)),
                          bool(is_reg and _boolean(is_reg)))
        imp.folders.append(plan)
        imp.record(image_dir, "folder", plan.target)
        for entry, what in ((repeats, "<repeats> of"), (tokens, "<concept> of")):
            if entry is not None:
                imp.record(entry, f"{what} {plan.target}", entry.value)
        if is_reg is not None and plan.is_reg:
            imp.record(is_reg, "reg/ folder", plan.target)
        elif is_reg is not None:
            imp.skip(is_reg, "nothing lost: off in kohya")


def _local_dir(text: str, base_dir: Path) -> Path | None:
    """A kohya path as a folder on this machine: as given, or relative to the config's folder."""
    for candidate in (Path(text), base_dir / text):
        if candidate.is_dir():
            return candidate
    return None


def _plan_kohya_folders(imp: _Importer, dataset: str, base_dir: Path) -> None:
    """train_data_dir / reg_data_dir are parents of kohya's <repeats>_<concept> folders already."""
    for key, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
        entry = imp.take(key)
        if entry is None:
            if not is_reg:
                imp.notes.append(f"The config names no train_data_dir: put the images into datasets/{dataset}/"
                                 "<repeats>_<concept>/ folders.")
            continue
        where = f"datasets/{dataset}/reg/" if is_reg else f"datasets/{dataset}/"
        imp.record(entry, f"datasets.{dataset}.path" if not is_reg else where, where)
        folder = _local_dir(_text(entry), base_dir)
        if folder is None:
            imp.notes.append(f"{key} {_text(entry)} is not on this machine: copy its <repeats>_<concept> folders "
                             f"into {where}")
            continue
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            match = re.fullmatch(r"(\d+)_(.+)", sub.name)
            if match:
                imp.folders.append(FolderPlan(dataset, str(sub), int(match.group(1)), match.group(2), is_reg))
            else:
                imp.notes.append(f"{sub}: kohya skips folders without a <repeats>_ prefix; so does this import")


# ---------------------------------------------------------------- the network

def _network_source(imp: _Importer) -> tuple[Entry | None, str, str | None, dict[str, Entry]]:
    """(the entry naming the network, network_module, algo from the config, network args by name)."""
    if imp.flavor == "gui":
        return _gui_network(imp)
    module_entry = imp.take("network_module")
    module = _text(module_entry) if module_entry else "networks.lora"  # train_network.py's default
    args: dict[str, Entry] = {}
    args_entry = imp.take("network_args")
    if args_entry is not None:
        imp.record(args_entry, "network.* (item by item below)", args_entry.value)
        for arg in _key_value_args(args_entry, "network_args"):
            name = arg.label.split(".", 1)[1]
            imp.entries[arg.label] = arg
            args["use_tucker" if name in TUCKER_ALIASES else name] = arg
    algo = args.pop("algo", None)
    if algo is not None:
        imp.record(algo, "network.algo", str(algo.value).lower())
    return module_entry, module, str(algo.value).lower() if algo else None, args


def _gui_network(imp: _Importer) -> tuple[Entry | None, str, str | None, dict[str, Entry]]:
    entry = imp.take("LoRA_type")
    lora_type = _text(entry) if entry else "Standard"
    if lora_type not in GUI_NETWORKS:
        raise KohyaImportError(f"{entry.file}: LoRA_type: '{lora_type}' is not a network lorabake can train "
                               f"(SD1/SD2/SDXL with {', '.join(GUI_NETWORKS)})")
    module, algo, passed = GUI_NETWORKS[lora_type]
    args = {}
    for key in passed:
        arg = imp.take(key)
        if arg is not None:
            args[GUI_ARG_NAMES.get(key, key)] = arg
    for key in sorted(GUI_NETWORK_KEYS - set(passed)):
        if key in imp.entries and imp.entries[key].label not in imp.handled:
            imp.skip(imp.entries[key], "nothing lost: off or empty in kohya" if _off(imp.entries[key].value)
                     else f"nothing lost: kohya_ss does not pass it for LoRA_type {lora_type}")
    return entry, module, algo, args


def _network_kind(entry: Entry | None, module: str, algo: str | None) -> NetworkKind:
    where = f"{entry.file}: {entry.label}" if entry else "network_module"
    if module == LYCORIS_MODULE:
        algo = algo or "lora"  # lycoris.kohya's default algo
        if algo not in ALGOS:
            raise KohyaImportError(f"{where}: LyCORIS algo '{algo}' is not one lorabake trains ({', '.join(ALGOS)})")
        return NetworkKind(algo, True)
    if module not in MODULES:
        raise KohyaImportError(f"{where}: network module '{module}' is not one lorabake can train: use "
                               f"networks.lora or lycoris.kohya ({', '.join(ALGOS)})")
    return MODULES[module]


def _map_network(imp: _Importer) -> None:
    entry, module, algo, args = _network_source(imp)
    kind = _network_kind(entry, module, algo)
    if entry is not None:
        imp.set(entry, "network.algo", kind.algo, kind.approximate)
    else:
        _put(imp.run, "network.algo", kind.algo)
    dim, alpha = _map_dim_alpha(imp)
    _map_conv(imp, kind, args, dim, alpha)
    _map_dropouts(imp, kind, args)
    _map_blocks(imp, kind, args)
    if kind.conv_follows_dim or kind.algo != "lora":  # networks.lora reads none of LyCORIS' options
        _map_lycoris_args(imp, args)
    for name, arg in args.items():  # what the mappers above did not consume
        imp.skip(arg, _reason_not_carried(name, arg.value))


def _map_dim_alpha(imp: _Importer) -> tuple[int, float]:
    entry = imp.take("network_dim")
    if entry is not None:
        dim = _integer(entry)
        imp.set(entry, "network.dim", dim)
    else:
        imp.kohya_default("network_dim", "network.dim")
        dim = imp.run.get("network", {}).get("dim", _lorabake_default("network.dim"))
    entry = imp.take("network_alpha")
    alpha = _number(entry) if entry is not None else 1.0  # sd-scripts' --network_alpha default, lorabake's too
    if entry is not None and alpha == 0:
        # kohya_ss does not pass a 0, so sd-scripts' default 1 applies; a 0 that reaches LoRAModule means alpha = dim
        alpha = 1.0 if imp.flavor == "gui" else float(dim)
    if entry is not None:
        imp.set(entry, "network.alpha", alpha)
    return dim, alpha


def _map_conv(imp: _Importer, kind: NetworkKind, args: dict[str, Entry], dim: int, alpha: float) -> None:
    """kohya's networks train 3×3 convolutions only when conv_dim is given (conv_alpha then defaults to 1);
    lycoris.kohya defaults conv_dim/conv_alpha to network_dim/alpha when network_args leave them out.
    conv_dim 0 means no convolutions; conv_alpha 0 means alpha = conv_dim (LoRAModule), lorabake's default."""
    dim_entry, alpha_entry = args.pop("conv_dim", None), args.pop("conv_alpha", None)
    conv_dim = _integer(dim_entry) if dim_entry is not None else (dim if kind.conv_follows_dim else 0)
    if not conv_dim:
        if dim_entry is not None:
            imp.skip(dim_entry, "approximate: 0 trains no 3×3 convolutions; LyCORIS' preset still trains the ResNet "
                     "blocks' linear layers, lorabake then trains kohya's LoRA layers" if kind.conv_follows_dim
                     else "nothing lost: 0, 3×3 convolutions are not trained, as in kohya")
        if alpha_entry is not None:
            imp.skip(alpha_entry, "nothing lost: only used with conv_dim")
        return
    conv_alpha = _number(alpha_entry) if alpha_entry is not None else (alpha if kind.conv_follows_dim else 1.0)
    for entry, dotted, value in ((dim_entry, "network.conv_dim", conv_dim),
                                 (alpha_entry, "network.conv_alpha", conv_alpha or None)):
        if entry is not None:
            imp.set(entry, dotted, value)
        elif value is not None:
            _put(imp.run, dotted, value)
            default_of = "LyCORIS: network_" + dotted.split("_")[-1] if kind.conv_follows_dim else "networks.lora: 1"
            imp.mapped.append((f"{dotted.split('.')[1]} (not set: {default_of})", dotted, value))


def _map_dropouts(imp: _Importer, kind: NetworkKind, args: dict[str, Entry]) -> None:
    """--network_dropout reaches LyCORIS as its `dropout` unless network_args set one (train_network.py's
    "workaround for LyCORIS"); lycoris-lora applies it, and rank_dropout, only in some module types."""
    entry = imp.take("network_dropout")
    arg = args.pop("dropout", None) if kind.conv_follows_dim else None
    if arg is not None and entry is not None:
        imp.skip(entry, "nothing lost: network_args dropout overrides it (sd-scripts)")
    source = arg or entry
    if source is not None:
        _set_dropout(imp, kind, source, "dropout", ("lora", "locon"))
    for name, algos in (("rank_dropout", ("lora", "locon", "loha", "lokr", "glora")), ("module_dropout", ALGOS)):
        if name in args:
            _set_dropout(imp, kind, args.pop(name), name, algos)
    if "factor" in args:
        item = args.pop("factor")
        imp.set(item, "network.factor", _integer(item))


def _set_dropout(imp: _Importer, kind: NetworkKind, entry: Entry, name: str, algos: tuple[str, ...]) -> None:
    """lycoris-lora reads each dropout in some module types only (lorabake refuses it elsewhere)."""
    if not _number(entry) or kind.algo in algos:
        imp.set(entry, f"network.{name}", _number(entry))
    elif kind.conv_follows_dim:
        imp.skip(entry, f"nothing lost: lycoris-lora applies {name} in {', '.join(algos)} modules only, so kohya's "
                        f"{kind.algo} ignored it")
    else:
        imp.skip(entry, f"lorabake trains LyCORIS' {kind.algo}, which has no {name} (it does in {', '.join(algos)}); "
                        "kohya's own module used it: consider module_dropout")


def _map_lycoris_args(imp: _Importer, args: dict[str, Entry]) -> None:
    for name in sorted(set(args) & LYCORIS_ARGS):
        entry = args.pop(name)
        if _off(entry.value):
            imp.skip(entry, "nothing lost: off, LyCORIS' default")
        elif name in ("constraint", "block_size"):
            imp.set(entry, f"network.args.{name}", _number(entry) if name == "constraint" else _integer(entry))
        else:
            imp.set(entry, f"network.args.{name}", _boolean(entry))
    preset = args.pop("preset", None)
    if preset is not None:
        imp.skip(preset, "approximate: " + SPECIFIC_REASONS["preset"] + "; LyCORIS' 'full' preset also trains "
                 "conv_in, conv_out and the time embedding")


def _map_blocks(imp: _Importer, kind: NetworkKind, args: dict[str, Entry]) -> None:
    """kohya's per-block options (networks.lora, 25 blocks on SD1/SD2; SDXL has its own 23)."""
    if kind.conv_follows_dim:
        return
    sdxl = imp.value("sdxl") in (True, "true", "True")
    for name, dotted in (("block_dims", "network.block_dims"), ("block_alphas", "network.block_alphas")):
        entry = args.pop(name, None)
        if entry is None:
            continue
        values = _numbers(entry)
        if len(values) != len(BLOCKS) or sdxl:
            imp.skip(entry, f"{len(values)} values: lorabake's block options use the 25 SD1 blocks (IN00–OUT11); "
                            "kohya's SDXL layout has 23")
            continue
        imp.set(entry, dotted, [int(v) for v in values] if name == "block_dims" else values)
    weights = {part: args.pop(f"{part}_lr_weight", None) for part in ("down", "mid", "up")}
    if any(weights.values()):
        _map_block_lr_weights(imp, weights, sdxl)
    if "block_lr_zero_threshold" in args:
        entry = args.pop("block_lr_zero_threshold")
        imp.set(entry, "network.block_lr_zero_threshold", _number(entry))


def _lr_weight_list(entry: Entry | None, count: int) -> list[float]:
    """kohya's get_block_lr_weight: numbers (missing ones 1.0) or a named curve over the blocks, "+x" added."""
    if entry is None:
        return [1.0] * count
    text = str(entry.value).strip()
    name, _, offset = text.partition("+")
    curves: dict[str, Callable[[int], float]] = {
        "cosine": lambda i: math.sin(math.pi * ((count - 1 - i) / (count - 1)) / 2),
        "sine": lambda i: math.sin(math.pi * (i / (count - 1)) / 2),
        "linear": lambda i: i / (count - 1),
        "reverse_linear": lambda i: (count - 1 - i) / (count - 1),
        "zeros": lambda i: 0.0,
    }
    if name in curves:
        base = _number(Entry(entry.label, offset, entry.file)) if offset else 0.0
        return [curves[name](i) + base for i in range(count)]
    values = _numbers(entry)[:count]
    return values + [1.0] * (count - len(values))


def _map_block_lr_weights(imp: _Importer, weights: dict[str, Entry | None], sdxl: bool) -> None:
    present = [e for e in weights.values() if e is not None]
    if sdxl:
        for entry in present:
            imp.skip(entry, "lorabake's block options use the 25 SD1 blocks; kohya's SDXL layout has 23")
        return
    combined = _lr_weight_list(weights["down"], 12) + _lr_weight_list(weights["mid"], 1) + _lr_weight_list(weights["up"], 12)
    for entry in present:
        imp.set(entry, "network.block_lr_weights", [round(w, 6) for w in combined])


# ---------------------------------------------------------------- optimizer and schedule

def _optimizer_type(imp: _Importer) -> tuple[Entry | None, str | None]:
    entry = imp.take("optimizer_type")
    flags = {name: imp.take(name) for name in ("use_8bit_adam", "use_lion_optimizer")}
    if entry is None:  # sd-scripts get_optimizer: the old flags, else AdamW
        flag = next((e for e in flags.values() if e is not None and _boolean(e)), None)
        if flag is not None:
            chosen = "adamw8bit" if flag.label == "use_8bit_adam" else "lion"
            imp.set(flag, "optimizer.type", chosen)
            return flag, chosen
        return None, "adamw"
    name = _text(entry).lower()
    if name in OPTIMIZER_NAMES:
        imp.set(entry, "optimizer.type", OPTIMIZER_NAMES[name])
        return entry, OPTIMIZER_NAMES[name]
    if name in OPTIMIZERS_APPROXIMATE:
        chosen, why = OPTIMIZERS_APPROXIMATE[name]
        imp.set(entry, "optimizer.type", chosen, why)
        return entry, chosen
    imp.skip(entry, f"lorabake has no {entry.value}: choose one of {', '.join(OPTIMIZERS)} (optimizer.type)")
    return entry, None


def _map_optimizer(imp: _Importer) -> None:
    _, optimizer = _optimizer_type(imp)
    args_entry = imp.take("optimizer_args")
    args = _key_value_args(args_entry, "optimizer_args") if args_entry is not None else []
    if args_entry is not None:
        imp.record(args_entry, "optimizer.args (item by item below)", args_entry.value)
    chosen: dict[str, Any] = {}
    for arg in args:
        imp.entries[arg.label] = arg
        name = arg.label.split(".", 1)[1]
        if optimizer is None:
            imp.skip(arg, "the optimizer was not carried over")
            continue
        try:  # lorabake's own check: the optimizer class must take the argument
            optim.check_args(optimizer, {**chosen, name: arg.value})
        except ValueError as e:
            imp.skip(arg, f"lorabake refuses it: {e}")
            continue
        chosen[name] = arg.value
        imp.set(arg, f"optimizer.args.{name}", arg.value)
    if optimizer == "adafactor":
        _adafactor_relative_step(imp, chosen)
    _map_learning_rates(imp, optimizer)


def _adafactor_relative_step(imp: _Importer, args: dict[str, Any]) -> None:
    """kohya turns relative_step on unless told otherwise and then switches to its adafactor schedule."""
    relative = args.get("relative_step", True)
    if relative and args.get("relative_step") is None:
        imp.notes.append("Adafactor: relative_step is on (kohya's default): Adafactor computes its own step size "
                         "and learning_rate only seeds it; the schedule is Adafactor's own.")
    if relative:
        entry = imp.take("lr_scheduler")
        if entry is not None and _text(entry) != "adafactor":
            imp.set(entry, "scheduler.type", "adafactor",
                    "kohya replaces the schedule by its adafactor schedule when relative_step is on")
        else:
            _put(imp.run, "scheduler.type", "adafactor")
            if entry is not None:
                imp.record(entry, "scheduler.type", "adafactor")


ADAPTIVE = ("prodigy", "dadapt_adam", "dadapt_lion")


def _map_learning_rates(imp: _Importer, optimizer: str | None) -> None:
    lr_entry, unet, te = imp.take("learning_rate"), imp.take("unet_lr"), imp.take("text_encoder_lr")
    lr = _number(lr_entry) if lr_entry is not None else None
    rates = {"unet_lr": (unet, _number(unet) if unet else 0.0), "text_encoder_lr": (te, _text_encoder_lr(imp, te))}
    unet_lr, te_lr = rates["unet_lr"][1], rates["text_encoder_lr"][1]
    if imp.flavor == "gui":  # lora_gui.py resolve_network_train_flags: a zero rate switches that part off
        for entry, rate, other, dotted in ((te, te_lr, unet_lr, "network.train_text_encoder"),
                                           (unet, unet_lr, te_lr, "network.train_unet")):
            if entry is not None and rate == 0 and other != 0:
                imp.set(entry, dotted, False)
    _train_only_flags(imp)
    if optimizer in ADAPTIVE and len({unet_lr or lr, te_lr or lr}) > 1:
        lr = _one_adaptive_rate(imp, optimizer, rates, lr)
    if lr_entry is not None:
        imp.set(lr_entry, "optimizer.lr", lr)
    elif lr is not None:
        _put(imp.run, "optimizer.lr", lr)
    else:
        imp.kohya_default("learning_rate", "optimizer.lr")
    for name, (entry, rate) in rates.items():
        if entry is None or _accounted(imp, entry):
            continue
        if rate:
            imp.set(entry, f"optimizer.{name}", rate)
        else:
            imp.skip(entry, "nothing lost: 0, not set in kohya (learning_rate applies)")


def _accounted(imp: _Importer, entry: Entry) -> bool:
    return any(row[0] == entry.label for row in imp.mapped) or any(row[0] == entry.label for row in imp.unmapped)


def _text_encoder_lr(imp: _Importer, entry: Entry | None) -> float:
    """sd-scripts takes one rate per text encoder (a list on SDXL); lorabake has one."""
    if entry is None:
        return 0.0
    if not isinstance(entry.value, list):
        return _number(entry)
    rates = [_number(Entry(entry.label, v, entry.file)) for v in entry.value]
    if len(set(rates)) > 1:
        imp.notes.append(f"text_encoder_lr {rates}: lorabake trains both text encoders at {rates[0]}")
    return rates[0] if rates else 0.0


def _train_only_flags(imp: _Importer) -> None:
    for key, dotted in (("network_train_unet_only", "network.train_text_encoder"),
                        ("network_train_text_encoder_only", "network.train_unet")):
        entry = imp.take(key)
        if entry is not None and _boolean(entry):
            imp.set(entry, dotted, False)
        elif entry is not None:
            imp.skip(entry, "nothing lost: off in kohya")


def _one_adaptive_rate(imp: _Importer, optimizer: str, rates: dict[str, tuple[Entry | None, float]],
                       lr: float | None) -> float:
    """Prodigy and D-Adaptation estimate one step size; with several rates kohya warns that only the first
    param group's counts (the text encoder's, when it trains: networks/lora.py prepare_optimizer_params),
    and lorabake asks for one rate, so the run gets that one."""
    base = lr if lr is not None else SD_SCRIPTS_DEFAULTS["learning_rate"]
    trains_te = imp.run.get("network", {}).get("train_text_encoder", True)
    first = (rates["text_encoder_lr"][1] or base) if trains_te else (rates["unet_lr"][1] or base)
    for entry, _ in rates.values():
        if entry is not None and not _accounted(imp, entry):
            imp.skip(entry, f"approximate: {optimizer} takes one learning rate; kohya used the first param "
                            f"group's, so optimizer.lr = {first:g}")
    return first


def _map_schedule(imp: _Importer) -> None:
    entry = imp.take("lr_scheduler")
    scheduler = imp.run.get("scheduler", {}).get("type")
    if entry is not None and scheduler is None:
        scheduler = _text(entry)
        if scheduler in SCHEDULERS:
            imp.set(entry, "scheduler.type", scheduler)
        else:
            imp.skip(entry, f"lorabake has no '{scheduler}' schedule ({', '.join(SCHEDULERS)}): set scheduler.type")
            scheduler = None
    scheduler = scheduler or ("constant" if entry is None else None)
    _map_warmup(imp, scheduler)
    for key, dotted, user, convert in (("lr_scheduler_num_cycles", "scheduler.cycles", "cosine_with_restarts", _integer),
                                       ("lr_scheduler_power", "scheduler.power", "polynomial", _number)):
        item = imp.take(key)
        if item is not None and scheduler == user:
            imp.set(item, dotted, convert(item))
        elif item is not None:
            imp.skip(item, f"nothing lost: used only by the {user} schedule (this run: {scheduler})")
        elif key == "lr_scheduler_num_cycles" and scheduler == user and "epochs" in imp.run.get("training", {}):
            # lora_gui.py: an empty cycles field means one cycle per epoch
            cycles = imp.run["training"]["epochs"]
            _put(imp.run, dotted, cycles)
            imp.mapped.append(("lr_scheduler_num_cycles (empty: kohya_ss uses the epoch count)", dotted, cycles))


def _warmup_request(imp: _Importer) -> tuple[Entry, float | None, int | None] | None:
    """(entry, fraction, steps) of the warm-up: the GUI's percent, or lr_warmup_steps, which overrides it
    (kohya_ss resolve_lr_warmup_steps) and in sd-scripts is steps, or a ratio when below 1 or "N%"."""
    percent, steps = imp.take_set("lr_warmup_pct", _number), imp.take("lr_warmup_steps")
    value = steps.value if steps is not None else None
    if isinstance(value, str) and value.strip().endswith("%"):
        return steps, _number(Entry(steps.label, value.strip()[:-1], steps.file)) / 100, None
    amount = _number(steps) if steps is not None else 0.0
    if amount and percent:
        imp.skip(percent[0], "nothing lost: lr_warmup_steps overrides it (kohya_ss resolve_lr_warmup_steps)")
    if amount:
        return (steps, amount, None) if amount < 1 else (steps, None, int(amount))
    if steps is not None:
        imp.skip(steps, "nothing lost: 0, no warm-up")
    return (percent[0], percent[1] / 100, None) if percent else None


def _map_warmup(imp: _Importer, scheduler: str | None) -> None:
    request = _warmup_request(imp)
    if request is None:
        return
    entry, fraction, steps = request
    if steps is not None and imp.total_steps is None:
        imp.skip(entry, f"a warm-up of {steps} steps needs the run's total step count, which depends on the dataset "
                        "(images × repeats ÷ batch × epochs): `lorabake validate` prints it; set scheduler.warmup "
                        f"to {steps} / total")
        imp.notes.append(f"Warm-up not carried over: set scheduler.warmup to {steps} ÷ the total steps that "
                         "`lorabake validate` prints for this run.")
        return
    fraction = fraction if steps is None else steps / imp.total_steps
    if scheduler is None:
        imp.skip(entry, "the schedule was not carried over, so neither is its warm-up: set both by hand")
    elif scheduler in ("constant", "adafactor"):
        imp.skip(entry, f"the {scheduler} schedule has no warm-up (kohya refuses one: "
                        "'does not require num_warmup_steps')")
    elif not 0 < fraction < 1:
        imp.skip(entry, f"a warm-up of {fraction:g} of the run is not a fraction below 1")
    else:
        imp.set(entry, "scheduler.warmup", round(fraction, 6))


# ---------------------------------------------------------------- length, training, loss, saving

def _map_duration(imp: _Importer) -> None:
    """sd-scripts: max_train_epochs overrides max_train_steps; kohya_ss's `epoch` only computes
    max_train_steps when that is 0; without either sd-scripts trains 1600 steps."""
    epochs = imp.take_set("max_train_epochs", _integer)
    steps = imp.take_set("max_train_steps", _integer)
    gui_epochs = imp.take_set("epoch", _integer) if imp.flavor == "gui" else None
    if epochs:
        imp.set(epochs[0], "training.epochs", epochs[1])
        for other in (steps, gui_epochs):
            if other:
                imp.skip(other[0], "nothing lost: max_train_epochs overrides it (sd-scripts)")
    elif steps:
        imp.set(steps[0], "training.max_steps", steps[1])
        imp.set(steps[0], "training.epochs", steps[1])  # an upper bound: max_steps ends the run first
        imp.total_steps = steps[1]
        if gui_epochs:
            imp.skip(gui_epochs[0], "nothing lost: kohya_ss uses it only to compute max_train_steps when that is 0")
    elif gui_epochs:
        imp.set(gui_epochs[0], "training.epochs", gui_epochs[1])
    elif imp.flavor == "sd-scripts":
        for dotted in ("training.max_steps", "training.epochs"):
            _put(imp.run, dotted, TOTAL_STEPS_DEFAULT)
            imp.mapped.append(("max_train_steps (not set: sd-scripts default)", dotted, TOTAL_STEPS_DEFAULT))
        imp.total_steps = TOTAL_STEPS_DEFAULT
    if "max_steps" in imp.run.get("training", {}):
        imp.notes.append("training.epochs equals training.max_steps: an upper bound, so max_steps ends the run as "
                         "in kohya (each epoch has at least one step).")


SIMPLE: dict[str, tuple[str, Callable[[Entry], Any]]] = {
    "gradient_accumulation_steps": ("training.grad_accum", _integer),
    "mixed_precision": ("training.mixed_precision", _one_of("no", "fp16", "bf16")),
    "gradient_checkpointing": ("training.gradient_checkpointing", _boolean),
    "cache_latents": ("training.cache_latents", _boolean),
    "clip_skip": ("training.clip_skip", _clip_skip),
    "max_token_length": ("training.max_token_length", _one_of(75, 150, 225, convert=_integer)),
    "num_processes": ("training.processes", _integer),
    "num_cpu_threads_per_process": ("resources.threads", _integer),
    "weighted_captions": ("captions.weighted", _boolean),
    "min_snr_gamma": ("loss.min_snr_gamma", _positive_or_none),
    "prior_loss_weight": ("loss.prior_loss_weight", _number),
    "scale_weight_norms": ("loss.scale_weight_norms", _positive_or_none),
    "save_every_n_epochs": ("save.every_n_epochs", _count_or_none),
    "save_every_n_steps": ("save.every_n_steps", _count_or_none),
    "save_last_n_epochs": ("save.keep_last", _count_or_none),
    "save_state": ("save.state", _boolean),
    "save_precision": ("save.precision", _save_precision),
    "network_weights": ("network.init_weights", _text),
}


# kohya_ss leaves values equal to 0 out of the sd-scripts config, so sd-scripts' default applies instead
# (lora_gui.py: `if value not in ["", False, None]`, and 0 == False); where that default is not 0 it matters.
GUI_DROPPED_ZEROS = {"prior_loss_weight": 1.0}


def _map_simple(imp: _Importer) -> None:
    for key, (dotted, convert) in SIMPLE.items():
        entry = imp.take(key)
        if entry is None:
            imp.kohya_default(key, dotted)
            continue
        try:
            value = convert(entry)
        except _NotCarried as e:
            imp.skip(entry, str(e))
            continue
        if imp.flavor == "gui" and value == 0 and key in GUI_DROPPED_ZEROS:
            value = GUI_DROPPED_ZEROS[key]
        imp.set(entry, dotted, value)
    if imp.run.get("training", {}).get("mixed_precision") == "fp16":
        imp.notes.append("training.mixed_precision fp16 needs a CUDA GPU; on a CPU lorabake refuses it (use bf16).")
    if "init_weights" in imp.run.get("network", {}):
        imp.notes.append("network.init_weights is relative to the project root: copy the LoRA file there.")
    precision = [e for e in (imp.take("full_fp16"), imp.take("full_bf16")) if e is not None]
    for entry in precision:
        if _boolean(entry):
            imp.set(entry, "training.full_precision", True)
        else:
            imp.skip(entry, "nothing lost: off in kohya")
    _map_seed(imp)


def _map_seed(imp: _Importer) -> None:
    entry = imp.entries.get("seed")
    imp.handled.add("seed")
    seed = 0 if entry is None or _unset(entry.value) else _integer(entry)
    random = "kohya drew a random seed (none given); lorabake uses training.seed, default 42, so reruns repeat"
    if seed or (entry is not None and imp.flavor == "sd-scripts" and not _unset(entry.value)):
        imp.set(entry, "training.seed", seed)  # kohya_ss passes 0 as "no seed"; sd-scripts seeds with 0
    elif entry is not None:
        imp.skip(entry, f"approximate: {random}")
    else:
        imp.notes.append(random + ".")


def _map_attention(imp: _Importer) -> None:
    """kohya: --sdpa, --xformers or --mem_eff_attn pick a kernel; none of them means its plain attention.
    kohya_ss stores the choice as xformers = "xformers" | "sdpa" | "none"."""
    entries = {key: imp.take(key) for key in ("sdpa", "xformers", "mem_eff_attn")}
    on = {key: e for key, e in entries.items() if e is not None and str(e.value).lower() in ("true", "xformers", "sdpa")}
    same_math = "lorabake uses torch's scaled_dot_product_attention (same math, another kernel)"
    if "sdpa" in on or str(entries["xformers"] and entries["xformers"].value).lower() == "sdpa":
        chosen, source, approximate = "sdpa", on.get("sdpa") or entries["xformers"], None
    elif "xformers" in on:
        chosen, source, approximate = "sdpa", on["xformers"], "xformers' kernel; " + same_math
    elif "mem_eff_attn" in on:
        chosen, source, approximate = "sdpa", on["mem_eff_attn"], "kohya's memory-efficient attention; " + same_math
    else:
        chosen, source, approximate = "eager", entries["xformers"] or entries["sdpa"], None
    if source is not None:
        imp.set(source, "training.attention", chosen, approximate)
    elif imp.flavor == "sd-scripts":
        _put(imp.run, "training.attention", chosen)
        imp.mapped.append(("xformers / sdpa (not set: kohya's plain attention)", "training.attention", chosen))
    for entry in entries.values():
        if entry is not None and entry is not source:
            imp.skip(entry, "nothing lost: off in kohya" if _off(entry.value)
                     else f"nothing lost: training.attention comes from {source.label if source else 'another key'}")


def _map_noise(imp: _Importer) -> None:
    """kohya_ss's noise_offset_type picks which of the two noise tricks is passed; sd-scripts passes both."""
    kind_entry = imp.take("noise_offset_type")
    kind = _text(kind_entry) if kind_entry else None
    offset_keys, multires_keys = ("noise_offset", "adaptive_noise_scale"), ("multires_noise_iterations",
                                                                            "multires_noise_discount")
    if kind_entry is not None:
        imp.record(kind_entry, "loss.noise_offset / loss.multires_noise", kind)
    for keys, active in ((offset_keys, kind in (None, "Original")), (multires_keys, kind in (None, "Multires"))):
        if not active:
            for key in keys:
                entry = imp.take(key)
                if entry is not None:
                    imp.skip(entry, f"nothing lost: inactive, noise_offset_type is {kind}")
    offset = imp.take_set("noise_offset", _number)
    if offset:
        imp.set(offset[0], "loss.noise_offset", offset[1])
    adaptive = imp.take_set("adaptive_noise_scale", _number)
    if adaptive and offset:
        imp.set(adaptive[0], "loss.adaptive_noise_scale", adaptive[1])
    elif adaptive:
        imp.skip(adaptive[0], "adaptive_noise_scale needs noise_offset (kohya refuses it without)")
    _map_multires(imp, bool(offset))


def _map_multires(imp: _Importer, offset_used: bool) -> None:
    iterations = imp.take_set("multires_noise_iterations", _integer)
    discount = imp.take("multires_noise_discount")
    if iterations and offset_used:
        imp.skip(iterations[0], "lorabake keeps noise_offset and multires noise exclusive; noise_offset was kept")
        iterations = None
    if iterations:
        imp.set(iterations[0], "loss.multires_noise.iterations", iterations[1])
    if discount is not None and iterations:
        imp.set(discount, "loss.multires_noise.discount", _number(discount))
    elif discount is not None:
        imp.skip(discount, "nothing lost: only used with multires_noise_iterations")


def _map_stop_text_encoder(imp: _Importer) -> None:
    """kohya_ss's percentage (or sd-scripts' step count, a train_db.py option) → a fraction of the run.
    kohya's train_network.py has no such option, so the kohya run trained the text encoder to the end."""
    ignored = "kohya's LoRA trainer ignores it (a train_db.py option; kohya_ss says 'not yet supported')"
    kept = ignored + ", so the kohya run trained the text encoder to the end; remove training.stop_text_encoder_at to match"
    percent = imp.take_set("stop_text_encoder_pct", _number)
    steps = imp.take_set("stop_text_encoder_training", _integer)
    if percent:
        entry, fraction = percent[0], percent[1] / 100
    elif steps and imp.total_steps:
        entry, fraction = steps[0], steps[1] / imp.total_steps
    elif steps:
        imp.skip(steps[0], f"nothing lost: {ignored}; a step count also needs the run's total steps")
        return
    else:
        return
    if not imp.run.get("network", {}).get("train_text_encoder", True) or not 0 < fraction <= 1:
        imp.skip(entry, "nothing lost: the text encoder is not trained, or the fraction is not in (0, 1]")
    else:
        imp.set(entry, "training.stop_text_encoder_at", round(fraction, 6), kept)


def _existing_file(text: str, base_dir: Path) -> Path | None:
    """`text` as a file on this machine (as given, or relative to the config), if it names one."""
    for candidate in (Path(text), base_dir / text):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # prompt text, not a path: a name too long for the file system
            return None
    return None


def _map_samples(imp: _Importer, base_dir: Path) -> None:
    """sample_prompts: prompt text (kohya_ss) or a prompt file (sd-scripts) → config.yaml samples."""
    entry, sampler = imp.take("sample_prompts"), imp.take("sample_sampler")
    prompts: list[str] = []
    if entry is not None:
        text = _text(entry)
        file = _existing_file(text, base_dir)
        if file is None and imp.flavor == "sd-scripts":
            imp.skip(entry, "the prompt file is not on this machine: copy its prompts to samples.prompts")
        else:
            lines = file.read_text(encoding="utf-8").splitlines() if file else text.splitlines()
            prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            imp.record(entry, "samples.prompts (configs/config.yaml)", prompts)
    if prompts:
        imp.samples = {"prompts": prompts}
    if sampler is not None and prompts and _text(sampler) in SAMPLERS:
        imp.samples["sampler"] = SAMPLERS[_text(sampler)]
        imp.record(sampler, "samples.sampler (configs/config.yaml)", imp.samples["sampler"])
    elif sampler is not None:
        imp.skip(sampler, f"lorabake samples with {', '.join(sorted(set(SAMPLERS.values())))}" if prompts
                 else "nothing lost: no sample prompts to go with it")


# ---------------------------------------------------------------- the import

def _dataset_config(imp: _Importer, config: Path, given: Path | None) -> Path | None:
    """The dataset TOML: the one given, else the config's dataset_config when it exists here."""
    entry = imp.take("dataset_config")
    if given is not None:
        if entry is not None:
            imp.skip(entry, f"nothing lost: replaced by the dataset config given to the import ({given})")
        return Path(given)
    if entry is None:
        return None
    found = _existing_file(_text(entry), config.parent)
    if found is None:
        imp.skip(entry, "the file is not on this machine: pass it with --dataset")
        return None
    imp.record(entry, "datasets, folders and per-dataset settings (read with it)", str(found))
    return found


def _ordered(data: dict[str, Any], model: Any = RunConfig) -> dict[str, Any]:
    """Keys in the order the config models declare them (the order docs/options.md lists them in)."""
    ordered = {}
    for key, info in model.model_fields.items():
        if key in data:
            nested = isinstance(data[key], dict) and hasattr(info.annotation, "model_fields")
            ordered[key] = _ordered(data[key], info.annotation) if nested else data[key]
    return ordered


def _validated(imp: _Importer, config: Path) -> dict[str, Any]:
    """The run, validated; a carried-over value lorabake refuses is taken out and reported instead."""
    while True:
        run = _ordered(imp.run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                RunConfig.model_validate(run)
            except ValidationError as e:
                if not _drop_refused(imp, e):
                    problems = "\n".join(f"  {'.'.join(map(str, p['loc'])) or 'run'}: {p['msg']}" for p in e.errors())
                    raise KohyaImportError(f"{config}: the imported settings are not a valid lorabake run (kohya "
                                           f"may have refused them too):\n{problems}") from None
                continue
        imp.notes += [f"lorabake warns: {w.message}" for w in caught]
        return run


def _drop_refused(imp: _Importer, error: ValidationError) -> bool:
    """Take each refused single value out of the run and report it; False when a problem names no value
    (a check across fields), which the user has to settle."""
    dropped = False
    for problem in error.errors():
        parts = [str(part) for part in problem["loc"] if isinstance(part, str)]
        parent = imp.run
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not parts or not isinstance(parent, dict) or isinstance(parent.get(parts[-1]), dict) or parts[-1] not in parent:
            return False
        dotted, value = ".".join(parts), parent.pop(parts[-1])
        rows = [row for row in imp.mapped if row[1] == dotted]
        imp.mapped = [row for row in imp.mapped if row[1] != dotted]
        for label, _, _ in rows or [(dotted, dotted, value)]:
            imp.unmapped.append((label, value, f"lorabake refuses {value!r} for {dotted} ({problem['msg']}): "
                                               "lorabake's default applies"))
        dropped = True
    return dropped


def import_kohya(config: Path, dataset_toml: Path | None = None, *, name: str | None = None) -> KohyaImport:
    """Read a kohya_ss GUI JSON or sd-scripts TOML (and optionally a dataset TOML) into a lorabake run."""
    config = Path(config)
    imp = _read_config(config)
    imp.name = _run_name(imp, config)
    imp.name = _entry_name(name, imp.name) if name else imp.name
    dataset_path = _dataset_config(imp, config, dataset_toml)
    main_layer = imp.entries
    subsets = _read_dataset_toml(dataset_path, main_layer) if dataset_path else [_Subset(0, [{}, {}, {}, main_layer], {})]
    if dataset_path:
        imp.entries = {**main_layer, **_all_dataset_entries(subsets)}
    _map_model(imp)
    _map_datasets(imp, subsets, config.parent, dataset_path is not None)
    _map_network(imp)
    _map_duration(imp)
    _map_optimizer(imp)
    _map_schedule(imp)
    _map_simple(imp)
    _map_attention(imp)
    _map_noise(imp)
    _map_stop_text_encoder(imp)
    _map_samples(imp, config.parent)
    if imp.flavor == "sd-scripts" and "max_grad_norm" not in imp.entries:
        imp.notes.append("kohya clipped gradients to norm 1.0 (max_grad_norm's default); lorabake does not clip.")
    imp.finish()
    run = _validated(imp, config)
    sources = (config,) + ((dataset_path,) if dataset_path else ())
    return KohyaImport(run, imp.bases, imp.datasets, imp.unmapped, imp.notes, imp.mapped, imp.folders, imp.samples,
                       imp.name, sources)


# ---------------------------------------------------------------- writing

class _RunDumper(yaml.SafeDumper):
    """Mappings in block style, lists of values on one line (block_dims' 25 numbers)."""


_RunDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def run_yaml_text(result: KohyaImport, report_name: str) -> str:
    header = (f"# Imported from {', '.join(p.name for p in result.sources)} by `lorabake import-kohya`.\n"
              f"# What did not carry over, and the configs/config.yaml entries it needs: {report_name}\n")
    return header + yaml.dump(result.run, Dumper=_RunDumper, sort_keys=False, allow_unicode=True)


def write_import(result: KohyaImport, run_yaml: Path, report_md: Path) -> None:
    """Write the run config and the migration report, each atomically."""
    store.write_text(run_yaml, run_yaml_text(result, Path(report_md).name))
    store.write_text(report_md, render_report(result, Path(run_yaml)))


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ⏎ ") + "`" if text != "" else '`""`'


def _config_entries(result: KohyaImport) -> str:
    entries: dict[str, Any] = {"bases": result.bases, "datasets": result.datasets}
    if result.samples:
        entries["samples"] = result.samples
    return yaml.dump(entries, Dumper=_RunDumper, sort_keys=False, allow_unicode=True)


def _report_folders(result: KohyaImport) -> list[str]:
    lines = ["## Dataset folders", "", "lorabake reads kohya's layout: `datasets/<dataset>/<repeats>_<concept>/` with "
             "caption files beside the images, and regularization images in `reg/<repeats>_<class>/` inside the "
             "dataset. Copy or link each folder:", ""]
    if not result.folders:
        return lines + ["No image folders were found on this machine; see the notes.", ""]
    lines += ["| kohya folder | lorabake folder | repeats | concept | regularization |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {_cell(f.source)} | {_cell(f.target + '/')} | {f.repeats} | {_cell(f.concept)} | "
              f"{'yes' if f.is_reg else 'no'} |" for f in result.folders]
    return lines + [""]


def _unmapped_table(rows: list[tuple[str, Any, str]]) -> list[str]:
    return ["| kohya key | value | why |", "| --- | --- | --- |"] + [
        f"| {_cell(key)} | {_cell(value)} | {why.removeprefix(NOTHING_LOST)} |" for key, value, why in rows]


def render_report(result: KohyaImport, run_yaml: Path) -> str:
    """The migration report: what to add to config.yaml, folders to arrange, mapped and unmapped keys."""
    lost = [row for row in result.unmapped if not row[2].startswith(NOTHING_LOST)]
    idle = [row for row in result.unmapped if row[2].startswith(NOTHING_LOST)]
    lines = [f"# kohya import: {result.name}", "",
             f"Imported from {', '.join(f'`{p}`' for p in result.sources)} into `{run_yaml}` by "
             "`lorabake import-kohya`.", "",
             "## Before the first run", "",
             "1. Add the entries below to `configs/config.yaml` (keep your other entries).",
             "2. Arrange the dataset folders as listed.",
             f"3. Read the {len(lost)} settings below that did not carry over exactly, then run `lorabake validate`.",
             "   Settings the kohya config does not give come from lorabake's defaults and the `defaults:` of",
             "   `configs/config.yaml`.", "",
             "## Add to configs/config.yaml", "", "```yaml", _config_entries(result).rstrip(), "```", ""]
    lines += _report_folders(result)
    lines += ["## Carried over", "", "| kohya key | lorabake key | value |", "| --- | --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(target)} | {_cell(v)} |" for k, target, v in result.mapped]
    lines += ["", "## Not carried over, or only approximately", ""] + _unmapped_table(lost)
    if idle:
        lines += ["", f"<details><summary>{len(idle)} keys left out with nothing lost (off, empty, inactive or "
                      "bookkeeping)</summary>", ""] + _unmapped_table(idle) + ["", "</details>"]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
