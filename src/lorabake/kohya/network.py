"""The network: kohya's network_module / LoRA_type and network_args → network.*."""
from __future__ import annotations

import math
from typing import Callable

from lorabake.config import ALGOS, LYCORIS_ARGS
from lorabake.kohya.bookkeeping import _Importer, _lorabake_default, _put, _reason_not_carried
from lorabake.kohya.values import (Entry, KohyaImportError, _boolean, _integer, _key_value_args, _number, _numbers,
                                   _off, _text)
from lorabake.kohya.vocabulary import (GUI_ARG_NAMES, GUI_NETWORK_KEYS, GUI_NETWORKS, LYCORIS_MODULE, MODULES,
                                       SPECIFIC_REASONS, TUCKER_ALIASES, NetworkKind)
from lorabake.unet_blocks import BLOCKS, SDXL_BLOCKS


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
    _map_loraplus(imp, args)
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


LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def _map_loraplus(imp: _Importer, args: dict[str, Entry]) -> None:
    """sd-scripts reads LoRA+ from network_args (loraplus_lr_ratio=16, …), for networks.lora and LyCORIS."""
    for name in [name for name in LORAPLUS_ARGS if name in args]:
        entry = args.pop(name)
        imp.set(entry, f"network.{name}", _number(entry))


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
    """kohya's per-block options (networks.lora: 25 blocks on SD1/SD2, 23 on SDXL)."""
    if kind.conv_follows_dim:
        return
    sdxl = imp.value("sdxl") in (True, "true", "True")
    for name, dotted in (("block_dims", "network.block_dims"), ("block_alphas", "network.block_alphas")):
        entry = args.pop(name, None)
        if entry is None:
            continue
        values, wanted = _numbers(entry), len(SDXL_BLOCKS if sdxl else BLOCKS)
        if len(values) != wanted:
            imp.skip(entry, f"{len(values)} values: kohya's {'SDXL' if sdxl else 'SD1/SD2'} layout has {wanted} blocks")
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
    levels, middle = (9, 3) if sdxl else (12, 1)  # kohya's SDXL_NUM_OF_BLOCKS / SDXL_NUM_OF_MID_BLOCKS
    combined = _lr_weight_list(weights["down"], levels) + _lr_weight_list(weights["mid"], middle) \
        + _lr_weight_list(weights["up"], levels)
    if sdxl:  # the embedding and the final out layer keep 1.0, as kohya adds them
        combined = [1.0] + combined + [1.0]
    for entry in present:
        imp.set(entry, "network.block_lr_weights", [round(w, 6) for w in combined])
