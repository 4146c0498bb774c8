"""Optimizers and learning-rate schedules, named and defaulted the way kohya sd-scripts does.

`optimizer.type: prodigy` with `optimizer.args: {d_coef: 2}` becomes `prodigyopt.Prodigy(groups, lr=…,
d_coef=2)`. kohya's own additions are kept (sd-scripts `library/train_util.py`, `get_optimizer`):
SGD-Nesterov gets `nesterov=True` and `momentum=0.9` unless given; Adafactor gets `relative_step=True`
unless given, and with it computes its own step size, ignores `lr`, and needs the `adafactor` schedule.

This module is the vocabulary: which class each `optimizer.type` names, kohya's defaults, the check of
`optimizer.args` against the class's own `__init__` (at config validation, so without importing torch
or bitsandbytes), the optimizer/schedule pairing rules, and kohya's `ss_optimizer` string. Building
them, and the lr each param group really gets, is `lorabake.train.optim`'s.

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
    signature = inspect.signature(import_class(target).__init__)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(name for name, p in signature.parameters.items() if p.kind not in variadic)


def import_class(target: str) -> type:
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


def keyword_args(type: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args`, then kohya's defaults for the keys they leave out (kohya's order, so describe() matches).
    YAML has no tuples: lists become tuples, as kohya's ast.literal_eval of "betas=(0.9,0.99)" gives."""
    kwargs = {name: tuple(value) if isinstance(value, list) else value for name, value in args.items()}
    for name, value in OPTIMIZER_SPECS[type].defaults.items():
        kwargs.setdefault(name, value)
    return kwargs


def relative_step(type: str, kwargs: dict[str, Any]) -> bool:
    return type == "adafactor" and bool(kwargs["relative_step"])


def describe(type: str, args: dict[str, Any] | None = None) -> str:
    """kohya's `ss_optimizer`: the class's module path and name, then the args it was given, kohya's
    defaults included, e.g. "torch.optim.sgd.SGD(momentum=0.9)"."""
    name = _spec(type).target.replace(":", ".")
    kwargs = keyword_args(type, args or {})
    return f"{name}({','.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name



# ---------------------------------------------------------------- the schedule

def check_schedule(scheduler_type: str, warmup: float, optimizer_type: str, optimizer_args: dict[str, Any]) -> None:
    """The optimizer/scheduler pairing rules of make_scheduler, for config validation."""
    adafactor = optimizer_type == "adafactor"
    relative = adafactor and relative_step(optimizer_type, keyword_args(optimizer_type, optimizer_args))
    check_pairing(scheduler_type, warmup, optimizer_type, adafactor, relative)


def check_pairing(scheduler_type: str, warmup: float, optimizer_name: str, adafactor: bool,
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
