"""Optimizers train, their args are checked against the real classes, the reported lr is the one applied,
and each schedule follows its closed form."""
import math
import subprocess
import sys

import pytest
import torch

from lorabake import optimizers
from lorabake.config import OPTIMIZERS
from lorabake.train import optim

# A learning rate (and args) under which each optimizer visibly learns the toy task in 30 steps.
TRAINING = {
    "adamw": (1e-2, {"weight_decay": 0.01}),
    "adamw8bit": (1e-2, {"betas": [0.9, 0.99]}),
    "lion": (1e-3, {}),
    "lion8bit": (1e-3, {}),
    "sgd_nesterov": (5e-2, {}),
    "sgd_nesterov8bit": (5e-2, {}),
    "adafactor": (1e-4, {}),  # relative_step: the lr is ignored
    "dadapt_adam": (1.0, {"use_bias_correction": True}),
    "dadapt_lion": (1.0, {}),
    "prodigy": (1.0, {"d_coef": 1.0, "safeguard_warmup": True}),
}


def toy_task():
    """A 2-layer MLP whose first weight has 16 × 256 = 4096 elements: bitsandbytes keeps 8-bit state
    only for tensors of at least min_8bit_size = 4096 elements."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 16, generator=g)
    targets = torch.tanh(inputs @ torch.randn(16, 1, generator=g))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    return model, inputs, targets


def groups_of(model, lr=None):
    groups = [{"params": list(model[0].parameters()), "name": "first"},
              {"params": list(model[2].parameters()), "name": "second"}]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return groups


def train(optimizer, model, inputs, targets, steps=30, scheduler=None, each_step=None):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        losses.append(loss.item())
        loss.backward()
        if each_step:
            each_step()
        optimizer.step()
        if scheduler:
            scheduler.step()
        optimizer.zero_grad()
    return losses


def test_the_config_offers_exactly_these_optimizers():
    assert set(OPTIMIZERS) == set(optimizers.OPTIMIZER_CLASSES) == set(optimizers.OPTIMIZER_SPECS)


@pytest.mark.parametrize("kind", sorted(TRAINING))
def test_every_optimizer_trains_the_toy_model(kind):
    lr, args = TRAINING[kind]
    model, inputs, targets = toy_task()
    groups = groups_of(model, lr)
    optimizer = optim.make_optimizer(kind, groups, lr, args)
    losses = train(optimizer, model, inputs, targets)

    assert losses[-1] < 0.5 * losses[0], losses
    cls = type(optimizer)
    assert f"{cls.__module__}:{cls.__name__}" == optimizers.OPTIMIZER_CLASSES[kind]
    assert optimizers.describe(kind, args).split("(")[0] == f"{cls.__module__}.{cls.__name__}"
    assert [g["name"] for g in optimizer.param_groups] == ["first", "second"]
    assert all("lr" in g for g in groups), "the caller's groups are left as they were"
    if kind.endswith("8bit"):
        assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8
    if kind == "sgd_nesterov":
        assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9


def test_check_args_names_the_unknown_argument_and_the_known_ones():
    with pytest.raises(ValueError) as error:
        optimizers.check_args("prodigy", {"d_coeff": 2.0, "decouple": True})
    message = str(error.value)
    assert "d_coeff" in message and "'d_coef'" in message and "'safeguard_warmup'" in message
    assert "'lr'" not in message.split("known:")[1] and "'params'" not in message


@pytest.mark.parametrize("kind,args", [
    ("prodigy", {"decouple": True, "d_coef": 2.0, "use_bias_correction": True, "safeguard_warmup": True,
                 "weight_decay": 0.01, "betas": [0.9, 0.99]}),
    ("dadapt_adam", {"decouple": True, "use_bias_correction": True, "weight_decay": 0.01}),
    ("dadapt_lion", {"weight_decay": 0.01, "betas": [0.9, 0.99]}),
    ("adafactor", {"relative_step": True, "scale_parameter": True, "warmup_init": True}),
    ("adafactor", {"relative_step": False, "scale_parameter": False, "warmup_init": False}),
    ("adamw8bit", {"weight_decay": 0.1, "betas": [0.9, 0.99], "eps": 1e-6}),
    ("lion", {"weight_decay": 0.1, "betas": [0.95, 0.98]}),
    ("sgd_nesterov", {"momentum": 0.8, "weight_decay": 1e-4}),
])
def test_check_args_accepts_real_arguments(kind, args):
    optimizers.check_args(kind, args)


@pytest.mark.parametrize("kind,args,fragment", [
    ("adamw", {"lr": 1e-3}, "optimizer.lr"),
    ("sgd_nesterov", {"nesterov": False}, "nesterov is always True"),
    ("sgd_nesterov8bit", {"momentum": 0.0}, "momentum > 0"),
    ("adafactor", {"relative_step": False, "warmup_init": True}, "needs relative_step=True"),
    ("adamw", {"args": {}}, "unknown adamw argument(s) ['args']"),
])
def test_check_args_refuses_what_the_optimizer_would_refuse(kind, args, fragment):
    with pytest.raises(ValueError) as error:
        optimizers.check_args(kind, args)
    assert fragment in str(error.value)


def test_check_args_names_the_pip_package_of_a_missing_library(monkeypatch):
    missing = optimizers.OptimizerSpec("lorabake_no_such_lib.module:Optimizer", "lorabake-no-such-lib")
    monkeypatch.setitem(optimizers.OPTIMIZER_SPECS, "prodigy", missing)
    with pytest.raises(ValueError, match="pip install lorabake-no-such-lib"):
        optimizers.check_args("prodigy", {})
    with pytest.raises(ValueError, match="unknown optimizer type 'adam'"):
        optimizers.check_args("adam", {})


@pytest.mark.parametrize("kind", sorted(optimizers.OPTIMIZER_SPECS))
def test_parameters_read_from_source_match_the_imported_signature(kind):
    target = optimizers.OPTIMIZER_CLASSES[kind]
    assert optimizers._parameters_from_source(target) == optimizers._parameters_from_import(target)


def test_checking_args_imports_no_optimizer_library():
    code = ("import sys; from lorabake import optimizers\n"
            "for kind in optimizers.OPTIMIZER_SPECS: optimizers.check_args(kind, {})\n"
            "heavy = [m for m in ('torch', 'bitsandbytes', 'transformers', 'prodigyopt') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prodigy_effective_lr_is_d_times_lr_and_follows_d():
    model, inputs, targets = toy_task()
    optimizer = optim.make_optimizer("prodigy", groups_of(model), 1.0, {})
    scheduler = optim.make_scheduler("linear", optimizer, total_steps=30, warmup=0.2)
    seen = []

    def record():
        lrs = optim.effective_lrs(optimizer)
        assert lrs == [g["d"] * g["lr"] for g in optimizer.param_groups]
        seen.append((optimizer.param_groups[0]["d"], optimizer.param_groups[0]["lr"], lrs[0]))

    train(optimizer, model, inputs, targets, steps=12, scheduler=scheduler, each_step=record)
    ds = [d for d, _, _ in seen]
    assert ds[0] == 1e-6 and ds[-1] > 100 * ds[0], "d grows from d0"
    assert len({lr for _, _, lr in seen}) == len(seen), "the effective lr changes every step"
    assert seen[3][1] == pytest.approx(3 / 6) and seen[3][2] == pytest.approx(seen[3][0] * 3 / 6)


def test_adaptive_optimizers_refuse_different_group_lrs():
    model, _, _ = toy_task()
    groups = groups_of(model, 1.0)
    groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match="lrs must be equal"):
        optim.make_optimizer("dadapt_lion", groups, 1.0, {})
    groups[1]["lr"] = 0.0  # 0 freezes a group, which the D-Adaptation family allows
    optim.make_optimizer("dadapt_lion", groups, 1.0, {})


@pytest.mark.parametrize("warmup_init", [False, True])
def test_adafactor_relative_step_lr_is_its_own_formula(warmup_init):
    model, inputs, targets = toy_task()
    optimizer = optim.make_optimizer("adafactor", groups_of(model, 1e-4), 1e-4, {"warmup_init": warmup_init})
    scheduler = optim.make_scheduler("adafactor", optimizer, total_steps=5, warmup=0.0)
    weight = model[0].weight

    def expected(step: int, rms: float) -> float:
        # Shazeer & Stern 2018: min(1e-2, 1/√k) (warmup_init: 1e-6·k) × max(eps₂ = 1e-3, RMS(weight))
        return min(1e-6 * step if warmup_init else 1e-2, 1 / math.sqrt(step)) * max(1e-3, rms)

    assert scheduler.get_last_lr()[0] == pytest.approx(optim.effective_lrs(optimizer)[0])  # before step 1
    for step in range(1, 6):
        rms = weight.detach().pow(2).mean().sqrt().item()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        lrs = optim.effective_lrs(optimizer)  # what this step will use
        assert lrs[0] == pytest.approx(expected(step, rms), rel=1e-5)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == pytest.approx(lrs, rel=1e-5)  # transformers' report of the step agrees
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["lr"] != 1e-4 and lrs[0] != lrs[1], "per-group, the lr option plays no part"


TOTAL, WARMUP, CYCLES, POWER, LR = 50, 0.118, 3, 2.0, 0.1
WARMUP_STEPS = 6  # round(0.118 × 50 = 5.9): rounded, not truncated


def closed_form(kind: str, step: int) -> float:
    """The lr after `step` scheduler steps: linear warm-up from 0, then the decay over the rest."""
    if kind == "constant":
        return LR
    if step < WARMUP_STEPS:
        return LR * step / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / (TOTAL - WARMUP_STEPS)
    if kind == "constant_with_warmup":
        return LR
    if kind == "linear":
        return LR * (1 - progress)
    if kind == "cosine":
        return LR * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "cosine_with_restarts":
        return 0.0 if progress >= 1 else LR * 0.5 * (1 + math.cos(math.pi * ((CYCLES * progress) % 1)))
    lr_end = 1e-7  # polynomial: diffusers' default end
    return (LR - lr_end) * (1 - progress) ** POWER + lr_end


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine",
                                  "cosine_with_restarts", "polynomial"])
def test_each_schedule_follows_its_closed_form(kind):
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = optim.make_optimizer("adamw", [{"params": [weight]}], LR, {})
    warmup = 0.0 if kind == "constant" else WARMUP
    scheduler = optim.make_scheduler(kind, optimizer, TOTAL, warmup, cycles=CYCLES, power=POWER)
    lrs = []
    for _ in range(TOTAL + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (0, 3, WARMUP_STEPS, 13, 20, 28, 37, TOTAL - 1, TOTAL):
        assert lrs[step] == pytest.approx(closed_form(kind, step), abs=1e-12), step
    assert optim.effective_lrs(optimizer) == [optimizer.param_groups[0]["lr"]]


def one_param_optimizer(kind: str, args: dict):
    return optim.make_optimizer(kind, [{"params": [torch.nn.Parameter(torch.ones(3))]}], 1e-3, args)


@pytest.mark.parametrize("kind,args,scheduler,warmup,fragment", [
    ("adamw", {}, "adafactor", 0.0, "needs optimizer type adafactor, got adamw"),
    ("adafactor", {}, "cosine", 0.0, "set scheduler.type to adafactor"),
    ("adafactor", {"warmup_init": True}, "constant_with_warmup", 0.1, "relative_step=True computes its own lr"),
    ("adafactor", {"relative_step": False}, "adafactor", 0.0, "needs the optimizer arg relative_step=True"),
    ("adafactor", {}, "adafactor", 0.1, "warmup_init"),
    ("adamw", {}, "constant", 0.1, "use constant_with_warmup"),
])
def test_scheduler_pairings_that_cannot_work_are_refused(kind, args, scheduler, warmup, fragment):
    with pytest.raises(ValueError) as error:
        optim.make_scheduler(scheduler, one_param_optimizer(kind, args), 100, warmup)
    assert fragment in str(error.value)
    with pytest.raises(ValueError) as at_config_time:
        optimizers.check_schedule(scheduler, warmup, kind, args)
    assert str(at_config_time.value) == str(error.value)


def test_adafactor_with_a_manual_lr_takes_any_schedule():
    optimizer = one_param_optimizer("adafactor", {"relative_step": False, "scale_parameter": False})
    scheduler = optim.make_scheduler("cosine", optimizer, 10, 0.2)
    optimizers.check_schedule("cosine", 0.2, "adafactor", {"relative_step": False})
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optim.effective_lrs(optimizer) == [pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))]


@pytest.mark.parametrize("kind,args,expected", [
    ("adamw", {}, "torch.optim.adamw.AdamW"),
    ("adamw8bit", {"weight_decay": 0.01}, "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)"),
    ("lion", {"betas": [0.9, 0.99]}, "lion_pytorch.lion_pytorch.Lion(betas=(0.9, 0.99))"),
    ("sgd_nesterov", {}, "torch.optim.sgd.SGD(momentum=0.9)"),
    ("adafactor", {"scale_parameter": False},
     "transformers.optimization.Adafactor(scale_parameter=False,relative_step=True)"),
    ("prodigy", {"d_coef": 2.0, "decouple": True}, "prodigyopt.prodigy.Prodigy(d_coef=2.0,decouple=True)"),
])
def test_describe_writes_kohyas_ss_optimizer(kind, args, expected):
    assert optimizers.describe(kind, args) == expected


def test_the_bitsandbytes_kernel_notice_never_reaches_a_job_log():
    """bitsandbytes warns at import, on AVX512-BF16 CPUs, that it could not fetch a Hub kernel; the
    record is built here as bitsandbytes builds it, so the test holds on any CPU."""
    import logging

    import lorabake  # noqa: F401 — installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward "
                               "from kernels-community: %s.", ("no network",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "another warning", (), None)
    assert [logger.filter(record) for record in (notice, other)] == [False, True]


def test_adamw_is_fused_on_cuda_unless_the_config_says_otherwise():
    """torch's one-kernel AdamW on CUDA (the same update, fewer launches); the CPU keeps the default path,
    so CPU runs keep their bytes; `optimizer.args: {fused: false}` opts out."""
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert optim.make_optimizer("adamw", params, 1e-3, {}, device="cuda").defaults["fused"] is True
    assert not optim.make_optimizer("adamw", params, 1e-3, {}, device="cpu").defaults["fused"]
    assert optim.make_optimizer("adamw", params, 1e-3, {"fused": False}, device="cuda").defaults["fused"] is False
    assert "fused" not in optim.make_optimizer("lion", params, 1e-4, {}, device="cuda").defaults
