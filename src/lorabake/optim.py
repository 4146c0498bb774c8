"""Optimizers and learning-rate schedules, named and defaulted the way kohya sd-scripts does.

`optimizer.type: prodigy` with `optimizer.args: {d_coef: 2}` becomes `prodigyopt.Prodigy(groups, lr=…,
d_coef=2)`. kohya's own additions are kept (sd-scripts `library/train_util.py`, `get_optimizer`):
SGD-Nesterov gets `nesterov=True` and `momentum=0.9` unless given; Adafactor gets `relative_step=True`
unless given, and with it computes its own step size, ignores `lr`, and needs the `adafactor` schedule.

Besides building the optimizer and its schedule this module checks `optimizer.args` against the class's
own `__init__` (at config validation, so without importing torch or bitsandbytes), reports the lr each
param group really gets (D-Adaptation and Prodigy scale lr by an estimated `d`; Adafactor's relative step
has its own formula), and writes kohya's `ss_optimizer` string.

This is a bottom-floor module: config.py imports it, so it imports nothing from lorabake and imports the
optimizer libraries only inside the functions that need them.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OptimizerSpec:
    target: str  # "defining.module:Class"; the defining module is what kohya's ss_optimizer prints
    pip: str  # the distribution to install when the library is missing
    defaults: dict[str, Any] = field(default_factory=dict)  # kohya's values, used unless args set them
    fixed: dict[str, Any] = field(default_factory=dict)  # always passed; args may not set them
    adaptive: bool = False  # D-Adaptation family: the real step is d × lr, with d estimated online


OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim.adamw:AdamW", "torch"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim.adamw:AdamW8bit", "bitsandbytes"),
    # kohya's "Lion" is lucidrains' lion-pytorch.
    "lion": OptimizerSpec("lion_pytorch.lion_pytorch:Lion", "lion-pytorch"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim.lion:Lion8bit", "bitsandbytes"),
    "sgd_nesterov": OptimizerSpec("torch.optim.sgd:SGD", "torch", {"momentum": 0.9}, {"nesterov": True}),
    # bitsandbytes' SGD8bit takes nesterov= but ignores it (0.50: plain momentum); kohya passes it anyway.
    "sgd_nesterov8bit": OptimizerSpec("bitsandbytes.optim.sgd:SGD8bit", "bitsandbytes", {"momentum": 0.9},
                                      {"nesterov": True}),
    # kohya sets only relative_step; scale_parameter=True and warmup_init=False are the library's defaults.
    "adafactor": OptimizerSpec("transformers.optimization:Adafactor", "transformers", {"relative_step": True}),
    "dadapt_adam": OptimizerSpec("dadaptation.dadapt_adam:DAdaptAdam", "dadaptation", adaptive=True),
    "dadapt_lion": OptimizerSpec("dadaptation.dadapt_lion:DAdaptLion", "dadaptation", adaptive=True),
    "prodigy": OptimizerSpec("prodigyopt.prodigy:Prodigy", "prodigyopt", adaptive=True),
}
OPTIMIZER_CLASSES: dict[str, str] = {name: spec.target for name, spec in OPTIMIZER_SPECS.items()}

# __init__ parameters that are not optimizer args: the param groups, the lr (optimizer.lr and the group
# lrs set it), and bitsandbytes' `args`, an internal object that overrides all the others.
NOT_ARGS = frozenset({"self", "params", "lr", "args"})


# ---------------------------------------------------------------- checking args (at config validation)

def check_args(type: str, args: dict[str, Any]) -> None:
    """Raise ValueError if the optimizer's library is missing or `args` holds a key its class does not take."""
    spec = _spec(type)
    if importlib.util.find_spec(_library(spec.target)) is None:
        raise ValueError(f"optimizer {type} needs the {spec.pip} package: pip install {spec.pip}")
    if "lr" in args:
        raise ValueError("lr is not an optimizer arg: set optimizer.lr (and unet_lr / text_encoder_lr)")
    fixed = sorted(set(args) & set(spec.fixed))
    if fixed:
        raise ValueError(f"{fixed[0]} is always {spec.fixed[fixed[0]]} for {type} (as in kohya); remove it from args")
    known = set(_init_parameters(spec.target)) - NOT_ARGS - set(spec.fixed)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown {type} argument(s) {unknown} ({spec.target.replace(':', '.')}); "
                         f"known: {sorted(known)}")
    _check_values(type, {**spec.defaults, **args})


def _check_values(type: str, kwargs: dict[str, Any]) -> None:
    """Combinations the libraries refuse only when the optimizer is built; caught here at config time."""
    if type == "adafactor" and kwargs.get("warmup_init") and not kwargs.get("relative_step"):
        # kohya silently turns relative_step back on; a message is kinder than overriding the user.
        raise ValueError("adafactor: warmup_init=True warms up the relative step, so it needs relative_step=True")
    if type.startswith("sgd_nesterov") and (kwargs.get("momentum", 0) <= 0 or kwargs.get("dampening", 0) != 0):
        raise ValueError(f"{type}: Nesterov momentum needs momentum > 0 and dampening 0, got "
                         f"momentum={kwargs.get('momentum')}, dampening={kwargs.get('dampening', 0)}")


def _spec(type: str) -> OptimizerSpec:
    if type not in OPTIMIZER_SPECS:
        raise ValueError(f"unknown optimizer type {type!r}; known: {sorted(OPTIMIZER_SPECS)}")
    return OPTIMIZER_SPECS[type]


def _library(target: str) -> str:
    return target.split(".", 1)[0].split(":", 1)[0]


@functools.cache
def _init_parameters(target: str) -> tuple[str, ...]:
    """Names of the class's __init__ parameters. Read from its source file when it can be: parsing takes
    milliseconds, while importing torch and bitsandbytes takes seconds (and logs CUDA and kernel notices),
    and this runs each time a config is validated, including when Snakemake builds the DAG."""
    names = _parameters_from_source(target)
    return names if names is not None else _parameters_from_import(target)


def _parameters_from_source(target: str) -> tuple[str, ...] | None:
    module, class_name = target.split(":")
    path = _source_file(module)
    if path is None:
        return None
    init = _find_init(ast.parse(path.read_text(encoding="utf-8")), class_name)
    if init is None or init.args.kwarg is not None:
        return None  # inherited __init__, or **kwargs: only the imported class can tell
    return tuple(a.arg for a in init.args.posonlyargs + init.args.args + init.args.kwonlyargs)


def _source_file(module: str) -> Path | None:
    """The .py file defining `module`, found without importing anything (find_spec of a top-level name
    only searches sys.path; of a dotted name it would import the parents)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return None
    if not rest:
        return Path(spec.origin)
    base = Path(spec.origin).parent.joinpath(*rest)
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _find_init(tree: ast.Module, class_name: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return next((item for item in node.body
                         if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
    return None


def _parameters_from_import(target: str) -> tuple[str, ...]:
    signature = inspect.signature(_import_class(target).__init__)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(name for name, p in signature.parameters.items() if p.kind not in variadic)


def _import_class(target: str) -> type:
    module, class_name = target.split(":")
    # bitsandbytes logs notices about CUDA and 4-bit CPU kernels at import (e.g. "Failed to load CPU
    # gemm_4bit_forward"), and torch.jit deprecation warnings; none concern its 8-bit optimizers.
    library_logger = logging.getLogger(_library(target))
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), class_name)
    finally:
        library_logger.setLevel(level)


# ---------------------------------------------------------------- building the optimizer

def make_optimizer(type: str, param_groups: list[dict], lr: float, args: dict[str, Any]):
    """The optimizer over `param_groups` (each may carry its own "lr"; other keys such as "name" stay in
    the group), with kohya's defaults and fixed args added to `args`."""
    check_args(type, args)
    spec = OPTIMIZER_SPECS[type]
    kwargs = _keyword_args(type, args)
    groups = [dict(group) for group in param_groups]  # the caller's dicts stay as they were
    if _relative_step(type, kwargs):
        _drop_group_lrs(groups)
        lr = None  # Adafactor refuses an lr with relative_step=True: it computes every step size itself
    elif spec.adaptive:
        _check_one_lr(type, groups, lr)
    optimizer_class = _import_class(spec.target)
    return optimizer_class(groups, lr=lr, **spec.fixed, **kwargs)


def _keyword_args(type: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args`, then kohya's defaults for the keys they leave out (kohya's order, so describe() matches).
    YAML has no tuples: lists become tuples, as kohya's ast.literal_eval of "betas=(0.9,0.99)" gives."""
    kwargs = {name: tuple(value) if isinstance(value, list) else value for name, value in args.items()}
    for name, value in OPTIMIZER_SPECS[type].defaults.items():
        kwargs.setdefault(name, value)
    return kwargs


def _relative_step(type: str, kwargs: dict[str, Any]) -> bool:
    return type == "adafactor" and bool(kwargs["relative_step"])


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


def describe(type: str, args: dict[str, Any] | None = None) -> str:
    """kohya's `ss_optimizer`: the class's module path and name, then the args it was given, kohya's
    defaults included, e.g. "torch.optim.sgd.SGD(momentum=0.9)"."""
    name = _spec(type).target.replace(":", ".")
    kwargs = _keyword_args(type, args or {})
    return f"{name}({','.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name


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


# ---------------------------------------------------------------- the schedule

def check_schedule(scheduler_type: str, warmup: float, optimizer_type: str, optimizer_args: dict[str, Any]) -> None:
    """The optimizer/scheduler pairing rules of make_scheduler, for config validation."""
    adafactor = optimizer_type == "adafactor"
    relative = adafactor and _relative_step(optimizer_type, _keyword_args(optimizer_type, optimizer_args))
    _check_pairing(scheduler_type, warmup, optimizer_type, adafactor, relative)


def _check_pairing(scheduler_type: str, warmup: float, optimizer_name: str, adafactor: bool,
                   relative_step: bool) -> None:
    if scheduler_type == "adafactor" and not adafactor:
        raise ValueError(f"scheduler adafactor reports Adafactor's own relative step size; it needs optimizer "
                         f"type adafactor, got {optimizer_name}")
    if scheduler_type == "adafactor" and not relative_step:
        raise ValueError("scheduler adafactor needs the optimizer arg relative_step=True; with a manual lr "
                         "use constant_with_warmup (kohya's advice) or another schedule")
    if relative_step and scheduler_type != "adafactor":
        raise ValueError(f"Adafactor with relative_step=True computes its own lr and ignores optimizer.lr, so "
                         f"scheduler {scheduler_type} cannot act on it: set scheduler.type to adafactor, or "
                         "optimizer.args.relative_step to false to use lr with this schedule")
    if scheduler_type in ("constant", "adafactor") and warmup > 0:
        # kohya refuses this too ("constant does not require num_warmup_steps").
        hint = ("Adafactor warms up with optimizer.args.warmup_init" if scheduler_type == "adafactor"
                else "use constant_with_warmup")
        raise ValueError(f"scheduler {scheduler_type} has no warm-up (warmup={warmup:g}): {hint}, or set warmup to 0")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up steps of a warm-up given as a fraction of the run (rounded; kohya truncates)."""
    return round(warmup * total_steps)


def make_scheduler(type: str, optimizer, total_steps: int, warmup: float, cycles: int = 1, power: float = 1.0):
    """A torch LR scheduler, stepped once per optimizer step. Warm-up lasts round(warmup × total_steps)
    steps; `cycles` is for cosine_with_restarts, `power` for polynomial (which ends at diffusers' 1e-7)."""
    adafactor = _target_of(optimizer) == OPTIMIZER_SPECS["adafactor"].target
    relative = adafactor and bool(optimizer.defaults.get("relative_step"))
    _check_pairing(type, warmup, _type_name(optimizer), adafactor, relative)
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
