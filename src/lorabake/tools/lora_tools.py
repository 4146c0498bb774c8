"""LoRA → LoRA tools on kohya-format state dicts: resize, SVD-merge, the truncated SVD they share, and a
post-hoc EMA over a run's saved epoch files.

A kohya LoRA module NAME holds `NAME.lora_down.weight` (rank×in, or rank×in×kh×kw for a conv),
`NAME.lora_up.weight` (out×rank, or out×rank×1×1) and `NAME.alpha`, and changes its layer's weight by
ΔW = up @ down × alpha / rank. Everything here is tensor math on such dicts; no model is needed.

The tools follow kohya sd-scripts' networks/resize_lora.py, svd_merge_lora.py and
extract_lora_from_models.py, with these deliberate differences:
- a dynamic rank is the smallest rank meeting its criterion; kohya keeps one singular value more
  (the off-by-one reported in kohya-ss/sd-scripts#2194) and never goes below rank 2.
- a module never gets more rank than its delta has; kohya pads with zero singular directions.
- `conv_rank` applies to 3×3 convolutions only, as in kohya's training, extraction and svd_merge
  (kohya's resize applies its --new_conv_rank to 1×1 convolutions too).
- nothing is clamped unless `clamp_quantile` is given; svd_merge_lora.py always clamps at 0.99, and
  clamping would keep a merge from reproducing Σ ratio × ΔW.
SVDs run in float64, and so does the EMA's weighted sum. A LoRA's delta is only ever decomposed through
its factors (QR of up and downᵀ, then an SVD of the small rank×rank core), so a module costs
O((out + in)·rank²), not a full SVD.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_SINGULAR_VALUE = 1e-6  # resize_lora.py's MIN_SV: a module whose largest σ is below it is empty → rank 1

# Key parts of the other LyCORIS algos (lycoris/modules/*.py weight_list), to name what a file holds.
OTHER_ALGOS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with use_tucker",
               "dora_scale": "DoRA (weight_decompose)", "oft_": "OFT", "diff": "full (diff)",
               "w_norm": "norm", "b_norm": "norm", "lora_A": "PEFT LoRA", "lora_B": "PEFT LoRA",
               "on_input": "IA3", "weight": "IA3", "a1.": "GLoRA", "b1.": "GLoRA"}
ONLY_PLAIN_LORA = ("resize and svd-merge read plain LoRA/LoCon modules (lora_down/lora_up/alpha) only: "
                   "train with algo lora or locon, or merge this file into its base and extract a LoRA from it")


class NotLoraModule(ValueError):
    """A state-dict module that is not a plain kohya LoRA (lora_down/lora_up/alpha) module."""


class LoraFactors(NamedTuple):
    """One module as float64 matrices: ΔW = (up @ down × alpha / rank).reshape(shape)."""
    up: torch.Tensor    # out × rank
    down: torch.Tensor  # rank × (in·kh·kw)
    alpha: float
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------- reading modules

def _split_key(key: str) -> tuple[str, str]:
    """`NAME.lora_down.weight` → (NAME, "lora_down.weight"); an unknown key splits at its first dot."""
    for part in PARTS:
        if key.endswith(f".{part}"):
            return key[: -len(part) - 1], part
    name, _, part = key.partition(".")
    return name, part


def _not_lora(name: str, key: str, part: str) -> NotLoraModule:
    algo = next((algo for prefix, algo in OTHER_ALGOS.items() if part.startswith(prefix)), None)
    kind = f"a {algo} weight" if algo else "not a LoRA weight"
    return NotLoraModule(f"module {name}: key '{key}' is {kind}; {ONLY_PLAIN_LORA}")


def module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Every module's NAME, sorted, after checking that each key belongs to a plain LoRA module."""
    names = set()
    for key in state:
        name, part = _split_key(key)
        if part not in PARTS:
            raise _not_lora(name, key, part)
        names.add(name)
    for name in names:
        lora_factors(state, name)  # raises if a module is incomplete or its shapes disagree
    return sorted(names)


def lora_factors(state: dict[str, torch.Tensor], name: str) -> LoraFactors:
    """Module NAME's up, down (as float64 matrices), alpha and ΔW shape; a missing alpha means alpha = rank,
    as kohya's loaders read it."""
    down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
    if down is None or up is None:
        keys = sorted(k for k in state if _split_key(k)[0] == name)
        if not keys:
            raise KeyError(f"no LoRA module '{name}' in this state dict; it has e.g. {sorted(state)[:3]}")
        raise NotLoraModule(f"module {name} has {keys}, not both lora_down.weight and lora_up.weight; "
                            "the file is incomplete or not a LoRA")
    rank = down.shape[0]
    up_matrix = up.reshape(up.shape[0], -1)
    if down.dim() not in (2, 4) or up_matrix.shape[1] != rank:
        raise NotLoraModule(f"module {name}: lora_up {tuple(up.shape)} does not fit lora_down "
                            f"{tuple(down.shape)} (expected out×{rank}[×1×1] and {rank}×in[×kh×kw])")
    alpha = state.get(f"{name}.alpha")
    return LoraFactors(up_matrix.detach().double(), down.detach().reshape(rank, -1).double(),
                       float(rank) if alpha is None else float(alpha), (up.shape[0], *down.shape[1:]))


def module_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW = up @ down × alpha / rank of module NAME, in its layer's weight shape (float32)."""
    factors = lora_factors(state, name)
    return (factors.up @ factors.down * factors.scale).reshape(factors.shape).float()


def is_3x3(shape: tuple[int, ...]) -> bool:
    """A conv with a spatial kernel: the modules kohya ranks by conv_dim rather than dim."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


# ---------------------------------------------------------------- SVD

def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation), by sorting: torch.quantile refuses inputs over 2**24
    elements, which a full-rank SDXL conv extraction exceeds."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def clamp_to_quantile(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's extraction clamp: both factors to ±(the q-quantile of all their values), which cuts the
    few outlier weights that would overflow fp16 (extract_lora_from_models.py, --clamp_quantile 0.99)."""
    if not 0 < q <= 1:
        raise ValueError(f"clamp_quantile must be in (0, 1], got {q}; kohya's default is 0.99")
    high = _quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-high, high), down.clamp(-high, high)


def _factors_of(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, shape: tuple[int, ...],
                clamp_quantile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the rank-`rank` truncation: up = U·S, down = Vᵀ, so alpha = rank applies it as is."""
    up, down = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp_quantile is not None:
        up, down = clamp_to_quantile(up, down, clamp_quantile)
    if len(shape) == 4:  # conv: down keeps the kernel, up is a 1×1 conv
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    return down.float().contiguous(), up.float().contiguous()


def _check_rank(rank: int | None, what: str = "rank") -> None:
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{what} must be a whole number ≥ 1, got {rank!r}")


def svd_factors(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) whose product is the best rank-`rank` approximation of a weight delta (Eckart–Young),
    computed in float64. A conv delta (out×in×kh×kw) gives down rank×in×kh×kw and up out×rank×1×1.
    Apply with alpha = rank (returned rank may be lower when the delta has fewer singular values)."""
    _check_rank(rank)
    if delta.dim() not in (2, 4):
        raise ValueError(f"svd_factors takes a Linear (2-D) or Conv2d (4-D) delta, got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    return _factors_of(U, S, Vh, min(rank, S.numel()), tuple(delta.shape), clamp_quantile)


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of up @ down without forming it: up = Qu·Ru and downᵀ = Qd·Rd give
    up @ down = Qu·(Ru·Rdᵀ)·Qdᵀ, so only the small core needs an SVD (float64)."""
    # LAPACK works column-major; handing qr such a layout (a transposed view) measured ~50× faster on the
    # tall, thin factors of a LoRA than a row-major copy (torch 2.13, CPU).
    q_up, r_up = torch.linalg.qr(up.double().T.contiguous().T)
    q_down, r_down = torch.linalg.qr(down.double().T)
    core_U, S, core_Vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ core_U, S, core_Vh @ q_down.T


def _energy_kept(S: torch.Tensor, rank: int) -> float:
    total = float((S ** 2).sum())
    return 1.0 if total == 0 else float((S[:rank] ** 2).sum()) / total


def retained_energy(delta: torch.Tensor, rank: int) -> float:
    """Σ kept σ² / Σ σ² of a rank-`rank` truncation: the share of ‖ΔW‖²_F it keeps (kohya's
    "fro retained" is the square root of this)."""
    S = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    return _energy_kept(S, rank)


# ---------------------------------------------------------------- choosing ranks

def dynamic_rank(S: torch.Tensor, method: str, param: float) -> int:
    """The smallest rank meeting a kohya dynamic criterion on descending singular values S:
    sv_ratio keeps every σ ≥ σ_max / param; sv_fro keeps ‖kept‖_F / ‖all‖_F ≥ param; sv_cumulative
    keeps Σ kept σ / Σ σ ≥ param (resize_lora.py index_sv_ratio / index_sv_fro / index_sv_cumulative)."""
    if method == "sv_ratio":
        return int((S >= S[0] / param).sum())
    if method == "sv_fro":
        kept = (torch.cumsum(S ** 2, 0) / (S ** 2).sum()).sqrt()
    elif method == "sv_cumulative":
        kept = torch.cumsum(S, 0) / S.sum()
    else:
        raise ValueError(f"dynamic method must be one of {DYNAMIC_METHODS}, got {method!r}")
    return int((kept < param).sum()) + 1


def chosen_rank(S: torch.Tensor, cap: int, dynamic: str | None = None, param: float | None = None) -> int:
    """The rank a module keeps: `cap`, or the dynamic rank capped at `cap`; never more singular values
    than there are, and 1 for an empty module (kohya's rule)."""
    if S.numel() == 0 or float(S[0]) <= ZERO_SINGULAR_VALUE:
        return 1
    wanted = dynamic_rank(S, dynamic, param) if dynamic else cap
    return max(1, min(wanted, cap, S.numel()))


def _check_dynamic(dynamic: str | None, param: float | None) -> None:
    if dynamic is None:
        if param is not None:
            raise ValueError(f"dynamic_param {param} is given without a dynamic method {DYNAMIC_METHODS}")
        return
    if dynamic not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic method must be one of {DYNAMIC_METHODS}, got {dynamic!r}")
    if param is None:
        raise ValueError(f"dynamic method {dynamic} needs dynamic_param (kohya's --dynamic_param)")
    if dynamic == "sv_ratio" and param < 1:
        raise ValueError(f"sv_ratio's dynamic_param is σ_max / σ_min to keep, so ≥ 1; got {param}")
    if dynamic != "sv_ratio" and not 0 < param <= 1:
        raise ValueError(f"{dynamic}'s dynamic_param is a fraction to keep, in (0, 1]; got {param}")


# ---------------------------------------------------------------- resize

@dataclass(frozen=True)
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    retained_energy: float  # Σ kept σ² / Σ σ² of the module's ΔW
    conv3x3: bool


@dataclass(frozen=True)
class ResizeReport:
    rank: int
    conv_rank: int | None
    dynamic: str | None
    dynamic_param: float | None
    modules: list[ModuleResize]

    @property
    def mean_retained(self) -> float:
        return sum(m.retained_energy for m in self.modules) / len(self.modules)

    @property
    def min_retained(self) -> float:
        return min(m.retained_energy for m in self.modules)

    def describe(self) -> str:
        """One line in the words of kohya's ss_training_comment."""
        old = max(m.old_rank for m in self.modules)
        if self.dynamic:
            return f"Dynamic resize with {self.dynamic}: {self.dynamic_param:g} from {old} (max rank {self.rank})"
        conv = f" (conv: {self.conv_rank})" if self.conv_rank else ""
        return f"dimension is resized from {old} to {self.rank}{conv}"

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_retained": self.mean_retained, "min_retained": self.min_retained}

    def summary(self) -> str:
        """kohya's --verbose table: one line per module, then the mean and the worst."""
        lines = [f"{m.name:75} | rank {m.old_rank} → {m.new_rank}, alpha {m.new_alpha:g}, "
                 f"energy retained {m.retained_energy:.1%}" for m in self.modules]
        lines.append(f"{self.describe()}: energy retained mean {self.mean_retained:.2%}, "
                     f"min {self.min_retained:.2%}")
        return "\n".join(lines)


def _module_state(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32)}


def _resize_module(name: str, factors: LoraFactors, cap: int, dynamic: str | None,
                   param: float | None) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    U, S, Vh = product_svd(factors.up, factors.down)
    new_rank = chosen_rank(S, cap, dynamic, param)
    down, up = _factors_of(U, S, Vh, new_rank, factors.shape, None)
    # The new factors rebuild up @ down without the old alpha / rank, so keep that scale in the new alpha
    # (resize_lora.py: new_alpha = scale × new_rank): the file then applies the same ΔW.
    new_alpha = factors.scale * new_rank
    report = ModuleResize(name, factors.rank, new_rank, factors.alpha, new_alpha, _energy_kept(S, new_rank),
                          is_3x3(factors.shape))
    return _module_state(name, down, up, new_alpha), report


def resize_lora(state: dict[str, torch.Tensor], rank: int, *, conv_rank: int | None = None,
                dynamic: str | None = None, dynamic_param: float | None = None
                ) -> tuple[dict[str, torch.Tensor], ResizeReport]:
    """Every module re-factored to `rank` (3×3 convs to `conv_rank`, default `rank`), or to the rank a
    dynamic method picks per module, capped there. Alphas keep each module's alpha / rank scale."""
    _check_rank(rank)
    _check_rank(conv_rank, "conv_rank")
    _check_dynamic(dynamic, dynamic_param)
    resized, modules = {}, []
    for name in module_names(state):
        factors = lora_factors(state, name)
        cap = conv_rank if conv_rank and is_3x3(factors.shape) else rank
        module_state, report = _resize_module(name, factors, cap, dynamic, dynamic_param)
        resized |= module_state
        modules.append(report)
    if not modules:
        raise ValueError("resize_lora: the state dict holds no LoRA modules")
    return resized, ResizeReport(rank, conv_rank, dynamic, dynamic_param, modules)


# ---------------------------------------------------------------- SVD merge

def _weighted_factors(name: str, states: list[tuple[dict, float]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Factors of Σ ratio × ΔW over the LoRAs that have module NAME: ups side by side (each times
    ratio × alpha / rank), downs stacked, so their product is the weighted sum."""
    ups, downs, shapes = [], [], {}
    for index, (state, ratio) in enumerate(states, start=1):
        if f"{name}.lora_down.weight" not in state:
            continue
        factors = lora_factors(state, name)
        ups.append(factors.up * (ratio * factors.scale))
        downs.append(factors.down)
        shapes[index] = factors.shape
    if len(set(shapes.values())) > 1:
        raise ValueError(f"module {name}: ΔW shapes differ between LoRAs (LoRA number: shape) {shapes}; "
                         "LoRAs for different base models cannot be merged")
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0), next(iter(shapes.values()))


def svd_merge(states: list[tuple[dict[str, torch.Tensor], float]], rank: int, conv_rank: int | None = None,
              clamp_quantile: float | None = None) -> dict[str, torch.Tensor]:
    """One LoRA approximating Σ ratio × ΔW of several (kohya's svd_merge_lora.py): per module, over the
    LoRAs that have it, truncated to `rank` (3×3 convs to `conv_rank`, default `rank`), alpha = rank."""
    if not states:
        raise ValueError("svd_merge needs at least one (LoRA state dict, ratio) pair")
    _check_rank(rank)
    _check_rank(conv_rank, "conv_rank")
    names = sorted(set().union(*(module_names(state) for state, _ in states)))
    merged = {}
    for name in names:
        up, down, shape = _weighted_factors(name, states)
        U, S, Vh = product_svd(up, down)
        new_rank = chosen_rank(S, (conv_rank or rank) if is_3x3(shape) else rank)
        merged |= _module_state(name, *_factors_of(U, S, Vh, new_rank, shape, clamp_quantile), float(new_rank))
    return merged


# ---------------------------------------------------------------- post-hoc EMA

def ema_weights(count: int, decay: float) -> list[float]:
    """Each file's weight in an EMA updated once per file, in order: ema_1 = w_1 and
    ema_k = decay × ema_(k−1) + (1 − decay) × w_k give the first decay^(N−1) and the k-th (k ≥ 2)
    (1 − decay) × decay^(N−k); they sum to 1."""
    if count < 1:
        raise ValueError("a post-hoc EMA needs at least one file")
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay} (1 would keep the first file alone)")
    return [decay ** (count - 1)] + [(1 - decay) * decay ** (count - k) for k in range(2, count + 1)]


def _check_same_layout(states: list[dict[str, torch.Tensor]], labels: list[str]) -> None:
    """The same keys, shapes and alphas in every file: the files of one run, averaged key by key."""
    first = states[0]
    for state, label in zip(states[1:], labels[1:]):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise ValueError(f"{label} and {labels[0]} hold different keys (only in {labels[0]}: {missing[:3]}, "
                             f"only in {label}: {extra[:3]}); a post-hoc EMA averages the files of one run")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f"key {key}: shape {tuple(tensor.shape)} in {label}, {tuple(first[key].shape)} "
                                 f"in {labels[0]}; a post-hoc EMA averages the files of one run")
            if key.endswith(".alpha") and not torch.equal(tensor, first[key]):
                raise ValueError(f"key {key}: alpha {float(tensor):g} in {label}, {float(first[key]):g} in "
                                 f"{labels[0]}; factors trained under different alphas cannot be averaged")


def posthoc_ema(states: list[dict[str, torch.Tensor]], decay: float,
                labels: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The exponential moving average of several LoRA files' stored tensors, as an online EMA of the
    parameters updated once per file in order (see ema_weights). Every key is averaged as stored
    (lora_down/lora_up and LyCORIS factors alike: an EMA of the parameters, not of their ΔW); a key equal
    in every file (an alpha) is kept as it is. `labels` name the files in errors."""
    labels = labels or [f"file {i}" for i in range(1, len(states) + 1)]
    weights = ema_weights(len(states), decay)
    _check_same_layout(states, labels)
    averaged = {}
    for key, first in states[0].items():
        if all(torch.equal(state[key], first) for state in states[1:]):
            averaged[key] = first
            continue
        if not first.is_floating_point():
            raise ValueError(f"key {key}: a {first.dtype} tensor that differs between {labels[0]} and the "
                             "others; only floating-point tensors can be averaged")
        total = sum(weight * state[key].double() for weight, state in zip(weights, states))
        averaged[key] = total.to(torch.promote_types(first.dtype, torch.float32))
    return averaged


# ---------------------------------------------------------------- files

def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); re-save or re-download it") from None


def _common_value(values: list[str]) -> str:
    return values[0] if values and len(set(values)) == 1 else "Dynamic"


def resized_metadata(metadata: dict[str, str], report: ResizeReport) -> dict[str, str]:
    """The source file's metadata after a resize, as kohya edits it: new ss_network_dim / alpha (or
    "Dynamic" when modules differ), what was done in ss_training_comment, and no stale hashes
    (lora_format.save_lora writes the new sshs_model_hash)."""
    fresh = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    linear = [m for m in report.modules if not m.conv3x3] or report.modules
    fresh["ss_network_dim"] = _common_value([str(m.new_rank) for m in linear])
    fresh["ss_network_alpha"] = _common_value([f"{m.new_alpha:g}" for m in linear])
    comment = metadata.get("ss_training_comment", "")
    fresh["ss_training_comment"] = f"{report.describe()}; {comment}" if comment else report.describe()
    return fresh


# Keys of a source LoRA's metadata that describe its base model, which an SVD merge keeps.
BASE_MODEL_KEYS = ("ss_base_model_version", "ss_v2", "ss_v_parameterization", "ss_resolution", "lorabake_base_id")


def svd_merged_metadata(name: str, sources: list[tuple[str, float]], first: dict[str, str], rank: int,
                        conv_rank: int | None) -> dict[str, str]:
    """An SVD merge's metadata: the base-model facts of the first source (the sources share their
    base), a plain kohya LoRA of the new rank (alpha = rank), and what was merged."""
    kept = [k for k in first if k in BASE_MODEL_KEYS or (k.startswith("modelspec.") and k != "modelspec.title")]
    conv = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}
    return {k: first[k] for k in kept} | {
        "ss_output_name": name, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank), "ss_network_args": json.dumps(conv),
        "modelspec.title": name, "modelspec.merged_from": ", ".join(run for run, _ in sources),
        "ss_training_comment": "svd merge of " + ", ".join(f"{run} × {ratio:g}" for run, ratio in sources)}


def posthoc_ema_metadata(name: str, run: str, epochs: list[int], decay: float, first: dict[str, str],
                         last: dict[str, str]) -> dict[str, str]:
    """The first epoch file's metadata (the run's ss_* facts), at the last file's epoch and steps, with
    what was averaged: lorabake_posthoc_ema (run, epochs, decay, weights) and ss_training_comment."""
    fresh = {k: v for k, v in first.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    fresh |= {k: last[k] for k in ("ss_epoch", "ss_steps") if k in last}
    weights = ema_weights(len(epochs), decay)
    comment = (f"post-hoc EMA of {run} epochs {', '.join(map(str, epochs))}, decay {decay:g} per saved file "
               f"(weights {', '.join(f'{w:.4g}' for w in weights)})")
    old = first.get("ss_training_comment", "")
    return fresh | {"ss_output_name": name, "modelspec.title": name,
                    "ss_training_comment": f"{comment}; {old}" if old else comment,
                    "lorabake_posthoc_ema": json.dumps({"run": run, "epochs": epochs, "decay": decay,
                                                        "weights": weights})}
