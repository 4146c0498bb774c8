"""Checkpoints in, checkpoints out: single-file bases of every architecture train, pickles wait for an
opt-in, and the LoRAs, merges and extractions lorabake writes are what other tools expect.

One project serves the whole file. The three tiny builtins are written as original-layout single
files (`sd_layout.to_single_file`) and configured as `path:` bases, exactly as a user's downloaded
checkpoints would be; four short runs train on them through the CLI. Merges are read back with
diffusers' own `from_single_file`, and extraction runs from a merged file imported as a base.
Everything is compared with what the LoRA files do when applied at run time.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import lorabake
from lorabake import cli, paths
from lorabake.models import bases, network, sd_layout
from lorabake.workspace import Workspace

from conftest import FIXTURE

# config key of the base → (builtin it is made from, architecture and prediction it must be detected as)
SINGLE_FILES = {"sd1": ("tiny-sd", "sd1", "epsilon"), "sd2v": ("tiny-sd2-v", "sd2", "v_prediction"),
                "sdxl": ("tiny-sdxl", "sdxl", "epsilon")}
# 128 px, not 64: at 64 SD1's middle block works on 1×1 latents, where self-attention sees one token
# (its q/k get no gradient) and GroupNorm normalizes two numbers (outputs ill-conditioned).
DEFAULTS = {
    "datasets": ["demo"], "resolution": 128, "buckets": {"enabled": False},
    "optimizer": {"type": "adamw", "lr": 1.0e-2}, "scheduler": {"type": "constant"},
    "training": {"max_steps": 4, "batch_size": 2, "seed": 42}, "save": {"precision": "fp32"},
}
# dim 16 on SDXL makes a file well past 1.1 MiB (3.4 MB), so its sshs_legacy_hash covers real bytes.
RUNS = {
    "sd1-lora": {"base": "sd1", "network": {"algo": "lora", "dim": 4, "alpha": 2}},
    "sd1-loha": {"base": "sd1", "network": {"algo": "loha", "dim": 4, "alpha": 2}},
    "sd2v-lora": {"base": "sd2v", "network": {"algo": "lora", "dim": 4, "alpha": 4}},
    "sdxl-lora": {"base": "sdxl", "network": {"algo": "lora", "dim": 16, "alpha": 8}},
    "sdxl-te2": {"base": "sdxl", "network": {"algo": "lora", "dim": 4, "alpha": 4}, "training": {"max_steps": 2},
                 "optimizer": {"text_encoder_lr": 1.0e-3, "text_encoder_2_lr": 4.0e-3}},
}
# SDXL's 23 blocks: EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT
XL_BLOCKS = ["EMB"] + [f"IN{i:02d}" for i in range(9)] + ["MID00", "MID01", "MID02"] + [f"OUT{i:02d}" for i in range(9)] \
    + ["OUT"]
XL_LR = dict.fromkeys(XL_BLOCKS, 1.0) | {"IN04": 0.0, "OUT00": 0.5, "OUT01": 0.5}  # IN04: no module at all
XL_DIMS = dict.fromkeys(XL_BLOCKS, 4) | {"IN08": 2, "MID01": 0}
RUNS["sdxl-pivotal-blocks"] = {
    "base": "sdxl", "network": {"algo": "lora", "dim": 4, "alpha": 4, "block_lr_weights": list(XL_LR.values()),
                                "block_dims": list(XL_DIMS.values())},
    "pivotal": {"token": "circle", "num_new_tokens": 2, "frac": 1.0, "init": "star"}, "training": {"max_steps": 3},
}
MID_ONLY = [0.0] * 12 + [1.0] + [0.0] * 12  # IN00–IN11, MID, OUT00–OUT11
XL_OUT_ONLY = [1.0 if block.startswith("OUT") and block != "OUT" else 0.0 for block in XL_BLOCKS]
MERGES = [
    {"name": "sd1-merged", "base": "sd1", "loras": [{"run": "sd1-lora", "ratio": 0.8}]},
    {"name": "sd1-pair", "base": "sd1",
     "loras": [{"run": "sd1-lora", "ratio": 0.5}, {"run": "sd1-loha", "ratio": -0.25}]},
    {"name": "sd1-mid", "base": "sd1", "loras": [{"run": "sd1-lora", "ratio": 1.0, "block_weights": MID_ONLY}]},
    {"name": "sdxl-merged", "base": "sdxl", "loras": [{"run": "sdxl-lora", "ratio": 0.7}]},
    {"name": "sdxl-out", "base": "sdxl", "loras": [{"run": "sdxl-lora", "ratio": 1.0, "block_weights": XL_OUT_ONLY}]},
]


# ---------------------------------------------------------------- the project

class Project:
    """A project folder whose config.yaml is rewritten as tests add bases and extracts; commands run
    in-process through `lorabake.cli.main`, with the project root as working directory."""

    def __init__(self, root: Path, bases: dict):
        self.root = root
        self.config = {"bases": bases, "datasets": {"demo": {"path": "datasets/demo"}}, "defaults": DEFAULTS,
                       "merges": MERGES, "extracts": []}
        (root / "configs" / "runs").mkdir(parents=True)
        shutil.copytree(FIXTURE / "datasets" / "demo", root / "datasets" / "demo")
        for name, run in RUNS.items():
            (root / "configs" / "runs" / f"{name}.yaml").write_text(yaml.safe_dump(run))
        self.write_config()
        self._done: set[tuple[str, ...]] = set()

    @property
    def config_file(self) -> Path:
        return self.root / "configs" / "config.yaml"

    def write_config(self) -> None:
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def cli(self, *args: str) -> int:
        return cli.main(["--config", str(self.config_file), *args])

    def once(self, *args: str) -> None:
        """Run a command that must succeed, unless this test session already ran it."""
        if args not in self._done:
            assert self.cli(*args) == 0, f"lorabake {' '.join(args)} failed"
            self._done.add(args)

    def base_dir(self, base: str) -> Path:
        self.once("base", "--base", base)
        return self.root / paths.base_dir(base)

    def lora(self, run: str) -> Path:
        self.base_dir(RUNS[run]["base"])
        workspace = Workspace.load(self.config_file)
        for dataset in workspace.run(run).datasets:
            self.once("cache-latents", "--dataset", dataset, "--spec", workspace.latent_job(run, dataset).name)
        self.once("train", "--run", run)
        return self.root / paths.run_lora(run)

    def merged(self, name: str) -> Path:
        merge = next(m for m in MERGES if m["name"] == name)
        self.base_dir(merge["base"])
        for lora in merge["loras"]:
            self.lora(lora["run"])
        self.once("merge", "--name", name)
        return self.root / paths.merged(name)

    def extracted(self, extract: dict) -> Path:
        """Add an extract to the config (replacing one of the same name) and run it."""
        self.config["extracts"] = [e for e in self.config["extracts"] if e["name"] != extract["name"]] + [extract]
        self.write_config()
        assert self.cli("extract", "--name", extract["name"]) == 0
        return self.root / paths.extracted(extract["name"])


def write_single_file(builtin: str, folder: Path, out: Path) -> None:
    """A builtin tiny model as the one file a user downloads; SD2-v declares its prediction in
    Stability's ModelSpec key, as kohya and SAI's own files do (nothing in its weights tells)."""
    bases.build_base(builtin, folder)
    base = bases.load_base(folder)
    metadata = {"modelspec.prediction_type": "v"} if builtin == "tiny-sd2-v" else None
    save_file(sd_layout.to_single_file(base.arch, base.unet, base.vae, base.text_encoders), out, metadata=metadata)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    top = tmp_path_factory.mktemp("checkpoints")
    checkpoints = top / "project" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for key, (builtin, _, _) in SINGLE_FILES.items():
        write_single_file(builtin, top / "builtins" / builtin, checkpoints / f"{key}.safetensors")
    bases = {key: {"path": f"checkpoints/{key}.safetensors"} for key in SINGLE_FILES}
    cwd = os.getcwd()
    made = Project(top / "project", bases)
    os.chdir(made.root)  # artifact paths (results/…) are relative to the project root
    try:
        yield made
    finally:
        os.chdir(cwd)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def modules_of(weights: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".")[0] for key in weights}


def train_log(project: Project, run: str) -> list[dict]:
    return [json.loads(line) for line in (project.root / paths.train_log(run)).read_text().splitlines()]


# ---------------------------------------------------------------- single-file bases train

TEXT_ENCODER_KEYS = {"sd1": ("lora_te_text_model_",), "sd2": ("lora_te_text_model_",),
                     "sdxl": ("lora_te1_text_model_", "lora_te2_text_model_")}


@pytest.mark.parametrize("base", SINGLE_FILES)
def test_single_file_bases_are_detected_and_train(project, base):
    builtin, arch, prediction = SINGLE_FILES[base]
    info = json.loads((project.base_dir(base) / "base.json").read_text())
    assert (info["architecture"], info["prediction"]) == (arch, prediction), info["source"]["detected"]
    assert (info["source"]["kind"], info["source"]["config"]) == ("single_file", builtin)
    scheduler = json.loads((project.base_dir(base) / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction

    run = f"{base}-lora"
    lora, records = project.lora(run), train_log(project, run)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    weights = load_file(lora)
    ups = [tensor for key, tensor in weights.items() if key.endswith(".lora_up.weight")]
    assert ups and max(up.abs().max().item() for up in ups) > 0  # kohya's LoRA starts with lora_up = 0
    for prefix in TEXT_ENCODER_KEYS[arch]:  # every text encoder trained, under kohya's names
        assert any(key.startswith(prefix) for key in weights), prefix
    meta = metadata_of(lora)
    v = prediction == "v_prediction"
    assert meta["ss_v_parameterization"] == str(v)  # what the loss used (the scheduler's prediction type)
    if base == "sd2v":
        assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == \
               ("sd_v2", "True", "stable-diffusion-v2-768-v/lora")
        assert meta["modelspec.prediction_type"] == "v"


# ---------------------------------------------------------------- pickles

def test_pickled_base_is_refused_before_any_job_until_allowed(project, tmp_path, monkeypatch, capsys):
    root = tmp_path / "pickled"
    (root / "configs").mkdir(parents=True)
    checkpoint = root / "model.ckpt"
    torch.save({"state_dict": load_file(project.root / "checkpoints/sd1.safetensors"), "global_step": 1}, checkpoint)
    config_file = root / "configs/config.yaml"
    settings = {"bases": {"mine": {"path": "model.ckpt"}},
                "datasets": {"demo": {"path": str(project.root / "datasets/demo")}}}
    monkeypatch.chdir(root)

    config_file.write_text(yaml.safe_dump(settings))
    for command in (["validate"], ["base", "--base", "mine"]):
        assert cli.main(["--config", str(config_file), *command]) == 2
        error = capsys.readouterr().err
        assert str(checkpoint) in error and "bases.mine" in error and "allow_pickle: true" in error, error
    assert not (root / "results").exists()

    settings["bases"]["mine"]["allow_pickle"] = True
    config_file.write_text(yaml.safe_dump(settings))
    assert cli.main(["--config", str(config_file), "validate"]) == 0
    assert cli.main(["--config", str(config_file), "base", "--base", "mine"]) == 0
    info = json.loads((root / paths.base_json("mine")).read_text())
    assert (info["architecture"], info["prediction"], info["source"]["config"]) == ("sd1", "epsilon", "tiny-sd")


# ---------------------------------------------------------------- extraction fixtures (used by metadata tests too)

TUNED = "sd1-tuned"
EXTRACT = {"name": "sd1-extracted", "tuned": TUNED, "base": "sd1", "dim": 8, "clamp_quantile": None, "min_diff": 0.0}


@pytest.fixture(scope="module")
def tuned_base(project) -> Path:
    """The merge of sd1-lora × 0.8, imported back as a `path:` base: a fine-tuned single file as a user has it."""
    merged = project.merged("sd1-merged")
    project.config["bases"][TUNED] = {"path": merged.relative_to(project.root).as_posix()}
    project.write_config()
    return project.base_dir(TUNED)


@pytest.fixture(scope="module")
def extracted(project, tuned_base) -> Path:
    return project.extracted(EXTRACT)


# ---------------------------------------------------------------- kohya metadata and hashes

def kohya_hashes(path: Path) -> tuple[str, str, int]:
    """sd-scripts' train_util.precalculate_safetensors_hashes, written from its definition: the
    tensors serialized by `safetensors.torch.save` with only the `ss_*` metadata; sha256 of what
    follows the 8-byte length and the header (addnet_hash_safetensors), and the first 8 hex digits of
    sha256 of the 64 KiB at 1 MiB (addnet_hash_legacy). Also the blob's length."""
    blob = save(load_file(path), {k: v for k, v in metadata_of(path).items() if k.startswith("ss_")})
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash, len(blob)


def demo_tag_frequency() -> dict[str, dict[str, int]]:
    """Tags per image folder of the demo dataset, read straight from its folders, as kohya keys them
    (each image once, whatever its repeats; an image without a caption file is captioned with its
    concept)."""
    folders: dict[str, Counter] = {}
    for image in sorted((FIXTURE / "datasets/demo").glob("*/*")):
        if image.suffix.lower() not in (".png", ".jpg"):
            continue
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text() if caption_file.exists() else image.parent.name.split("_", 1)[1]
        folders.setdefault(image.parent.name, Counter()).update(tag.strip() for tag in caption.split(",") if tag.strip())
    return {folder: dict(counts) for folder, counts in folders.items()}


SD1_SPEC = ("sd_v1", "False", "stable-diffusion-v1/lora", "diffusers")
SDXL_SPEC = ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
             "https://github.com/Stability-AI/generative-models")
# file → (network module, dim, alpha, algo in ss_network_args, (base version, ss_v2, modelspec arch, implementation))
LORA_FILES = {
    "sd1-lora": ("networks.lora", 4, 2.0, None, SD1_SPEC),
    "sd1-loha": ("lycoris.kohya", 4, 2.0, "loha", SD1_SPEC),
    "sdxl-lora": ("networks.lora", 16, 8.0, None, SDXL_SPEC),
    "sd1-extracted": ("networks.lora", 8, 8.0, None, SD1_SPEC),
}
MINIMUM_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_v_parameterization", "ss_resolution", "sshs_model_hash", "sshs_legacy_hash",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                "modelspec.resolution", "modelspec.prediction_type", "modelspec.implementation_version"}


def lora_file(project: Project, request, name: str) -> Path:
    return request.getfixturevalue("extracted") if name == "sd1-extracted" else project.lora(name)


@pytest.mark.parametrize("name", LORA_FILES)
def test_lora_metadata_has_kohyas_keys_and_values(project, request, name):
    module, dim, alpha, algo, (version, v2, architecture, implementation) = LORA_FILES[name]
    meta = metadata_of(lora_file(project, request, name))
    assert MINIMUM_KEYS <= meta.keys(), MINIMUM_KEYS - meta.keys()
    network_keys = (meta["ss_network_module"], int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]))
    assert network_keys == (module, dim, alpha)
    args = json.loads(meta["ss_network_args"])
    assert args.get("algo") == algo
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == (version, v2, "False")
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (architecture, implementation)
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.implementation_version"] == f"lorabake/{lorabake.__version__}"
    if name == "sd1-extracted":  # the base's own size: diffusers' default height = UNet sample size × 8
        unet = json.loads((project.base_dir("sd1") / "unet/config.json").read_text())
        side = unet["sample_size"] * 8
        assert meta["modelspec.resolution"] == f"{side}x{side}"
        assert "ss_tag_frequency" not in meta
    else:
        assert (meta["modelspec.resolution"], meta["ss_resolution"]) == ("128x128", "(128, 128)")
        assert json.loads(meta["ss_tag_frequency"]) == demo_tag_frequency()
        assert meta["ss_output_name"] == name and meta["ss_steps"] == "4"


@pytest.mark.parametrize("name", LORA_FILES)
def test_addnet_hashes_follow_kohyas_definition(project, request, name):
    path = lora_file(project, request, name)
    model_hash, legacy_hash, size = kohya_hashes(path)
    meta = metadata_of(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (model_hash, legacy_hash)
    if name == "sdxl-lora":  # big enough that the legacy hash covers 64 KiB of weights, not b""
        assert size > 0x110000, size
        assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]


# ---------------------------------------------------------------- merges

def load_merged(project: Project, name: str, base: str):
    """The merged file as diffusers' own single-file loader reads it, with the base folder as config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if SINGLE_FILES[base][1] == "sdxl" else StableDiffusionPipeline
    return pipeline.from_single_file(str(project.merged(name)), config=str(project.base_dir(base)),
                                     local_files_only=True, torch_dtype=torch.float32)


@torch.no_grad()
def outputs(unet, text_encoders: list) -> list[torch.Tensor]:
    """Every text encoder's hidden states (and SDXL's pooled projection), and the UNet's prediction, on
    fixed random inputs."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49408, (2, 16), generator=generator)
    results = []
    for encoder in text_encoders:
        out = encoder(ids)
        results += [out.last_hidden_state] + ([out.text_embeds] if hasattr(out, "text_embeds") else [])
    latents = torch.randn(2, 4, 16, 16, generator=generator)  # 128 px, as DEFAULTS says why
    context = torch.randn(2, 16, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size/crop numbers
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
    results.append(unet(latents, torch.tensor([500, 100]), context, added_cond_kwargs=added).sample)
    return results


def largest_difference(left: list[torch.Tensor], right: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(left, right, strict=True))


def runtime_outputs(project: Project, base: str, loras: list[tuple[str, float]]) -> list[torch.Tensor]:
    """The base with each LoRA applied at run time (the weights untouched), as A1111/ComfyUI do."""
    model = bases.load_base(project.base_dir(base))
    for run, ratio in loras:
        network.apply_weights(project.lora(run), model.unet, model.te, ratio)
    return outputs(model.unet, model.text_encoders)


@functools.cache
def plain_outputs(project: Project, base: str) -> list[torch.Tensor]:
    return runtime_outputs(project, base, [])


def pipeline_encoders(pipe) -> list:
    return [encoder for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if encoder is not None]


MERGE_CHECKS = {"sd1-merged": ("sd1", [("sd1-lora", 0.8)]), "sdxl-merged": ("sdxl", [("sdxl-lora", 0.7)]),
                "sd1-pair": ("sd1", [("sd1-lora", 0.5), ("sd1-loha", -0.25)])}


@pytest.mark.parametrize("name", MERGE_CHECKS)
def test_merged_checkpoint_computes_what_the_applied_loras_do(project, name):
    base, loras = MERGE_CHECKS[name]
    pipe = load_merged(project, name, base)
    merged = outputs(pipe.unet, pipeline_encoders(pipe))
    applied = runtime_outputs(project, base, loras)
    effect, error = largest_difference(applied, plain_outputs(project, base)), largest_difference(merged, applied)
    assert effect > 1e-3, effect  # the LoRAs matter, so agreeing means something
    assert error < 1e-4, error


def merged_unet_changes(project: Project, merge: str, base: str) -> tuple[object, dict, set[str]]:
    """The merged checkpoint's pipeline, the base's UNet weights, and the names of those the merge changed."""
    pipe = load_merged(project, merge, base)
    original = bases.load_base(project.base_dir(base)).unet.state_dict()
    moved = {name for name, weight in pipe.unet.state_dict().items() if not torch.equal(weight, original[name])}
    return pipe, original, moved


def test_mid_only_block_weights_merge_only_the_middle_block(project):
    pipe, original, moved = merged_unet_changes(project, "sd1-mid", "sd1")
    merged, base = pipe.unet.state_dict(), bases.load_base(project.base_dir("sd1"))
    assert moved and all(name.startswith("mid_block.") for name in moved), sorted(moved)[:5]
    deltas = network.module_deltas(project.lora("sd1-lora"), base.unet, base.text_encoder)
    table = network.module_table(base.unet, base.text_encoder)
    path_of = {id(module): path for path, module in base.unet.named_modules()}
    mid = {path_of[id(table[key][1])] + ".weight": delta for key, delta in deltas.items()
           if key.startswith("lora_unet_mid_block_")}
    assert mid.keys() == moved  # each MID module's weight, and nothing else
    for name, delta in mid.items():  # at the full ratio: block weight 1 × ratio 1
        expected = original[name] + delta.reshape(original[name].shape)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    text_encoder_moved = any(not torch.equal(weight, base.text_encoder.state_dict()[name])
                             for name, weight in pipe.text_encoder.state_dict().items())
    assert text_encoder_moved  # block weights are UNet blocks; the text encoder keeps the ratio


# ---------------------------------------------------------------- extraction

def test_extract_from_a_single_file_tuned_base_gives_back_the_lora(project, tuned_base, extracted):
    info = json.loads((tuned_base / "base.json").read_text())
    assert (info["architecture"], info["source"]["kind"]) == ("sd1", "single_file")
    base = bases.load_base(project.base_dir("sd1"))
    merged_deltas = network.module_deltas(project.lora("sd1-lora"), base.unet, base.text_encoder, 0.8)
    expected = {key: delta for key, delta in merged_deltas.items() if delta.any()}
    got = network.module_deltas(extracted, base.unet, base.text_encoder)
    assert got.keys() == expected.keys()
    errors = {key: ((got[key] - delta).norm() / delta.norm()).item() for key, delta in expected.items()}
    assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda item: item[1])


def test_min_diff_above_every_text_encoder_change_extracts_the_unet_only(project, tuned_base, extracted):
    base = bases.load_base(project.base_dir("sd1"))
    deltas = network.module_deltas(project.lora("sd1-lora"), base.unet, base.text_encoder, 0.8)
    text_change = max(d.abs().max().item() for key, d in deltas.items() if key.startswith("lora_te_"))
    assert text_change > 0
    unet_only = project.extracted({**EXTRACT, "name": "sd1-unet-only", "min_diff": 2 * text_change})
    both = modules_of(load_file(extracted))
    assert any(module.startswith("lora_te_") for module in both)
    assert modules_of(load_file(unet_only)) == {module for module in both if module.startswith("lora_unet_")}


def test_sdxl_trains_its_second_text_encoder_at_its_own_rate(project):
    """kohya's `--text_encoder_lr 1e-3 4e-3` on SDXL: optimizer.text_encoder_lr and text_encoder_2_lr."""
    weights = load_file(project.lora("sdxl-te2"))
    lrs = train_log(project, "sdxl-te2")[0]["lrs"]
    assert (lrs["text_encoder"], lrs["text_encoder_2"]) == (pytest.approx(1e-3), pytest.approx(4e-3))
    for prefix in ("lora_te1_", "lora_te2_"):  # both encoders' modules trained
        ups = [v for k, v in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(torch.count_nonzero(v) for v in ups), prefix
    assert metadata_of(project.lora("sdxl-te2"))["ss_text_encoder_lr"] == "[0.001, 0.004]"
    sd1 = yaml.safe_load(yaml.safe_dump({"base": "sd1", "optimizer": {"text_encoder_2_lr": 1e-3}}))
    (project.root / "configs/runs/sd1-te2.yaml").write_text(yaml.safe_dump(sd1))
    try:
        from lorabake.config import ConfigError
        with pytest.raises(ConfigError, match="text_encoder_2_lr is the learning rate of SDXL's second text encoder"):
            Workspace.load(project.config_file)
    finally:
        (project.root / "configs/runs/sd1-te2.yaml").unlink()


# ---------------------------------------------------------------- SDXL: block options and pivotal tuning

def test_sdxl_trains_with_block_options_and_pivotal_tokens_in_both_encoders(project):
    """kohya's 23 SDXL blocks: an lr weight of 0 leaves its block without modules, a block dim sets the
    rank of its modules, the lr weights set the groups' rates; the new tokens get trained vectors in
    both text encoders, saved as `clip_l` and `clip_g`."""
    run = "sdxl-pivotal-blocks"
    weights, records = load_file(project.lora(run)), train_log(project, run)
    modules = modules_of(weights)
    assert not any(m.startswith("lora_unet_input_blocks_4_") for m in modules)  # IN04: lr weight 0
    assert not any(m.startswith("lora_unet_middle_block_1_") for m in modules)  # MID01: dim 0
    assert {weights[f"{m}.lora_down.weight"].shape[0] for m in modules if m.startswith("lora_unet_input_blocks_8_")} == {2}
    assert {weights[f"{m}.lora_down.weight"].shape[0] for m in modules if m.startswith("lora_unet_input_blocks_5_")} == {4}
    lrs = records[0]["lrs"]
    assert lrs["unet:OUT00"] == pytest.approx(0.5e-2) and lrs["unet:IN05"] == pytest.approx(1e-2)
    assert "unet:IN04" not in lrs and "unet:MID01" not in lrs

    saved = load_file(project.root / paths.embeddings(run, "circle"))
    base = bases.load_base(project.base_dir("sdxl"))
    assert sorted(saved) == ["clip_g", "clip_l"]
    for key, tokenizer, encoder in (("clip_l", base.tokenizer, base.text_encoder),
                                    ("clip_g", base.tokenizer_2, base.text_encoder_2)):
        star = encoder.get_input_embeddings().weight[tokenizer("star", add_special_tokens=False).input_ids[0]]
        assert saved[key].shape == (2, star.shape[0]), key  # each encoder's own width
        assert (saved[key] - star).abs().max() > 1e-4, key  # trained away from the init word, in both


def test_sdxl_block_weights_merge_only_the_output_blocks(project):
    _, _, moved = merged_unet_changes(project, "sdxl-out", "sdxl")
    base = bases.load_base(project.base_dir("sdxl"))
    assert moved and all(name.startswith("up_blocks.") for name in moved), sorted(moved)[:5]
    deltas = network.module_deltas(project.lora("sdxl-lora"), base.unet, base.te)
    up = {key for key, delta in deltas.items() if key.startswith("lora_unet_output_blocks_") and delta.any()}
    table = network.module_table(base.unet, base.te)
    path_of = {id(module): path for path, module in base.unet.named_modules()}
    assert {path_of[id(table[key][1])] + ".weight" for key in up} == moved  # every OUT module, nothing else


def test_sdxl_embeddings_reach_both_encoders_of_the_sampling_pipeline(project, tmp_path):
    """A grid cell with the run's embeddings installs them in both of the pipeline's encoders: the same
    file with its `clip_g` vectors changed renders another picture."""
    from PIL import Image

    from lorabake.config import Pivotal
    from lorabake.prompts import Prompt
    from lorabake.render.cells import Cell, render_cells, with_pivotal
    from lorabake.train import pivotal

    run = "sdxl-pivotal-blocks"
    project.lora(run)
    cfg = Pivotal.model_validate(RUNS[run]["pivotal"])
    trained = project.root / paths.embeddings(run, "circle")
    changed = tmp_path / "circle.safetensors"
    vectors = load_file(trained)
    pivotal.save_embeddings(changed, {"clip_l": vectors["clip_l"], "clip_g": -3 * vectors["clip_g"]}, cfg, {})
    prompt = Prompt("a red circle", "", 64, 64, 1, 5.0, 2)
    cells = [Cell(project.base_dir("sdxl"), with_pivotal(prompt, (cfg, path)), "euler", embeddings=(cfg, path))
             for path in (trained, changed)]
    assert cells[0].prompt.text == "a red <s0><s1>"
    rendered = render_cells(cells, tmp_path / "cache", 1)
    first, second = (Image.open(rendered[cell.key]).tobytes() for cell in cells)
    assert first != second
