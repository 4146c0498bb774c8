"""Building the optimizer and the learning-rate schedule of a run, and the lr each param group really
gets (D-Adaptation and Prodigy scale lr by an estimated `d`; Adafactor's relative step has its own
formula). Names, defaults and checks are lorabake.optimizers'.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from lorabake.optimizers import OPTIMIZER_SPECS, check_args, check_pairing, import_class, keyword_args, relative_step

# ---------------------------------------------------------------- building the optimizer

def make_optimizer(type: str, param_groups: list[dict], lr: float, args: dict[str, Any], device: str = "cpu"):
    """The optimizer over `param_groups` (each may carry its own "lr"; other keys such as "name" stay in
    the group), with kohya's defaults and fixed args added to `args`. On CUDA, torch's AdamW runs as one
    fused kernel unless `args` say `fused: false` (the CPU keeps the default foreach path: its bytes)."""
    check_args(type, args)
    spec = OPTIMIZER_SPECS[type]
    kwargs = keyword_args(type, args)
    if type == "adamw" and device == "cuda":
        kwargs.setdefault("fused", True)
    groups = [dict(group) for group in param_groups]  # the caller's dicts stay as they were
    if relative_step(type, kwargs):
        _drop_group_lrs(groups)
        lr = None  # Adafactor refuses an lr with relative_step=True: it computes every step size itself
    elif spec.adaptive:
        _check_one_lr(type, groups, lr)
    optimizer_class = import_class(spec.target)
    return optimizer_class(groups, lr=lr, **spec.fixed, **kwargs)


def _drop_group_lrs(groups: list[dict]) -> None:
    lrs = sorted({group.pop("lr") for group in groups if "lr" in group})
    if len(lrs) > 1:
        warnings.warn(f"adafactor with relative_step=True computes each lr itself: the group lrs {lrs} "
                      "(unet_lr / text_encoder_lr) are ignored, as in kohya", stacklevel=3)


def _check_one_lr(type: str, groups: list[dict], lr: float) -> None:
    """D-Adaptation and Prodigy estimate one step size d for all groups; their step() raises a
    RuntimeError on groups whose lr differs (0 excepted, to freeze a group). Say so before training."""
    lrs = sorted({group.get("lr", lr) for group in groups} - {0.0})
    if len(lrs) > 1:
        raise ValueError(f"{type} adapts one step size for all parameter groups, so their lrs must be equal "
                         f"(or 0), got {lrs}: leave unet_lr and text_encoder_lr unset or equal to lr")
    if lrs and lrs[0] <= 0.1:
        warnings.warn(f"{type}: lr multiplies the adapted step size d; 1.0 is usual, got {lrs[0]:g} "
                      "(kohya warns the same)", stacklevel=3)


# ---------------------------------------------------------------- the lr each group really gets

def effective_lrs(optimizer) -> list[float]:
    """The learning rate each param group gets from the next optimizer.step() (so call it before the step
    to log that step's lr): d × lr for D-Adaptation and Prodigy, as kohya logs them (all three keep `d`,
    updated at the end of each step, in every param group), Adafactor's own formula, else group["lr"]."""
    target = _target_of(optimizer)
    if target == OPTIMIZER_SPECS["adafactor"].target:
        return [_adafactor_lr(optimizer, group) for group in optimizer.param_groups]
    if any(spec.adaptive and spec.target == target for spec in OPTIMIZER_SPECS.values()):
        return [group["d"] * group["lr"] for group in optimizer.param_groups]
    return [group["lr"] for group in optimizer.param_groups]


def _target_of(optimizer) -> str:
    return f"{type(optimizer).__module__}:{type(optimizer).__qualname__}"


def _adafactor_lr(optimizer, group: dict) -> float:
    """Adafactor's step size, min(1e-2, 1/√k) (1e-6·k with warmup_init) × max(eps₂, RMS(param)) with
    relative_step and scale_parameter (transformers `Adafactor._get_lr`), for the next step k: it counts
    the step, then measures the param before updating it. It differs per parameter; like transformers'
    AdafactorSchedule, report the group's first parameter (the first that has stepped, if any)."""
    stepped = [p for p in group["params"] if optimizer.state.get(p)]
    param = stepped[0] if stepped else group["params"][0]
    steps_done = optimizer.state[param]["step"] if stepped else 0
    weight = param.detach().float()
    next_step = {"step": steps_done + 1, "RMS": weight.norm(2) / math.sqrt(weight.numel())}
    return float(optimizer._get_lr(group, next_step))


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up steps of a warm-up given as a fraction of the run (rounded; kohya truncates)."""
    return round(warmup * total_steps)


def make_scheduler(type: str, optimizer, total_steps: int, warmup: float, cycles: int = 1, power: float = 1.0):
    """A torch LR scheduler, stepped once per optimizer step. Warm-up lasts round(warmup × total_steps)
    steps; `cycles` is for cosine_with_restarts, `power` for polynomial (which ends at diffusers' 1e-7)."""
    adafactor = _target_of(optimizer) == OPTIMIZER_SPECS["adafactor"].target
    relative = adafactor and bool(optimizer.defaults.get("relative_step"))
    check_pairing(type, warmup, _type_name(optimizer), adafactor, relative)
    if type == "adafactor":
        from transformers.optimization import AdafactorSchedule

        # It reports `initial_lr` until the first step: give it the lr step 1 will really use.
        return AdafactorSchedule(optimizer, initial_lr=effective_lrs(optimizer)[0])
    from diffusers.optimization import get_scheduler

    return get_scheduler(type, optimizer, num_warmup_steps=warmup_steps(warmup, total_steps),
                         num_training_steps=total_steps, num_cycles=cycles, power=power)


def _type_name(optimizer) -> str:
    """The lorabake type of an optimizer instance (the first, where two types share a class)."""
    target = _target_of(optimizer)
    return next((name for name, spec in OPTIMIZER_SPECS.items() if spec.target == target),
                type(optimizer).__name__)
