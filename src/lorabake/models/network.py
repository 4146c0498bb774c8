"""LoRA / LyCORIS networks from lycoris-lora, named and targeted the way kohya does.

lycoris' kohya wrapper prefixes module paths with `lora_unet_` / `lora_te_` and replaces dots by
underscores, which is exactly kohya's key scheme. Our presets target what kohya's networks.lora targets:
presets/kohya-lora.toml the Linear and 1×1 conv layers inside the UNet's transformer blocks and the CLIP
text encoder's attention and MLP layers; presets/kohya-locon.toml (used whenever conv_dim is set) adds
the layers of the ResNet blocks and down/upsamplers, 3×3 convolutions included. Every algo (lora, loha,
lokr, ia3, …) trains on those same layers.

Block-wise options (block_dims, block_alphas, block_lr_weights; see blocks.py) turn the class-based
preset into a per-layer one: each layer is listed by name with its block's dim and alpha
(lycoris' `name_algo_map`), and layers of blocks whose lr weight is at or below the threshold are left
out, as kohya's `remove_block_dims_and_alphas` does.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorabake.config import ALGOS, Network
from lorabake.models import keys, sd_layout
from lorabake.models.blocks import block_of, block_values

PRESET_DIR = Path(__file__).parent / "presets"
LINEAR_PRESET = PRESET_DIR / "kohya-lora.toml"
CONV_PRESET = PRESET_DIR / "kohya-locon.toml"
# lycoris' create_network re-applies the preset it is given; this empty one leaves ours in place.
AS_APPLIED = PRESET_DIR / "as-applied.toml"
# The preset each algo trains with when conv_dim is not set (`preset_path` picks the LoCon one when it is).
PRESET = {algo: str(LINEAR_PRESET) for algo in ALGOS}
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"

# Preset keys lycoris keeps on its network class and only overwrites when a preset names them; reset
# them before every build so nothing leaks from a previous network.
CLEAN_SLATE = {"module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
TARGETS_NOTHING = {"enable_conv": False, "unet_target_module": [], "unet_target_name": [],
                   "text_encoder_target_module": [], "text_encoder_target_name": []}

# The tensors a saved file may hold per module, by algo (lycoris' module classes; optional ones come from
# use_tucker: lora_mid/hada_t*/lokr_t*, dora_wd: dora_scale, rescaled: rescale, train_norm: w_norm/b_norm).
NORM_SUFFIXES = {"w_norm", "b_norm"}
_LORA = {"lora_down.weight", "lora_up.weight", "alpha"}
KEY_SUFFIXES: dict[str, set[str]] = {
    "lora": _LORA | {"lora_mid.weight", "dora_scale"} | NORM_SUFFIXES,
    "locon": _LORA | {"lora_mid.weight", "dora_scale"} | NORM_SUFFIXES,
    "dylora": _LORA | NORM_SUFFIXES,
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}
    | NORM_SUFFIXES,
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
             "alpha", "dora_scale"} | NORM_SUFFIXES,
    "ia3": {"weight", "on_input"} | NORM_SUFFIXES,
    "full": {"diff", "diff_b"} | NORM_SUFFIXES,
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"} | NORM_SUFFIXES,
    "diag-oft": {"oft_blocks", "rescale", "alpha"} | NORM_SUFFIXES,
    "boft": {"oft_blocks", "rescale", "alpha"} | NORM_SUFFIXES,
}
# config names lycoris.kohya.create_network reads under another name
ARG_NAMES = {"weight_decompose": "dora_wd"}


class _DropIa3PresetAdvice(logging.Filter):
    """lycoris advises its own ia3 preset for IA³; we train IA³ on kohya's layers on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "preset ia3" not in record.getMessage()


def _quiet_lycoris() -> None:
    logger = logging.getLogger("LyCORIS")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropIa3PresetAdvice) for f in logger.filters):
        logger.addFilter(_DropIa3PresetAdvice())


def _apply_preset(preset: dict) -> None:
    from lycoris.kohya import LycorisNetworkKohya

    _quiet_lycoris()
    LycorisNetworkKohya.apply_preset({**CLEAN_SLATE, **preset})


def read_preset(name: str) -> dict:
    """A lycoris builtin preset by name, or a preset file by path, as the dict lycoris applies."""
    from lycoris.config import PRESET as BUILTIN
    from lycoris.utils.preset import read_preset as read_preset_file

    preset = BUILTIN[name] if name in BUILTIN else read_preset_file(name)
    if preset is None:
        raise ValueError(f"{name}: not a lycoris preset name nor a readable preset file")
    return preset


def use_preset(name: str) -> None:
    """lycoris keeps its target preset on the class; set it before building any network."""
    _apply_preset(read_preset(name))


def preset_path(cfg: Network) -> Path:
    """kohya's LoCon targets when 3×3 convolutions are trained (conv_dim set), its LoRA targets otherwise."""
    return CONV_PRESET if cfg.conv_dim is not None else LINEAR_PRESET


def preset_name(cfg: Network) -> str:
    """The preset's name for a file's metadata: kohya-lora or kohya-locon."""
    return preset_path(cfg).stem


# ---------------------------------------------------------------- block-wise targets

def has_block_options(cfg: Network) -> bool:
    return any(v is not None for v in (cfg.block_dims, cfg.block_alphas, cfg.block_lr_weights))


def block_settings(cfg: Network, arch: str = "sd1") -> dict[str, tuple[int, float] | None]:
    """(dim, alpha) per block, or None for a block that gets no module (dim 0, or lr weight at or below
    block_lr_zero_threshold: kohya's get_block_lr_weight + remove_block_dims_and_alphas)."""
    dims = block_values(cfg.block_dims, cfg.dim, arch)
    alphas = block_values(cfg.block_alphas, cfg.alpha, arch)
    lr_weights = block_values(cfg.block_lr_weights, 1.0, arch)
    learns = {b: cfg.block_lr_weights is None or lr_weights[b] > cfg.block_lr_zero_threshold for b in dims}
    return {b: (int(dims[b]), alphas[b]) if dims[b] > 0 and learns[b] else None for b in dims}


def _layer_config(path: str, layer: torch.nn.Module, settings: dict, cfg: Network, conv: bool,
                  arch: str = "sd1") -> dict | None:
    """The dim/alpha lycoris should give one layer, or None when kohya would not train it."""
    block = block_of(path, arch)
    if block is not None and settings[block] is None:
        return None
    dim, alpha = settings[block] if block is not None else (cfg.dim, cfg.alpha)
    if cfg.args.get("train_norm") and "Norm" in type(layer).__name__:
        return {}
    if isinstance(layer, torch.nn.Linear):
        return {"dim": dim, "alpha": alpha}
    if isinstance(layer, torch.nn.Conv2d):
        if layer.kernel_size == (1, 1):
            return {"dim": dim, "alpha": alpha}
        # kohya keeps conv_dim/conv_alpha for 3×3 convs in every block (conv_block_dims default)
        return {"dim": cfg.conv_dim, "alpha": _conv_alpha(cfg)} if conv else None
    return None


def per_block_preset(preset: dict, unet, cfg: Network) -> dict:
    """The class-based preset rewritten as one entry per UNet layer, with that layer's block settings."""
    arch = unet_arch(unet)
    settings = block_settings(cfg, arch)
    targets = {}
    for path, container in unet.named_modules():
        if type(container).__name__ not in preset.get("unet_target_module", []):
            continue
        for child, layer in container.named_modules():
            layer_path = f"{path}.{child}" if child else path
            config = _layer_config(layer_path, layer, settings, cfg, bool(preset.get("enable_conv")), arch)
            if config is not None:
                targets[layer_path] = config
    # fnmatch on paths without wildcards is an exact match; regexes would read the dots as "any".
    return {**preset, "unet_target_module": [], "unet_target_name": list(targets), "name_algo_map": targets,
            "use_fnmatch": True}


# ---------------------------------------------------------------- building a network

def _conv_alpha(cfg: Network) -> float | None:
    return cfg.conv_alpha if cfg.conv_alpha is not None else cfg.conv_dim  # config: "default: conv_dim"


def lycoris_arguments(cfg: Network) -> dict:
    """The keyword arguments of lycoris.kohya.create_network for this config."""
    extra = {ARG_NAMES.get(key, key): value for key, value in cfg.args.items() if key != "rank_dropout_scale"}
    conv = {"conv_dim": cfg.conv_dim, "conv_alpha": _conv_alpha(cfg)} if cfg.conv_dim is not None else {}
    if cfg.dropout:  # lycoris' LoCon applies neuron dropout only on its bypass path (same function)
        extra.setdefault("bypass_mode", True)
    return dict(algo=cfg.algo, dropout=cfg.dropout, rank_dropout=cfg.rank_dropout,
                module_dropout=cfg.module_dropout, factor=cfg.factor, **conv, **extra)


def kohya_network_args(cfg: Network) -> dict[str, str]:
    """`ss_network_args` as kohya writes it: the `--network_args` that rebuild this network, every
    value a string (lycoris needs `algo`; kohya's own LoRA only conv and dropout settings)."""
    args = {} if cfg.algo == "lora" else {"algo": cfg.algo, "preset": preset_name(cfg)}
    if cfg.conv_dim is not None:
        args |= {"conv_dim": str(cfg.conv_dim), "conv_alpha": f"{_conv_alpha(cfg):g}"}
    for key in ("rank_dropout", "module_dropout"):
        if getattr(cfg, key):
            args[key] = f"{getattr(cfg, key):g}"
    if cfg.algo == "lokr" and cfg.factor != -1:
        args["factor"] = str(cfg.factor)
    for key in ("block_dims", "block_alphas", "block_lr_weights"):
        if getattr(cfg, key) is not None:
            args[key] = ",".join(f"{v:g}" for v in getattr(cfg, key))
    return args | {key: str(value) for key, value in cfg.args.items()}


def create_network(unet, text_encoder, cfg: Network, seed: int, root: Path | None = None):
    """A fresh network wrapped around the models (forward hooks), or the init_weights file's state."""
    from lycoris.kohya import create_network as lycoris_network

    preset = read_preset(str(preset_path(cfg)))
    _apply_preset(per_block_preset(preset, unet, cfg) if has_block_options(cfg) else preset)
    torch.manual_seed(seed)
    network = lycoris_network(1.0, cfg.dim, cfg.alpha, None, text_encoder, unet, warn_on_unmatched=False,
                              preset=str(AS_APPLIED), **lycoris_arguments(cfg))
    if cfg.args.get("rank_dropout_scale"):  # a module option that lycoris' create_network does not pass on
        for lora in network.loras:
            lora.rank_dropout_scale = True
    _apply_preset({})  # leave no per-layer map behind for the next lycoris network
    network.apply_to(text_encoder, unet, apply_text_encoder=cfg.train_text_encoder, apply_unet=cfg.train_unet)
    if cfg.init_weights:
        load_initial_weights(network, Path(root or ".") / cfg.init_weights, unet, text_encoder)
    return network


def param_groups(network, cfg: Network, unet_lr: float, text_encoder_lr: float,
                 text_encoder_2_lr: float | None = None, arch: str = "sd1") -> list[dict]:
    """Optimizer groups: the UNet (split per block, lr × block_lr_weights, when those are set) and the
    text encoder, each with its own learning rate; with LoRA+, each group's up matrices form a group
    of their own at lr × the ratio (kohya's `{name} plus`); only trainable parameters, no empty groups."""
    lr_weights = block_values(cfg.block_lr_weights, 1.0, arch)
    unet_groups = defaultdict(list)
    for lora in network.unet_loras:
        block = block_of(lora.lora_name, arch) if cfg.block_lr_weights is not None else None
        unet_groups[block] += [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    named = [(unet_groups[None], unet_lr, "unet", "unet")]
    named += [(unet_groups[b], unet_lr * lr_weights[b], f"unet:{b}", "unet") for b in lr_weights]
    second = f"{TEXT_ENCODER_PREFIX}2_" if text_encoder_2_lr is not None else None  # SDXL's OpenCLIP-G
    text_params = [(n, p) for lora in network.text_encoder_loras if not (second and lora.lora_name.startswith(second))
                   for n, p in lora.named_parameters() if p.requires_grad]
    named.append((text_params, text_encoder_lr, "text_encoder", "text_encoder"))
    if second:
        text_2 = [(n, p) for lora in network.text_encoder_loras if lora.lora_name.startswith(second)
                  for n, p in lora.named_parameters() if p.requires_grad]
        named.append((text_2, text_encoder_2_lr, "text_encoder_2", "text_encoder"))
    groups = []
    for params, lr, name, part in named:
        ratio = cfg.loraplus_ratio(part)
        up = [p for n, p in params if ratio != 1.0 and n.startswith("lora_up.")]
        groups.append({"params": [p for n, p in params if not (ratio != 1.0 and n.startswith("lora_up."))],
                       "lr": lr, "name": name})
        groups.append({"params": up, "lr": lr * ratio, "name": f"{name} plus"})
    return [group for group in groups if group["params"]]


# ---------------------------------------------------------------- key names

def lora_name(prefix: str, path: str) -> str:
    """kohya's module naming: prefix + the module path with dots as underscores."""
    return f"{prefix}_{path}".replace(".", "_")


def is_sdxl(unet) -> bool:
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def unet_arch(unet) -> str:
    """The block vocabulary a UNet takes: "sdxl", or "sd1" (SD1 and SD2 share it)."""
    return "sdxl" if is_sdxl(unet) else "sd1"


def text_encoder_prefixes(text_encoder) -> list[tuple[str, torch.nn.Module]]:
    """lycoris (like kohya) names one text encoder `lora_te`, a list of them `lora_te1`, `lora_te2`."""
    if isinstance(text_encoder, (list, tuple)):
        return [(f"{TEXT_ENCODER_PREFIX}{i + 1}", te) for i, te in enumerate(text_encoder)]
    return [] if text_encoder is None else [(TEXT_ENCODER_PREFIX, text_encoder)]


def module_table(unet, text_encoder) -> dict[str, tuple[str, torch.nn.Module, bool]]:
    """kohya module name → (lycoris' name for it, the module, is it in the UNet), for every module.

    The two names differ in two places. SDXL: kohya names UNet modules by the original (sgm) UNet's
    paths (`input_blocks_4_1_…`), lycoris by diffusers' (`down_blocks_1_attentions_0_…`); SD1/SD2 files
    use diffusers' paths. Text encoders: transformers 5 dropped CLIPTextModel's `text_model.` level,
    so lycoris says `lora_te_encoder_…` where kohya, A1111 and ComfyUI expect
    `lora_te_text_model_encoder_…`."""
    table = {}
    if unet is not None:
        original = sd_layout.unet_original_names(unet) if is_sdxl(unet) else {}
        for path, module in unet.named_modules():
            if path:
                table[lora_name(UNET_PREFIX, original.get(path, path))] = (lora_name(UNET_PREFIX, path), module, True)
    for prefix, te in text_encoder_prefixes(text_encoder):
        flat = not hasattr(te, "text_model")
        for path, module in te.named_modules():
            if path:
                table[lora_name(prefix, f"text_model.{path}" if flat else path)] = (lora_name(prefix, path), module, False)
    return table


def _rename(state: dict, names: dict[str, str]) -> dict:
    renamed = {}
    for key, value in state.items():
        module, dot, tensor = key.partition(".")
        renamed[names.get(module, module) + dot + tensor] = value
    return renamed


def _conv_ups_as_1x1(state: dict) -> dict:
    """kohya stores a conv module's lora_up as a 1×1 conv; lycoris' DyLoRA saves it flat."""
    fixed = dict(state)
    for key, up in state.items():
        down = state.get(key.replace(".lora_up.weight", ".lora_down.weight"))
        if key.endswith(".lora_up.weight") and down is not None and up.dim() == 2 < down.dim():
            fixed[key] = up.reshape(*up.shape, *[1] * (down.dim() - 2))
    return fixed


def _lycoris_names(table: dict) -> dict[str, str]:
    return {kohya: lycoris for kohya, (lycoris, _, _) in table.items()}


def to_kohya_keys(state: dict, unet, text_encoder) -> dict:
    """lycoris-named keys on these models → the key names (and shapes) every other tool expects."""
    names = {lycoris: kohya for kohya, lycoris in _lycoris_names(module_table(unet, text_encoder)).items()}
    return _conv_ups_as_1x1(_rename(state, names))


def from_kohya_keys(state: dict, unet, text_encoder) -> dict:
    return _rename(state, _lycoris_names(module_table(unet, text_encoder)))


def _dylora_alpha(lora) -> torch.Tensor:
    """lycoris' DyLoRA scales by alpha / (rank blocks in use), not alpha / rank as the LoRA it saves is
    read; this alpha makes the file apply the full-rank update the network trained."""
    return lora.alpha * lora.block_size


def kohya_state(network, unet, text_encoder) -> dict[str, torch.Tensor]:
    """What a LoRA file of this network holds: its state under kohya's key names."""
    from lycoris.modules.dylora import DyLoraModule

    state = network.state_dict()
    for lora in network.unet_loras + network.text_encoder_loras:
        if isinstance(lora, DyLoraModule):
            state[f"{lora.lora_name}.alpha"] = _dylora_alpha(lora)
    return to_kohya_keys(state, unet, text_encoder)


# ---------------------------------------------------------------- reading LoRA files

class UnmatchedKeys(ValueError):
    """A LoRA file names modules this model does not have ("lora key not loaded"), or does not fit."""


def _empty_network(unet, text_encoder):
    from lycoris.kohya import LycorisNetworkKohya

    _apply_preset(TARGETS_NOTHING)  # an empty container; load_weights adds the file's modules
    return LycorisNetworkKohya(text_encoder, unet, warn_on_unmatched=False)


def _module_from_weights(weights: dict, lora_name: str, org_module: torch.nn.Module, path: Path):
    """The lycoris module whose keys these are (lycoris detects the algo from the key names)."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.ia3 import IA3Module

    kind, params = get_module(weights, lora_name)
    if kind is None:
        keys = sorted(k for k in weights if k.startswith(f"{lora_name}."))
        raise UnmatchedKeys(f"{path}: {lora_name}: keys {keys} belong to no LyCORIS algo")
    try:
        if kind is IA3Module:  # lycoris 4.1.3 hands IA3 its saved on_input too, which its loader does not take
            weight, on_input = params
            module = IA3Module(lora_name, org_module, 1.0, train_on_input=on_input is not None and bool(on_input))
            module.weight.data.copy_(weight)
            return module
        return make_module(kind, params, lora_name, org_module)
    except RuntimeError as e:  # the layer's shape differs from the saved one
        raise UnmatchedKeys(f"{path}: {lora_name} does not fit the model's layer: {e}") from None


def load_weights(path: Path, unet, text_encoder, multiplier: float = 1.0):
    """Build a network from a LoRA file of any algo, checking that every key finds its module."""
    saved = load_file(str(path))
    table = module_table(unet, text_encoder)
    names = sorted({key.split(".")[0] for key in saved if "." in key})
    unmatched = [name for name in names if name not in table]
    if unmatched:
        raise UnmatchedKeys(f"{path}: {len(unmatched)} LoRA module(s) match nothing in the model, e.g. {unmatched[:3]}")
    weights = _rename(saved, _lycoris_names(table))  # from_kohya_keys, on the table already built
    network = _empty_network(unet, text_encoder)
    for kohya in names:
        name, org_module, on_unet = table[kohya]
        lora = _module_from_weights(weights, name, org_module, path)
        lora.multiplier = multiplier
        (network.unet_loras if on_unet else network.text_encoder_loras).append(lora)
        network.add_module(name, lora)
    network.loras = network.text_encoder_loras + network.unet_loras
    return network


def apply_weights(path: Path, unet, text_encoder, multiplier: float = 1.0, text_encoder_multiplier: float | None = None,
                  block_weights: dict[str, float] | None = None):
    """Apply a LoRA file at run time (the original weights stay untouched); returns the network, whose
    `applied` modules are the ones to `restore()`. The text encoder's modules take
    `text_encoder_multiplier` (default: `multiplier`); UNet modules take `multiplier` × their block's
    weight, when given. A module at 0 is not applied at all: its layer runs exactly as before."""
    network = load_weights(path, unet, text_encoder, multiplier)
    arch = unet_arch(unet)
    for lora in network.unet_loras:
        block = block_of(lora.lora_name, arch) if block_weights is not None else None
        lora.multiplier = multiplier * (block_weights[block] if block is not None else 1.0)
    for lora in network.text_encoder_loras:
        lora.multiplier = multiplier if text_encoder_multiplier is None else text_encoder_multiplier
    network.applied = [lora for lora in network.unet_loras + network.text_encoder_loras if lora.multiplier != 0.0]
    for lora in network.applied:
        lora.apply_to()
    return network


def _scales_twice(lora) -> bool:
    """lycoris 4.1.3's LoHa and LoKr `get_diff_weight` multiply by alpha/dim although their `get_weight`
    already did; their forward pass (what training optimised, and what A1111/ComfyUI apply) scales once."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    return isinstance(lora, (LohaModule, LokrModule))


def _forward_weight(lora, multiplier: float) -> torch.Tensor:
    """The weight a LoHa/LoKr module's forward pass uses, as lycoris' own forward builds it."""
    original = lora.org_weight
    update = lora.get_weight(lora.shape).to(original) * lora.scalar
    if lora.wd:  # DoRA rescales the whole weight
        return lora.apply_weight_decompose(original + update, multiplier)
    return original + update * multiplier


@torch.no_grad()
def weight_delta(lora, multiplier: float = 1.0) -> torch.Tensor:
    """How much one module changes its layer's weight at this strength."""
    if _scales_twice(lora):
        return _forward_weight(lora, multiplier) - lora.org_weight
    return lora.get_diff_weight(multiplier=multiplier, shape=lora.shape, device="cpu")[0]


@torch.no_grad()
def merge_weights(path: Path, unet, text_encoder, multiplier: float = 1.0,
                  block_weights: dict[str, float] | None = None) -> int:
    """Add `multiplier` × the LoRA's weight deltas into the models' weights (UNet modules × their
    block's weight, when given); returns modules merged."""
    network = load_weights(path, unet, text_encoder, multiplier)
    loras, arch = network.unet_loras + network.text_encoder_loras, unet_arch(unet)
    for lora in loras:
        block = block_of(lora.lora_name, arch) if block_weights is not None else None  # None for text encoders
        strength = multiplier * (block_weights[block] if block is not None else 1.0)
        if _scales_twice(lora):
            weight = lora.org_module[0].weight
            weight.copy_(_forward_weight(lora, strength).reshape(weight.shape))
        else:
            lora.merge_to(strength)
    return len(loras)


def module_deltas(path: Path, unet, text_encoder, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """The weight delta each module adds, by kohya module name (for checks and extraction tests)."""
    network = load_weights(path, unet, text_encoder, multiplier)
    deltas = {lora.lora_name: weight_delta(lora, multiplier).float()
              for lora in network.unet_loras + network.text_encoder_loras}
    return to_kohya_keys(deltas, unet, text_encoder)


# ---------------------------------------------------------------- continuing from a file (init_weights)

def _layout_problems(saved: dict, expected: dict) -> list[str]:
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = [f"{k}: file {tuple(saved[k].shape)}, network {tuple(expected[k].shape)}"
                for k in sorted(saved.keys() & expected.keys()) if saved[k].shape != expected[k].shape]
    problems = [f"{len(missing)} key(s) missing, e.g. {missing[:3]}" if missing else "",
                f"{len(unexpected)} key(s) this network does not have, e.g. {unexpected[:3]}" if unexpected else "",
                f"{len(reshaped)} shape(s) differ, e.g. {reshaped[:2]}" if reshaped else ""]
    return [p for p in problems if p]


@torch.no_grad()
def _load_dylora(lora, state: dict) -> None:
    """lycoris' DyLoRA does not load what it saves; split the saved LoRA back into its rank blocks."""
    up = state["lora_up.weight"].reshape(lora.shape[0], lora.lora_dim)
    down = state["lora_down.weight"].reshape(lora.lora_dim, -1)
    for param, part in zip(lora.up_list, up.split(lora.block_size, dim=1)):
        param.copy_(part)
    for param, part in zip(lora.down_list, down.split(lora.block_size, dim=0)):
        param.copy_(part)
    lora.alpha.copy_(state["alpha"] / lora.block_size)  # undo _dylora_alpha


def load_initial_weights(network, path: Path, unet, text_encoder) -> None:
    """Continue from a LoRA file (kohya's --network_weights): it must hold exactly this network's keys
    and shapes — same algo, dims and targets — or it is refused, naming the file."""
    from lycoris.modules.dylora import DyLoraModule

    try:
        keys.read_header(path)  # names the file, where safetensors' own error does not
    except keys.HeaderError as e:
        raise UnmatchedKeys(f"network.init_weights: {e}") from None
    saved = load_file(str(path))
    problems = _layout_problems(saved, kohya_state(network, unet, text_encoder))
    if problems:
        raise UnmatchedKeys(f"{path}: does not fit this network (algo, dims or targets differ): " + "; ".join(problems))
    by_module = defaultdict(dict)
    for key, value in from_kohya_keys(saved, unet, text_encoder).items():
        name, _, tensor = key.partition(".")
        by_module[name][tensor] = value
    for lora in network.unet_loras + network.text_encoder_loras:
        if isinstance(lora, DyLoraModule):
            _load_dylora(lora, by_module[lora.lora_name])
        else:
            lora.load_state_dict(by_module[lora.lora_name], strict=True)
