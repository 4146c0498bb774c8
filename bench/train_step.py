"""How fast one LoRA training step is on full-size SD1.5 / SDXL, and what lorabake's step costs on top
of a bare diffusers + LyCORIS loop.

The UNet and text encoder(s) are built from the configs lorabake ships (models/model_configs/sd15,
sdxl-base-1.0) with random weights: the same shapes and FLOPs as the real models, nothing downloaded.
A LoRA (dim 16, alpha 16, kohya's targets on the UNet and the text encoder(s)) is wrapped around them
once, by lorabake's `network.create_network`, and both loops train that same network:

- lorabake: `lorabake.train.loop.train_step` on a `Session` built as `loop.setup` builds one (the run
  config, `loop.param_groups`, `optim.make_optimizer` / `make_scheduler`, an accelerate Accelerator),
  with a latents provider that hands out the same random latents every step;
- bare: the step of diffusers' training examples, written out here: tokenize and encode the captions,
  add noise at random timesteps (DDPMScheduler), UNet forward (SDXL: the pooled embedding and the six
  size numbers as added_cond_kwargs), MSE, backward, clip the gradients' norm at 1.0 (lorabake's and
  kohya's default), a torch AdamW step over the same parameter groups, zero_grad; the loss is read back
  every step, as diffusers' examples log it.

Both get the same batch (the same latents and caption), the same precision (autocast; weights fp32)
and each a fresh AdamW. After --warmup steps of each, --steps timed steps of each alternate in ABBA
order, so drift in the machine's load hits both alike; every timed step ends in a device synchronize.
Per configuration it reports samples/s of each loop, the ratio lorabake time / bare time, peak memory,
the FLOPs of one step (forward + backward, counted by torch.utils.flop_counter.FlopCounterMode) and the
MFU against the device's peak (known GPUs only; on a CPU it is null).

    python bench/train_step.py --arch sd15 --resolution 64 --batch 1 --precision fp32 --steps 6
    python bench/train_step.py --arch sdxl --resolution 1024 --batch 1 2 4 8 --precision bf16

A batch that does not fit is recorded as out of memory and the next one is tried. Every invocation is
appended to bench/results/train_step.json (device, torch version, commit, every figure).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from lorabake import store
from lorabake.config import RunConfig
from lorabake.data.dataset import ImageItem
from lorabake.models import bases, network
from lorabake.train import loop, losses, optim
from lorabake.train.plan import Entry, TrainingPlan
from lorabake.train.session import RunInputs, Session

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "train_step.json"
MODEL_CONFIGS = Path(bases.__file__).parent / "model_configs"
ARCHS = {"sd15": ("sd15", "sd1"), "sdxl": ("sdxl-base-1.0", "sdxl")}  # --arch → (config folder, lorabake arch)
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}        # --precision → training.mixed_precision
LORA = {"algo": "lora", "dim": 16, "alpha": 16}
LR = 1e-4
SEED = 0
CAPTION = "a photo of a red fox sitting in the snow, winter forest, soft light, highly detailed"
# Dense peak TFLOPS (no sparsity) by a piece of torch.cuda.get_device_name(), most specific first:
# bf16 tensor cores (fp16 is the same) and plain fp32 (no TF32), from NVIDIA's data sheets.
PEAK_TFLOPS = [("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}), ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
               ("H200 NVL", {"bf16": 835.0, "fp32": 60.0}), ("H100", {"bf16": 989.4, "fp32": 66.9}),
               ("H200", {"bf16": 989.4, "fp32": 66.9}), ("A100", {"bf16": 312.0, "fp32": 19.5})]


# ---------------------------------------------------------------- the models, random weights

def build_base(arch: str, tokenizer_dir: Path, tiny: bool = False) -> bases.Base:
    """The full-size UNet and text encoder(s) of `arch` from lorabake's shipped configs, randomly
    initialised (no VAE: latents are random too), in eval mode and frozen, as `bases.load_base` gives
    them; with `tiny`, lorabake's tiny-sd / tiny-sdxl models instead (a smoke test of this script)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    lorabake_arch = ARCHS[arch][1]
    torch.manual_seed(SEED)
    models = tiny_models(arch) if tiny else full_size_models(arch)
    scheduler = DDPMScheduler.from_config(models.pop("scheduler"))
    for model in models.values():
        model.eval().requires_grad_(False)
    bases.write_tokenizers(tokenizer_dir, lorabake_arch)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2") if lorabake_arch == "sdxl" else None
    return bases.Base(id=f"random-{arch}", arch=lorabake_arch, vae=None, noise_scheduler=scheduler,
                      tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"), tokenizer_2=tokenizer_2,
                      **models)


def full_size_models(arch: str) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = MODEL_CONFIGS / ARCHS[arch][0]
    models = {"unet": UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text())),
              "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json")),
              "scheduler": json.loads((configs / "scheduler" / "scheduler_config.json").read_text())}
    if (configs / "text_encoder_2").is_dir():
        config_2 = CLIPTextConfig.from_json_file(configs / "text_encoder_2" / "config.json")
        models["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    return models


def tiny_models(arch: str) -> dict:
    spec = bases.TINY["tiny-sdxl" if arch == "sdxl" else "tiny-sd"]
    return {"scheduler": spec.scheduler, **{name: make() for name, make in spec.parts if name != "vae"}}


def count_parameters(model: torch.nn.Module | None) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the run, as lorabake sees it

def run_config(resolution: int, batch: int, precision: str, steps: int, bypass: bool = False) -> RunConfig:
    return RunConfig.model_validate({
        "datasets": ["bench"], "resolution": resolution, "buckets": {"enabled": False},
        "network": {**LORA, "train_unet": True, "train_text_encoder": True,
                    "args": {"bypass_mode": True} if bypass else {}},
        "optimizer": {"type": "adamw", "lr": LR}, "scheduler": {"type": "constant"},
        "training": {"batch_size": batch, "mixed_precision": PRECISIONS[precision], "max_steps": steps,
                     "max_grad_norm": 1.0, "seed": SEED},
    })


@dataclass
class FixedLatents:
    """A latents provider with `CachedLatents.__call__`'s signature, (batch, rng) → (latents, sizes,
    masks), handing out the same random latents and SDXL size numbers every step (on the CPU, as the
    cache does; the step moves them)."""

    latents: torch.Tensor
    sizes: torch.Tensor

    def __call__(self, batch: list[Entry], rng) -> tuple[torch.Tensor, torch.Tensor, None]:
        return self.latents, self.sizes, None


def bench_batch(resolution: int, batch: int) -> tuple[list[Entry], FixedLatents]:
    """`batch` entries of one square image with the same caption, and its random latents."""
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((batch, 4, resolution // 8, resolution // 8), generator=generator)
    # original (h, w), crop top-left, target (h, w): an uncropped image trained at its own size
    sizes = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch)
    entries = [Entry("bench", ImageItem(path=Path(f"/bench/{i}.png"), rel=f"1_bench/{i}.png", folder="1_bench",
                                        repeats=1, concept="bench", caption=CAPTION, has_caption_file=True,
                                        is_reg=False, width=resolution, height=resolution), (resolution, resolution))
               for i in range(batch)]
    return entries, FixedLatents(latents, sizes)


def lorabake_session(base: bases.Base, net, run: RunConfig, latents_of: FixedLatents, device: torch.device) -> Session:
    """A Session as `loop.setup` builds one, from the models in memory instead of a base folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=run.training.mixed_precision, cpu=device.type == "cpu")
    total = run.training.max_steps
    groups = loop.param_groups(net, None, run, base.arch)
    optimizer = optim.make_optimizer(run.optimizer.type, groups, run.optimizer.lr, run.optimizer.args, device.type)
    scheduler = optim.make_scheduler(run.scheduler.type, optimizer, total, run.scheduler.warmup,
                                     run.scheduler.cycles, run.scheduler.power)
    optimizer = accelerator.prepare(optimizer)
    net.train()
    inputs = RunInputs(name="bench", run=run, base_dir=Path("."), datasets={}, indexes={})
    session = Session(inputs, TrainingPlan(steps_per_epoch=total, epochs=1, total_steps=total), base, net, None,
                      optimizer, scheduler, accelerator, latents_of, losses.prediction_type(run.loss, base.noise_scheduler))
    session.unet = loop.unet_caller(base.unet, run)
    return session


# ---------------------------------------------------------------- the bare diffusers + LyCORIS step

@dataclass
class BareLoop:
    base: bases.Base
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    dtype: torch.dtype | None            # autocast dtype; None: fp32
    device: torch.device

    @classmethod
    def over(cls, base: bases.Base, net, run: RunConfig, precision: str, device: torch.device) -> "BareLoop":
        """AdamW over the same groups and learning rates, as lorabake makes it (fused on CUDA)."""
        groups = [{"params": g["params"], "lr": g["lr"]} for g in loop.param_groups(net, None, run, base.arch)]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        optimizer = torch.optim.AdamW(groups, lr=LR, fused=device.type == "cuda")
        return cls(base, [p for g in groups for p in g["params"]], optimizer, scaler, dtype, device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def encode(self, texts: list[str], sizes: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """diffusers' encode_prompt: SD1 the last hidden states; SDXL both encoders' penultimate states
        side by side, the second's projected pooled embedding, and the size numbers."""
        base = self.base
        if base.arch != "sdxl":
            return base.text_encoder(self.token_ids(base.tokenizer, texts))[0], None
        states, pooled = [], None
        for tokenizer, text_encoder in zip(base.tokenizers, base.text_encoders):
            output = text_encoder(self.token_ids(tokenizer, texts), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = getattr(output, "text_embeds", pooled)
        hidden = torch.cat(states, dim=-1)
        return hidden, {"text_embeds": pooled, "time_ids": sizes.to(self.device, hidden.dtype)}

    def token_ids(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def step(self, entries: list[Entry], latents_of: FixedLatents) -> float:
        schedule = self.base.noise_scheduler
        latents, sizes, _ = latents_of(entries, None)
        latents = latents.to(self.device)
        # Encode the captions (with gradients: the text encoders carry LoRA modules).
        with self.autocast():
            text, extra = self.encode([entry.item.caption for entry in entries], sizes)
        # Sample noise and a timestep per image, and noise the latents (the forward diffusion process).
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(entries),), device=self.device)
        noisy_latents = schedule.add_noise(latents, noise, timesteps)
        # Predict the noise and regress on it.
        with self.autocast():
            prediction = self.base.unet(noisy_latents, timesteps, text, added_cond_kwargs=extra).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        # Backward, clip the gradients' norm, step, clear.
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# ---------------------------------------------------------------- measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> tuple[float, int | None]:
    """Seconds of one step, from a synchronized start to a synchronized end, and its peak CUDA memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def cpu_attention_formulas() -> dict:
    """FlopCounterMode counts the GPU attention kernels (flash, efficient, cuDNN) but not the CPU one
    (torch 2.13): count it with the same formulas, so CPU and GPU counts agree."""
    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }
    return {op: f for op, f in formulas.items() if op not in flop_counter.flop_registry}


def counted_flops(step) -> int:
    """FLOPs of one whole step (forward, backward, clipping and optimizer; in practice the matmuls,
    convolutions and attention of forward and backward)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        step()
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for this precision, or None where it is not in the table (a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "fp32" if precision == "fp32" else "bf16"
    return next((peaks[key] * 1e12 for piece, peaks in PEAK_TFLOPS if piece in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- one configuration

def alternate(steps: int, lorabake_step, bare_step, device: torch.device) -> dict[str, list]:
    """`steps` timed steps of each loop in ABBA order; seconds and peak memory of every step."""
    sides = {"lorabake": lorabake_step, "bare": bare_step}
    seconds, memory = {name: [] for name in sides}, {name: [] for name in sides}
    for i in range(steps):
        for name in ("lorabake", "bare") if i % 2 == 0 else ("bare", "lorabake"):
            s, m = timed(sides[name], device)
            seconds[name].append(s)
            memory[name].append(m)
    return {"seconds": seconds, "memory": memory}


def paired_difference(lorabake: list[float], bare: list[float]) -> dict:
    """lorabake's step time minus the bare step's, pair by pair (each pair ran back to back): its mean
    and standard error, the overhead in seconds with the machine's drift mostly cancelled."""
    differences = [a - b for a, b in zip(lorabake, bare)]
    stderr = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else None
    return {"mean": statistics.fmean(differences), "stderr": stderr}


def profiled(step, out: Path, steps: int = 3) -> None:
    """cProfile of a few steps, by cumulative time: where the host's time goes (on a GPU, the CPU side
    only: kernels run asynchronously, and a synchronizing call shows the wait)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        step()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(80)
    store.write_text(out, text.getvalue())


def side_figures(seconds: list[float], batch: int, flops: int, peak: float | None, memory: list) -> dict:
    mean = statistics.fmean(seconds)
    return {"step_s_mean": mean, "step_s_median": statistics.median(seconds), "step_s": seconds,
            "samples_per_s": batch / mean, "flops_per_step": flops,
            "mfu": None if peak is None else flops / mean / peak,
            "peak_memory_bytes": max(memory) if memory[0] is not None else None}


def measure(base, net, arch: str, resolution: int, batch: int, precision: str, steps: int, warmup: int,
            device: torch.device, bypass: bool = False, profile_dir: Path | None = None) -> dict:
    """Build both loops for one configuration, warm them up, count one step's FLOPs, time them."""
    run = run_config(resolution, batch, precision, warmup + steps + 1, bypass)
    entries, latents_of = bench_batch(resolution, batch)
    session = lorabake_session(base, net, run, latents_of, device)
    bare = BareLoop.over(base, net, run, precision, device)
    step_number = iter(range(1, 10**9))
    lorabake_step = lambda: session.records.append(loop.train_step(session, 1, next(step_number), [entries]))  # noqa: E731
    bare_step = lambda: bare.step(entries, latents_of)  # noqa: E731
    for _ in range(warmup):
        lorabake_step()
        bare_step()
    flops = {"lorabake": counted_flops(lorabake_step), "bare": counted_flops(bare_step)}
    times = alternate(steps, lorabake_step, bare_step, device)
    peak = peak_flops(device, precision)
    figures = {name: side_figures(times["seconds"][name], batch, flops[name], peak, times["memory"][name])
               for name in ("lorabake", "bare")}
    ratio = figures["lorabake"]["step_s_mean"] / figures["bare"]["step_s_mean"]
    median_ratio = figures["lorabake"]["step_s_median"] / figures["bare"]["step_s_median"]
    if profile_dir is not None:
        profiled(lorabake_step, profile_dir / f"{arch}-{resolution}-b{batch}-{precision}-lorabake.txt")
        profiled(bare_step, profile_dir / f"{arch}-{resolution}-b{batch}-{precision}-bare.txt")
    return {"arch": arch, "resolution": resolution, "batch": batch, "precision": precision, "steps": steps,
            "warmup": warmup, "ratio": ratio, "ratio_of_medians": median_ratio,
            "paired_difference_s": paired_difference(times["seconds"]["lorabake"], times["seconds"]["bare"]), **figures,
            "peak_rss_bytes": peak_rss_bytes() if device.type == "cpu" else None,
            "peak_flops": peak, "last_loss": session.records[-1]["loss"] if session.records else None}


def release(net, device: torch.device) -> None:
    """Free what a configuration left (an out-of-memory step leaves its gradients behind)."""
    for p in net.parameters():
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress_line(row: dict) -> str:
    where = f"{row['arch']} {row['resolution']}px batch {row['batch']} {row['precision']}"
    if row.get("oom"):
        return f"{where}: out of memory"
    lb, bare = row["lorabake"], row["bare"]
    memory = lb["peak_memory_bytes"] or row["peak_rss_bytes"]
    mfu = "n/a" if lb["mfu"] is None else f"{lb['mfu']:.1%}"
    return (f"{where}: lorabake {lb['samples_per_s']:.3f} samples/s, bare {bare['samples_per_s']:.3f}, "
            f"ratio {row['ratio']:.3f} (medians {row['ratio_of_medians']:.3f}; {paired_ms(row)}), "
            f"{lb['flops_per_step'] / 1e12:.3f} TFLOP/step, MFU {mfu}, peak {memory / 2**30:.1f} GiB")


def paired_ms(row: dict) -> str:
    difference = row["paired_difference_s"]
    spread = "" if difference["stderr"] is None else f" ± {difference['stderr'] * 1e3:.1f}"
    return f"lorabake − bare {difference['mean'] * 1e3:+.1f}{spread} ms/step"


# ---------------------------------------------------------------- main

def commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "bench/train_step.py"],
                           capture_output=True, text=True)
    return (done.stdout.strip() or "unknown") + ("+uncommitted" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--arch", choices=list(ARCHS), default="sd15", help="SD1.5 or SDXL base 1.0 (default sd15)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="batch sizes, each its own configuration, smallest first; the first that runs out of "
                        "memory ends the list")
    parser.add_argument("--precision", choices=list(PRECISIONS), nargs="+", default=["bf16"],
                        help="autocast dtype (weights stay fp32, as lorabake trains); fp16 needs CUDA")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    parser.add_argument("--bypass", action="store_true",
                        help="lycoris' bypass mode (x·Wᵀ + up(down(x))) instead of its default W + ΔW per call")
    parser.add_argument("--tiny", action="store_true", help="lorabake's tiny-sd / tiny-sdxl instead of the "
                        "full-size models: a smoke test of this script, not a benchmark")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also cProfile 3 steps of each loop per configuration into DIR (host time)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on a CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file the invocation is appended to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "fp16" in args.precision and device.type != "cuda":
        sys.exit("--precision fp16 needs a CUDA device (lorabake refuses it elsewhere); use bf16 or fp32")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.arch, Path(tmp), args.tiny)
    settings = run_config(args.resolution, 1, "fp32", 1, args.bypass)
    loop.configure_models(base, settings)  # frozen, SDPA attention
    net = network.create_network(base.unet, base.te, settings.network, SEED)
    for model in (base.unet, *base.text_encoders, net):
        model.to(device)
    print(f"{args.arch}: built in {time.monotonic() - began:.0f} s on {device_name(device)}", flush=True)
    rows = []
    for precision in args.precision:
        for batch in sorted(args.batch):
            try:
                rows.append(measure(base, net, args.arch, args.resolution, batch, precision, args.steps, args.warmup,
                                    device, args.bypass, args.profile))
            except torch.OutOfMemoryError:
                rows.append({"arch": args.arch, "resolution": args.resolution, "batch": batch,
                             "precision": precision, "oom": True})
            release(net, device)
            print(progress_line(rows[-1]), flush=True)
            if rows[-1].get("oom"):
                break  # a larger batch will not fit either
    write_results(args, device, base, net, rows, time.monotonic() - began)


def write_results(args, device: torch.device, base: bases.Base, net, rows: list[dict], wall_s: float) -> None:
    import diffusers
    import transformers

    invocation = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "lycoris": metadata.version("lycoris-lora"), "commit": commit(), "torch_threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "memory_measure": "torch.cuda.max_memory_allocated per step, max over the timed steps" if device.type == "cuda"
        else "peak RSS of the whole process (resource.getrusage ru_maxrss), model building included",
        "mfu_note": None if device.type == "cuda" else "no known peak FLOP/s for a CPU: MFU is null",
        "parameters": {"unet": count_parameters(base.unet), "text_encoders": sum(map(count_parameters, base.text_encoders)),
                       "lora": sum(p.numel() for p in net.parameters())},
        "lora": LORA, "bypass_mode": args.bypass, "tiny_models": args.tiny, "lr": LR, "caption": CAPTION,
        "wall_s": round(wall_s, 1), "rows": rows,
    }
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"invocations": []}
    previous["invocations"].append(invocation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store.write_json(args.out, previous)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
