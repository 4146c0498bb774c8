"""Optimizer and schedule: optimizer type and args, learning rates, the scheduler and its warm-up."""
from __future__ import annotations

from typing import Any

from lorabake import optimizers
from lorabake.config import OPTIMIZERS
from lorabake.kohya.bookkeeping import _Importer, _put
from lorabake.kohya.values import Entry, _boolean, _integer, _key_value_args, _number, _text
from lorabake.kohya.vocabulary import OPTIMIZER_NAMES, OPTIMIZERS_APPROXIMATE, SCHEDULERS, SD_SCRIPTS_DEFAULTS


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
            optimizers.check_args(optimizer, {**chosen, name: arg.value})
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
    """sd-scripts takes one rate per text encoder (a list on SDXL): the first is text_encoder_lr, a
    different second one optimizer.text_encoder_2_lr."""
    if entry is None:
        return 0.0
    if not isinstance(entry.value, list):
        return _number(entry)
    rates = [_number(Entry(entry.label, v, entry.file)) for v in entry.value]
    if len(set(rates)) > 1:  # SDXL: the second encoder's own rate
        _put(imp.run, "optimizer.text_encoder_2_lr", rates[1])
        imp.mapped.append((f"{entry.label}[1]", "optimizer.text_encoder_2_lr", rates[1]))
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
