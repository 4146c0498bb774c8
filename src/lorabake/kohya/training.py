"""Length, training, loss, saving: the run's duration, the one-to-one options, seed, attention, noise,
when the text encoder stops, and sample prompts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lorabake.kohya.bookkeeping import _Importer, _put
from lorabake.kohya.readers import _existing_file
from lorabake.kohya.values import (Entry, _boolean, _clip_skip, _count_or_none, _integer, _NotCarried, _number, _off,
                                   _one_of, _positive_or_none, _save_precision, _text, _unset)
from lorabake.kohya.vocabulary import SAMPLERS, TOTAL_STEPS_DEFAULT


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
    "max_grad_norm": ("training.max_grad_norm", _number),
    "cache_text_encoder_outputs": ("training.cache_text_encoder_outputs", _boolean),
    "sdxl_cache_text_encoder_outputs": ("training.cache_text_encoder_outputs", _boolean),
    "cache_text_encoder_outputs_to_disk": ("training.cache_text_encoder_outputs", _boolean),
    "torch_compile": ("training.compile", _boolean),
    "dynamo_backend": ("training.compile_backend", _one_of("inductor", "aot_eager", "eager", "cudagraphs")),
    "loss_type": ("loss.type", _one_of("l2", "l1", "huber", "smooth_l1")),
    "huber_c": ("loss.huber_c", _number),
    "huber_schedule": ("loss.huber_schedule", _one_of("constant", "exponential", "snr")),
    "huber_scale": ("loss.huber_scale", _number),
    "debiased_estimation_loss": ("loss.debiased_estimation", _boolean),
    "v_pred_like_loss": ("loss.v_pred_like_loss", _positive_or_none),
    "ip_noise_gamma": ("loss.ip_noise_gamma", _positive_or_none),
    "ip_noise_gamma_random_strength": ("loss.ip_noise_gamma_random_strength", _boolean),
    "zero_terminal_snr": ("loss.zero_terminal_snr", _boolean),
    "min_timestep": ("loss.min_timestep", _integer),
    "max_timestep": ("loss.max_timestep", _count_or_none),
    # kohya_ss's own keys; sd-scripts reads them from network_args (kohya/network.py maps those)
    "loraplus_lr_ratio": ("network.loraplus_lr_ratio", _positive_or_none),
    "loraplus_unet_lr_ratio": ("network.loraplus_unet_lr_ratio", _positive_or_none),
    "loraplus_text_encoder_lr_ratio": ("network.loraplus_text_encoder_lr_ratio", _positive_or_none),
}


# kohya_ss leaves values equal to 0 out of the sd-scripts config, so sd-scripts' default applies instead
# (lora_gui.py: `if value not in ["", False, None]`, and 0 == False); where that default is not 0 it matters.
GUI_DROPPED_ZEROS = {"prior_loss_weight": 1.0, "max_grad_norm": 1.0}


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
    _map_validation(imp)


def _map_validation(imp: _Importer) -> None:
    """validation_split (0: none) with validation_seed and validate_every_n_epochs → validation.*;
    lorabake scores after epochs, so kohya's step-based cadence is reported, not carried."""
    split, seed, every = (imp.take(key) for key in ("validation_split", "validation_seed", "validate_every_n_epochs"))
    if split is None or not _number(split):
        for entry in (split, seed, every):
            if entry is not None:
                imp.skip(entry, "nothing lost: no validation_split, so no validation")
        return
    imp.set(split, "validation.split", _number(split))
    if seed is not None:
        imp.set(seed, "validation.seed", _integer(seed))
    if every is not None:
        imp.set(every, "validation.every_n_epochs", _integer(every))


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
