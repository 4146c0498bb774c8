"""Bases from the checkpoints users have: one `.safetensors` file of SD1.x, SD2.x or SDXL, or a
diffusers folder, turned into a lorabake base folder — offline.

A single file carries weights but no configs, so lorabake ships the diffusers configs of the real
models in `model_configs/` — the Hugging Face repos' own files of stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 (768-v) and stabilityai/stable-diffusion-xl-base-1.0, without
version stamps, safety checker or feature extractor — and reads the tiny builtins' configs off
`bases.py`. The file's header alone decides: the architecture from its key prefixes, the prediction
type from a flag or metadata (one small tensor for SD2's heuristic), the config from a handful of
widths. diffusers' own single-file readers then convert the weights.

A base folder is the layout `bases.build_base` writes: diffusers components + `base.json`
{id, architecture, prediction, source}. Its id is a content hash, cached per (path, size, mtime) so
a 7 GB file is hashed once. Pickled checkpoints (.ckpt, .pt, .pth, .bin) can run code when loaded,
so they are refused unless the user opts in.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorabake import store
from lorabake.models import bases, keys
from lorabake.models.keys import (ARCH_MARKERS, PICKLE_SUFFIXES, TEXT_ENCODER_PREFIXES, TOKEN_EMBEDDINGS, UNET,
                                  HeaderError, architecture_of, describe_markers, read_header)

CONFIG_ROOT = Path(__file__).with_name("model_configs")
PREDICTIONS = ("epsilon", "v_prediction")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
SET_PREDICTION = "set `prediction: epsilon` or `v_prediction` under bases.<name> in configs/config.yaml"
# The real model's config per architecture: its scheduler stands in when a diffusers folder has none.
REAL_CONFIGS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl-base-1.0"}

# ComfyUI's SD2 rule (comfy/supported_models.py, SD20.model_type): v-prediction models have a
# spread-out bias on this LayerNorm, epsilon ones (2.x-base) a flat one.
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_MIN_STD = 0.09
# Stability's ModelSpec writes "epsilon" or "v"; some tools spell the diffusers name.
MODELSPEC_PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
# What a folder's content id covers: weights, configs, tokenizer files.
HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")


class BaseFileError(ValueError):
    """A checkpoint lorabake cannot use as it is; the message names the file and what to do."""


class PickleRefused(BaseFileError):
    """A pickled checkpoint, refused because loading it can run code."""


@dataclass(frozen=True)
class Detected:
    arch: str                  # sd1 | sd2 | sdxl
    prediction: str            # epsilon | v_prediction
    config: str | None         # config set (`config_names()`); None for a diffusers folder (it has its own)
    reason: str                # how it was decided, for logs and errors


# ---------------------------------------------------------------- reading a checkpoint

@dataclass
class _Checkpoint:
    """A single-file checkpoint's header: every key's shape and the metadata. Tensors are read only
    on request, unless the whole file is already in memory (a pickle)."""
    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    loaded: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def tensor(self, key: str) -> torch.Tensor:
        if self.loaded is not None:
            return self.loaded[key]
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.loaded is not None:
            return self.loaded
        from safetensors.torch import load_file

        return load_file(self.path)


def _pickle_refused(path: Path) -> PickleRefused:
    return PickleRefused(
        f"{path} is a pickle ({path.suffix}): loading a pickle can run any code hidden in the file. "
        "Convert it to .safetensors, or, if you trust where it came from, set `allow_pickle: true` "
        "under bases.<name> in configs/config.yaml.")


def _open_checkpoint(path: Path, allow_pickle: bool) -> _Checkpoint:
    if not path.is_file():
        raise BaseFileError(f"{path}: no such file" + ("; a folder is imported with import_diffusers_folder"
                                                       if path.is_dir() else ""))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refused(path)
        tensors = _load_pickle(path)
        return _Checkpoint(path, {k: tuple(t.shape) for k, t in tensors.items()}, {}, tensors)
    try:
        header = read_header(path)
    except HeaderError as e:
        raise BaseFileError(str(e)) from None
    return _Checkpoint(path, header.shapes, header.metadata)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint (under its `state_dict` key if it has one), through torch's
    restricted unpickler only: it builds tensors and plain containers and refuses everything else,
    so even an opted-in pickle cannot run code."""
    import pickle

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise PickleRefused(
            f"{path}: this pickle needs full unpickling, which would run code from the file "
            f"(torch's safe loader refused it: {str(e).splitlines()[0][:200]}). lorabake loads pickles with "
            "torch.load(weights_only=True) only, even with allow_pickle. If you trust the file, convert it "
            "once to .safetensors in a Python you control, e.g. `sd = torch.load(path, weights_only=False)"
            "['state_dict']; safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() if "
            "isinstance(v, torch.Tensor)}, 'model.safetensors')`, and point bases.<name>.path at it.") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    if not tensors:
        raise BaseFileError(f"{path}: the pickle holds no state dict of tensors; is it a Stable Diffusion checkpoint?")
    return tensors


# ---------------------------------------------------------------- detection

def detect(path: str | os.PathLike, *, prediction: str | None = None, allow_pickle: bool = False) -> Detected:
    """Architecture, prediction type and fitting shipped config of a single-file checkpoint (from its
    header) or of a diffusers folder (from its configs). `prediction`, when given, wins."""
    path = Path(path)
    _check_prediction(prediction, path)
    if path.is_dir():
        return _detect_folder(path, prediction)
    return _detect_checkpoint(_open_checkpoint(path, allow_pickle), prediction)


def _check_prediction(prediction: str | None, path: Path) -> None:
    if prediction is not None and prediction not in PREDICTIONS:
        raise BaseFileError(f"{path}: prediction {prediction!r} is not one of {', '.join(PREDICTIONS)}")


def _detect_checkpoint(ckpt: _Checkpoint, prediction: str | None) -> Detected:
    arch, arch_reason = _arch_of(ckpt)
    config = _fitting_config(ckpt, arch)
    if prediction is None:
        prediction, why = _prediction_of(ckpt, arch)
    else:
        why = "given explicitly"
    return Detected(arch, prediction, config, f"{arch}: {arch_reason}; {prediction}: {why}; shapes fit {config}")


def _arch_of(ckpt: _Checkpoint) -> tuple[str, str]:
    arch = architecture_of(ckpt.shapes)
    if arch is not None:
        return arch, "keys " + " and ".join(f"{p}…" for p in ARCH_MARKERS[arch])
    sample = ", ".join(sorted(ckpt.shapes)[:3]) or "none"
    raise BaseFileError(
        f"{ckpt.path}: not a Stable Diffusion 1/2/XL checkpoint in the original single-file layout. "
        f"Looked for keys starting with {describe_markers()}; the file's first keys are: {sample}. "
        "A diffusers folder can be given as `path:` instead.")


def _prediction_of(ckpt: _Checkpoint, arch: str) -> tuple[str, str]:
    if "v_pred" in ckpt.shapes:  # ComfyUI marks v-prediction checkpoints with an empty `v_pred` tensor
        return "v_prediction", "the file has ComfyUI's `v_pred` key"
    declared = ckpt.metadata.get("modelspec.prediction_type")
    if declared is not None:
        if declared not in MODELSPEC_PREDICTIONS:
            raise BaseFileError(f"{ckpt.path}: metadata modelspec.prediction_type is {declared!r}; lorabake "
                                f"trains {' or '.join(PREDICTIONS)} models; {SET_PREDICTION}.")
        return MODELSPEC_PREDICTIONS[declared], f"metadata modelspec.prediction_type={declared!r}"
    if arch == "sd2":
        return _sd2_prediction_from_weights(ckpt)
    return "epsilon", f"the {arch} default (no `v_pred` key, no modelspec.prediction_type)"


def _sd2_prediction_from_weights(ckpt: _Checkpoint) -> tuple[str, str]:
    """SD2 ships both kinds (2.x-base: epsilon, 768: v). A1111 runs the UNet on a test input and
    diffusers asks a pickle's global_step; ComfyUI's rule needs one small tensor, so it is ours."""
    if SD2_V_PROBE not in ckpt.shapes:
        return "epsilon", f"the sd2 fallback ({SD2_V_PROBE} absent)"
    spread = torch.std(ckpt.tensor(SD2_V_PROBE).float(), unbiased=False).item()
    guess = "v_prediction" if spread > SD2_V_MIN_STD else "epsilon"
    return guess, f"ComfyUI's heuristic: std of {SD2_V_PROBE} is {spread:.3f} (v above {SD2_V_MIN_STD})"


# ---------------------------------------------------------------- which config fits

OUTPUT_BLOCK = re.compile(re.escape(UNET) + r"output_blocks\.(\d+)\.")


def _file_signature(ckpt: _Checkpoint, arch: str) -> dict[str, int | None]:
    """The widths and depth that tell configs apart, read from key shapes (None: key absent)."""
    def dim(key: str, axis: int) -> int | None:
        shape = ckpt.shapes.get(key)
        return shape[axis] if shape is not None and len(shape) > axis else None

    output_blocks = {match[1] for key in ckpt.shapes if (match := OUTPUT_BLOCK.match(key))}
    signature = {
        "unet input channels": dim(UNET + "input_blocks.0.0.weight", 1),
        "unet width": dim(UNET + "input_blocks.0.0.weight", 0),
        "unet output blocks": len(output_blocks) or None,
        "unet context width": dim(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1),
        "vae width": dim("first_stage_model.encoder.conv_in.weight", 0),
    }
    for encoder, key in TOKEN_EMBEDDINGS[arch].items():
        signature[f"{encoder} width"] = dim(key, 1)
    return signature


def _config_signature(configs: dict[str, dict]) -> dict[str, int | None]:
    """The same numbers, read from a config set (see `config_files`)."""
    unet = configs["unet/config.json"]
    levels = len(unet["block_out_channels"])
    layers = unet["layers_per_block"]
    layers = layers if isinstance(layers, list) else [layers] * levels
    signature = {
        "unet input channels": unet["in_channels"],
        "unet width": unet["block_out_channels"][0],
        "unet output blocks": sum(n + 1 for n in layers),  # an up level has one resnet more than a down level
        "unet context width": unet["cross_attention_dim"],
        "vae width": configs["vae/config.json"]["block_out_channels"][0],
    }
    for encoder in ("text_encoder", "text_encoder_2"):
        if f"{encoder}/config.json" in configs:
            signature[f"{encoder} width"] = configs[f"{encoder}/config.json"]["hidden_size"]
    return signature


def config_names(arch: str | None = None) -> list[str]:
    """The config sets lorabake knows (for one architecture, if given): the real models' shipped
    folders first, then the tiny builtins'."""
    shipped = sorted(p.name for p in CONFIG_ROOT.iterdir() if (p / "model_index.json").is_file())
    arch_of = {**{name: _folder_arch(CONFIG_ROOT / name) for name in shipped},
               **{name: spec.arch for name, spec in bases.TINY.items()}}
    return [name for name, its_arch in arch_of.items() if arch is None or its_arch == arch]


def config_files(name: str) -> dict[str, dict]:
    """A config set as {relative path: JSON}: model_index.json, scheduler/scheduler_config.json and
    each model's config.json. The tiny builtins' are read off a build, so they follow bases.py."""
    if name in bases.TINY:
        return {path: json.loads(text) for path, text in _tiny_config_texts(name).items()}
    folder = CONFIG_ROOT / name
    if not (folder / "model_index.json").is_file():
        raise BaseFileError(f"no config set named {name!r}; known: {', '.join(config_names())}")
    return {p.relative_to(folder).as_posix(): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


@functools.lru_cache(maxsize=None)
def _tiny_config_texts(builtin: str) -> dict[str, str]:
    """The JSON configs `bases.build_tiny` writes (tokenizers aside), from a build thrown away.
    The build seeds torch's generator; the caller's random state is restored."""
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        bases.build_tiny(builtin, Path(tmp))
        return {p.relative_to(tmp).as_posix(): p.read_text() for p in sorted(Path(tmp).rglob("*.json"))
                if not p.parent.name.startswith("tokenizer")}


def _fitting_config(ckpt: _Checkpoint, arch: str) -> str:
    """The first config set (real models first, so a real checkpoint never builds a tiny model) whose
    numbers are the file's."""
    found = _file_signature(ckpt, arch)
    candidates = {}
    for name in config_names(arch):
        candidates[name] = _config_signature(config_files(name))
        if candidates[name] == found:
            return name
    differences = [f"{entry}: file {'has none' if value is None else value}, "
                   + ", ".join(f"{name} {expected.get(entry)}" for name, expected in candidates.items())
                   for entry, value in found.items()
                   if any(expected.get(entry) != value for expected in candidates.values())]
    raise BaseFileError(
        f"{ckpt.path}: an {arch} checkpoint whose shapes fit none of lorabake's {arch} configs "
        f"({', '.join(candidates)}): " + "; ".join(differences) + ". lorabake reads whole checkpoints "
        "(UNet + VAE + text encoders) of the standard sizes; save other models as a diffusers folder "
        "and give that as `path:`.")


# ---------------------------------------------------------------- diffusers folders

def _read_json(path: Path) -> dict:
    try:
        return keys.read_json(path)
    except HeaderError as e:
        raise BaseFileError(str(e)) from None


def _folder_arch(folder: Path) -> str:
    try:
        return keys.folder_architecture(folder)
    except HeaderError as e:
        raise BaseFileError(str(e)) from None


def _detect_folder(folder: Path, prediction: str | None) -> Detected:
    arch = _folder_arch(folder)
    index_class = _read_json(folder / "model_index.json").get("_class_name", "?")
    if prediction is not None:
        why = "given explicitly"
    elif (folder / SCHEDULER_CONFIG).is_file():
        prediction = _read_json(folder / SCHEDULER_CONFIG).get("prediction_type", "epsilon")
        why = SCHEDULER_CONFIG
    else:
        prediction, why = "epsilon", f"the {arch} default (no scheduler folder)"
    if prediction not in PREDICTIONS:
        raise BaseFileError(f"{folder}: the scheduler's prediction_type {prediction!r} is not one of "
                            f"{', '.join(PREDICTIONS)}; {SET_PREDICTION}")
    return Detected(arch, prediction, None, f"{arch}: diffusers folder ({index_class}); {prediction}: {why}")


# ---------------------------------------------------------------- configs for a single file

def materialize_config(detected: Detected, dest: Path) -> Path:
    """A complete diffusers folder without weights for `detected` — its config set, the scheduler
    set to its prediction type, CLIP tokenizers — usable as `config=` of diffusers'
    `from_single_file(..., local_files_only=True)`."""
    if detected.config is None:
        raise BaseFileError("a diffusers folder carries its own configs; there is nothing to materialize")
    dest = Path(dest)
    configs = config_files(detected.config)
    scheduler = configs.pop(SCHEDULER_CONFIG)
    for relative, content in configs.items():
        store.write_json(dest / relative, content)
    _write_scheduler(dest, scheduler, detected.prediction)
    bases.write_tokenizers(dest, detected.arch)
    return dest


def _write_scheduler(folder: Path, scheduler: dict, prediction: str) -> None:
    store.write_json(folder / SCHEDULER_CONFIG, scheduler | {"prediction_type": prediction})


# ---------------------------------------------------------------- importing

def import_single_file(path: str | os.PathLike, out_dir: str | os.PathLike, *, allow_pickle: bool = False,
                       prediction: str | None = None, id_cache: Path | None = None) -> dict:
    """Convert a single-file checkpoint into a base folder at `out_dir` (atomically) and return its
    base.json. Weights are converted by diffusers' own single-file readers and saved in float32,
    as the builtin bases are."""
    path, out_dir = Path(path).resolve(), Path(out_dir)
    _check_prediction(prediction, path)
    ckpt = _open_checkpoint(path, allow_pickle)
    detected = _detect_checkpoint(ckpt, prediction)
    info = _base_info(path, "single_file", detected, id_cache or _default_id_cache(out_dir))

    def build(tmp: Path) -> None:
        materialize_config(detected, tmp)
        _convert_weights(ckpt, detected.arch, tmp)
        store.write_json(tmp / "base.json", info)

    store.build_folder(out_dir, build)
    return info


def _convert_weights(ckpt: _Checkpoint, arch: str, folder: Path) -> None:
    """Convert each component with diffusers, reading its config from `folder`, and save it there
    (one at a time, so only one converted model is held beside the state dict)."""
    state = ckpt.state_dict()
    for name in ["unet", "vae", *TEXT_ENCODER_PREFIXES[arch]]:
        model = _convert_component(name, state, arch, str(folder))
        _require_all_weights(model, name, ckpt.path)
        model.save_pretrained(folder / name, safe_serialization=True)
        del model


def _convert_component(name: str, state: dict[str, torch.Tensor], arch: str, config: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name in ("unet", "vae"):
        model_class = UNet2DConditionModel if name == "unet" else AutoencoderKL
        return model_class.from_single_file(state, config=config, subfolder=name, local_files_only=True,
                                            torch_dtype=torch.float32)
    # diffusers tells SDXL's two encoders apart by width; the tiny ones share a width, so each
    # encoder is shown only its own keys.
    prefix = TEXT_ENCODER_PREFIXES[arch][name]
    own_keys = {key: tensor for key, tensor in state.items() if key.startswith(prefix)}
    model_class = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return create_diffusers_clip_model_from_ldm(model_class, own_keys, subfolder=name, config=config,
                                                local_files_only=True, torch_dtype=torch.float32)


def _require_all_weights(model: torch.nn.Module, name: str, path: Path) -> None:
    """diffusers builds models on the meta device and fills in what the file has; anything left
    there was missing from the file."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise BaseFileError(f"{path}: the checkpoint has no weights for {len(missing)} tensors of the {name} "
                            f"(e.g. {missing[0]}); is it a complete checkpoint of the model it claims to be?")


def import_diffusers_folder(path: str | os.PathLike, out_dir: str | os.PathLike, *, prediction: str | None = None,
                            allow_pickle: bool = False, id_cache: Path | None = None) -> dict:
    """Make a base folder at `out_dir` (atomically) from a diffusers folder and return its base.json.
    Weight components are symlinked, not copied: an SDXL folder is ~7 GB, and the id, a hash of
    the source's files, changes when they do. Scheduler, tokenizers and model_index are written."""
    path, out_dir = Path(path).resolve(), Path(out_dir)
    if not path.is_dir():
        raise BaseFileError(f"{path}: not a folder; a single checkpoint file is imported with import_single_file")
    detected = detect(path, prediction=prediction)
    components = ["unet", "vae", *TEXT_ENCODER_PREFIXES[detected.arch]]
    for name in components:
        _require_weights_file(path / name, allow_pickle)
    info = _base_info(path, "diffusers", detected, id_cache or _default_id_cache(out_dir))

    def build(tmp: Path) -> None:
        for name in components:
            (tmp / name).symlink_to(path / name, target_is_directory=True)
        _write_scheduler(tmp, _scheduler_of(path, detected.arch), detected.prediction)
        tokenizers = ["tokenizer", "tokenizer_2"] if detected.arch == "sdxl" else ["tokenizer"]
        if all((path / t).is_dir() for t in tokenizers):
            for name in tokenizers:
                (tmp / name).symlink_to(path / name, target_is_directory=True)
        else:
            bases.write_tokenizers(tmp, detected.arch)
        store.write_json(tmp / "model_index.json", _pipeline_index(path, [*components, "scheduler", *tokenizers]))
        store.write_json(tmp / "base.json", info)

    store.build_folder(out_dir, build)
    return info


# The files `from_pretrained` reads (diffusers' and transformers' names, whole or sharded).
SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")


def _require_weights_file(component: Path, allow_pickle: bool) -> None:
    """The file `from_pretrained` will read must be there, and be a safetensors file unless the
    user allowed pickles."""
    if any((component / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickled = next((component / name for name in PICKLED_WEIGHTS if (component / name).is_file()), None)
    if pickled is not None:
        if allow_pickle:
            return
        raise _pickle_refused(pickled)
    present = sorted(p.name for p in component.iterdir()) if component.is_dir() else []
    raise BaseFileError(f"{component}: no weights file; looked for {', '.join(SAFE_WEIGHTS)} "
                        f"(found: {', '.join(present) or 'nothing'}). Precision variants such as "
                        "*.fp16.safetensors are not read; save the model without a variant.")


def _scheduler_of(source: Path, arch: str) -> dict:
    """The source's scheduler config, or the real model's for its architecture if it has none."""
    if (source / SCHEDULER_CONFIG).is_file():
        return _read_json(source / SCHEDULER_CONFIG)
    return config_files(REAL_CONFIGS[arch])[SCHEDULER_CONFIG]


def _pipeline_index(source: Path, kept: list[str]) -> dict:
    """The source's model_index.json with the components this base does not carry (safety checker,
    feature extractor) set to [null, null], so diffusers does not look for them, and the tokenizers
    this base wrote itself listed."""
    index = _read_json(source / "model_index.json")
    absent = {k: [None, None] for k, v in index.items() if isinstance(v, list) and len(v) == 2 and k not in kept}
    written = {k: ["transformers", "CLIPTokenizer"] for k in kept if k.startswith("tokenizer") and k not in index}
    flags = {"requires_safety_checker": False} if "requires_safety_checker" in index else {}
    return index | absent | written | flags


def import_base(path: str | os.PathLike, out_dir: str | os.PathLike, *, allow_pickle: bool = False,
                prediction: str | None = None, id_cache: Path | None = None) -> dict:
    """Import a diffusers folder or a single checkpoint file, whichever `path` is."""
    importer = import_diffusers_folder if Path(path).is_dir() else import_single_file
    return importer(path, out_dir, allow_pickle=allow_pickle, prediction=prediction, id_cache=id_cache)


def _base_info(source: Path, kind: str, detected: Detected, id_cache: Path) -> dict:
    """base.json. The id covers the prediction type too: an override changes the scheduler."""
    sha256 = content_id(source, id_cache)
    return {"id": store.digest({"sha256": sha256, "prediction": detected.prediction}),
            "architecture": detected.arch, "prediction": detected.prediction,
            "source": {"path": str(source), "kind": kind, "sha256": sha256, "config": detected.config,
                       "detected": detected.reason}}


def _default_id_cache(out_dir: Path) -> Path:
    return out_dir.parent / ".content-ids.json"


# ---------------------------------------------------------------- content ids

def content_id(path: str | os.PathLike, cache_file: Path) -> str:
    """sha256 of a file's bytes, or of a folder's weight/config files by relative path. Cached in
    `cache_file` under the absolute path with the size and mtime of what was hashed, so an unchanged
    7 GB file is read once."""
    path = Path(path).resolve()
    stamp = _stamp(path)
    entry = _read_cache(cache_file).get(str(path))
    if entry is not None and entry.get("stamp") == stamp:
        return entry["sha256"]
    sha256 = _folder_sha256(path) if path.is_dir() else store.file_sha256(path)
    # Re-read just before writing so entries other jobs added meanwhile are kept.
    store.write_json(cache_file, _read_cache(cache_file) | {str(path): {"stamp": stamp, "sha256": sha256}})
    return sha256


def _hashed_files(folder: Path) -> list[Path]:
    """A folder's weight and config files (symlinks followed, hidden entries skipped), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if f.endswith(HASHED_SUFFIXES) and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _stamp(path: Path) -> list:
    """Size and mtime of a file, or of each hashed file of a folder: what invalidates a cached hash."""
    if path.is_dir():
        return [[p.relative_to(path).as_posix(), (s := p.stat()).st_size, s.st_mtime_ns] for p in _hashed_files(path)]
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _folder_sha256(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file in _hashed_files(folder):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(store.file_sha256(file).encode())
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict:
    """The id cache; a missing or damaged one is empty (it only saves time)."""
    try:
        cache = json.loads(Path(cache_file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}
