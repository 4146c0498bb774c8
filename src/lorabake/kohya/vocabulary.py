"""The vocabulary: kohya option names and what lorabake makes of them.

Which kohya key (sd-scripts argparse name or kohya_ss GUI name) maps to which lorabake key, what the
GUI calls differently, sd-scripts' defaults, the optimizers, schedules, samplers and networks lorabake
takes, and why the keys without a lorabake equivalent are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorabake import samplers

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
    "scale_weight_norms": "loss.scale_weight_norms", "max_grad_norm": "training.max_grad_norm",
    "loss_type": "loss.type", "huber_c": "loss.huber_c", "huber_schedule": "loss.huber_schedule",
    "huber_scale": "loss.huber_scale", "min_timestep": "loss.min_timestep", "max_timestep": "loss.max_timestep",
    "debiased_estimation_loss": "loss.debiased_estimation", "v_pred_like_loss": "loss.v_pred_like_loss",
    "ip_noise_gamma": "loss.ip_noise_gamma", "ip_noise_gamma_random_strength": "loss.ip_noise_gamma_random_strength",
    "zero_terminal_snr": "loss.zero_terminal_snr", "loraplus_lr_ratio": "network.loraplus_lr_ratio",
    "loraplus_unet_lr_ratio": "network.loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio": "network.loraplus_text_encoder_lr_ratio",
    "caption_prefix": "datasets.<ds>.folders.<folder>.caption_prefix",
    "caption_suffix": "datasets.<ds>.folders.<folder>.caption_suffix",
    "cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "sdxl_cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk": "training.cache_text_encoder_outputs",
    "torch_compile": "training.compile", "dynamo_backend": "training.compile_backend",
    "validation_split": "validation.split", "validation_seed": "validation.seed",
    "validate_every_n_epochs": "validation.every_n_epochs",
    "caption_extension": "captions.extension", "shuffle_caption": "captions.shuffle",
    "keep_tokens": "captions.keep_tokens", "caption_separator": "captions.separator",
    "caption_dropout_rate": "captions.dropout_rate", "caption_dropout_every_n_epochs": "captions.dropout_every_n_epochs",
    "caption_tag_dropout_rate": "captions.tag_dropout_rate", "weighted_captions": "captions.weighted",
    "flip_aug": "augment.flip", "color_aug": "augment.color", "random_crop": "augment.random_crop",
    "masked_loss": "loss.masked", "alpha_mask": "loss.mask_source", "conditioning_data_dir": "loss.mask_folder",
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
SAMPLERS = {**{name: name for name in samplers.SAMPLERS}, **samplers.ALIASES}


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
        "skip_cache_check", "gpu_ids", "multi_gpu", "num_machines", "main_process_port",
        "dynamo_mode", "dynamo_use_dynamic", "dynamo_use_fullgraph", "extra_accelerate_launch_args", "lowram",
        "highvram", "mem_eff_save", "disable_mmap_load_safetensors", "output_config", "config_file", "debug_dataset",
        "cache_info", "tokenizer_cache_dir", "ddp_timeout", "ddp_gradient_as_bucket_view",
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
    "nothing lost: lorabake encodes a run's uncached captions in one batch (training.cache_text_encoder_outputs)": (
        "text_encoder_batch_size",),
    "not available in lorabake: the run will differ from kohya's here": (
        "noise_offset_random_strength",
        "scale_v_pred_loss_like_noise_pred",
        "fp8_base", "fp8_base_unet", "face_crop_aug_range", "token_warmup_min", "token_warmup_step",
        "keep_tokens_separator", "secondary_separator", "enable_wildcard",
        "lr_scheduler_args", "lr_scheduler_type", "lr_decay_steps", "lr_scheduler_min_lr_ratio",
        "lr_scheduler_timescale", "optimizer_schedulefree_wrapper", "schedulefree_wrapper_args",
        "fused_backward_pass", "fused_optimizer_groups", "blockwise_fused_optimizers", "dim_from_weights",
        "base_weights", "base_weights_multiplier", "network_multiplier", "no_token_padding", "save_last_n_steps",
        "save_last_n_epochs_state", "save_last_n_steps_state", "save_state_on_train_end", "save_n_epoch_ratio",
        "vae", "perlin_noise", "resize_interpolation", "validate_every_n_steps", "max_validation_steps",
        "custom_attributes", "dataset_repeats", "in_json", "metadata_file",
        "train_on_input",
        "conv_block_dims", "conv_block_alphas", "wd_on_output"),
}
NOTHING_LOST = "nothing lost: "  # the prefix of reasons for keys whose omission changes nothing
# Values that describe what lorabake does anyway.
LORABAKE_BEHAVIOUR = {"save_model_as": "safetensors"}
SPECIFIC_REASONS = {
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
