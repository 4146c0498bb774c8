"""Bases from users' checkpoints: detection from headers, shipped configs, single-file and diffusers
folder imports, pickle refusal, content ids.

The tiny builtins are written as real single-file checkpoints (`sd_layout.to_single_file`), imported
back, and must compute exactly what the originals compute. Real-model headers are synthesized with
real key names and shapes; their zero tensors are a sparse hole in the file, never written.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake import store
from lorabake.models import base_files, bases, sd_layout

UNET = "model.diffusion_model."
TINY = {"tiny-sd": ("sd1", "epsilon"), "tiny-sd2-v": ("sd2", "v_prediction"), "tiny-sdxl": ("sdxl", "epsilon")}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The three tiny builtins, built as diffusers base folders."""
    root = tmp_path_factory.mktemp("tiny")
    for builtin in TINY:
        bases.build_base(builtin, root / builtin)
    return {builtin: root / builtin for builtin in TINY}


@pytest.fixture(scope="module")
def single_files(tiny, tmp_path_factory) -> dict[str, Path]:
    """Each tiny builtin as an original-layout .safetensors; SD2-v declares its prediction the way
    kohya and Stability do (modelspec), since nothing in its weights gives it away."""
    root = tmp_path_factory.mktemp("single")
    files = {}
    for builtin, base_dir in tiny.items():
        base = bases.load_base(base_dir)
        metadata = {"modelspec.prediction_type": "v"} if builtin == "tiny-sd2-v" else None
        files[builtin] = root / f"{builtin}.safetensors"
        save_file(sd_layout.to_single_file(base.arch, base.unet, base.vae, base.text_encoders), files[builtin],
                  metadata=metadata)
    return files


@pytest.fixture(scope="module")
def imported(single_files, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("results") / "base"
    return {builtin: (base_files.import_single_file(path, root / builtin), root / builtin)
            for builtin, path in single_files.items()}


def write_header_only(path: Path, entries: dict[str, tuple | torch.Tensor], metadata: dict | None = None) -> Path:
    """A valid .safetensors file whose shape-only entries are uint8 zeros left as a sparse hole, so
    headers of real-sized models cost nothing; tensors given as tensors are written (float32)."""
    header, chunks, offset = {}, [], 0
    for key, entry in entries.items():
        data = entry.float().numpy().tobytes() if isinstance(entry, torch.Tensor) else None
        shape = list(entry.shape) if isinstance(entry, torch.Tensor) else list(entry)
        size = len(data) if data is not None else math.prod(shape)
        header[key] = {"dtype": "F32" if data is not None else "U8", "shape": shape,
                       "data_offsets": [offset, offset + size]}
        chunks.append((offset, data))
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        start = f.tell()
        for at, data in chunks:
            if data is not None:
                f.seek(start + at)
                f.write(data)
        f.truncate(start + offset)
    return path


# Real-model numbers: UNet context width, output blocks, text encoders' token embeddings (vocab × width).
REAL = {
    "sd1": (768, 12, {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 768}),
    "sd2": (1024, 12, {"cond_stage_model.model.token_embedding.weight": 1024}),
    "sdxl": (2048, 9, {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": 768,
                       "conditioner.embedders.1.model.token_embedding.weight": 1280}),
}


def real_header(arch: str, unet_width: int = 320) -> dict[str, tuple]:
    """The keys detection reads, at the real models' shapes."""
    context, output_blocks, encoders = REAL[arch]
    entries = {UNET + "input_blocks.0.0.weight": (unet_width, 4, 3, 3),
               UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, context),
               "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    entries |= {UNET + f"output_blocks.{i}.0.out_layers.3.bias": (1,) for i in range(output_blocks)}
    entries |= {key: (49408, width) for key, width in encoders.items()}
    if arch == "sdxl":
        entries[UNET + "label_emb.0.0.weight"] = (1280, 2816)
    return entries


# ---------------------------------------------------------------- the tiny models, end to end

def test_tiny_single_files_are_detected(single_files):
    for builtin, path in single_files.items():
        detected = base_files.detect(path)
        assert (detected.arch, detected.prediction, detected.config) == (*TINY[builtin], builtin)
    assert "modelspec.prediction_type" in base_files.detect(single_files["tiny-sd2-v"]).reason


@pytest.mark.parametrize("builtin", TINY)
def test_imported_single_file_computes_what_the_original_does(builtin, tiny, imported):
    info, base_dir = imported[builtin]
    original, copy = bases.load_base(tiny[builtin]), bases.load_base(base_dir)
    assert bases.base_info(base_dir) == info
    assert (info["architecture"], info["prediction"]) == TINY[builtin]
    assert info["source"]["kind"] == "single_file" and copy.noise_scheduler.config.prediction_type == TINY[builtin][1]

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, original.unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if builtin == "tiny-sdxl":  # pooled text embedding + size/crop ids
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, original.text_encoder_2.config.projection_dim,
                                                                   generator=generator),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    ids = original.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(original.unet(latents, 500, context, **extra).sample,
                           copy.unet(latents, 500, context, **extra).sample)
        for encoder, copied in zip(original.text_encoders, copy.text_encoders, strict=True):
            assert torch.equal(encoder(ids).last_hidden_state, copied(ids).last_hidden_state)
        image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
        assert torch.equal(original.vae.encode(image).latent_dist.mean, copy.vae.encode(image).latent_dist.mean)
    # SD1 pads with the end token; OpenCLIP (SD2, SDXL's second tokenizer) with "!"
    assert copy.tokenizer.pad_token == ("!" if builtin == "tiny-sd2-v" else "<|endoftext|>")
    assert copy.tokenizer_2 is None or copy.tokenizer_2.pad_token == "!"


def test_reimport_replaces_the_base_in_one_step_and_an_override_changes_the_id(single_files, imported):
    info, base_dir = imported["tiny-sd"]
    again = base_files.import_single_file(single_files["tiny-sd"], base_dir)
    assert again == info
    overridden = base_files.import_single_file(single_files["tiny-sd"], base_dir, prediction="v_prediction")
    assert overridden["prediction"] == "v_prediction" and overridden["id"] != info["id"]
    assert bases.load_base(base_dir).noise_scheduler.config.prediction_type == "v_prediction"
    # no temp folders left beside the bases; the id cache sits there
    assert sorted(p.name for p in base_dir.parent.iterdir()) == [".content-ids.json", *sorted(TINY)]
    assert base_files.import_single_file(single_files["tiny-sd"], base_dir) == info  # and back


# ---------------------------------------------------------------- pickles

def test_pickles_are_refused_without_the_opt_in(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, checkpoint)
    for call in (lambda: base_files.detect(checkpoint),
                 lambda: base_files.import_single_file(checkpoint, tmp_path / "out")):
        with pytest.raises(base_files.PickleRefused) as error:
            call()
        message = str(error.value)
        assert str(checkpoint) in message and "run" in message and ".safetensors" in message
        assert "set `allow_pickle: true` under bases.<name> in configs/config.yaml" in message
    assert not (tmp_path / "out").exists()


def test_opted_in_pickle_imports_like_the_safetensors_file(single_files, imported, tmp_path):
    state = load_file(single_files["tiny-sd"])
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, checkpoint)  # the layout of SD's own .ckpt files
    info = base_files.import_single_file(checkpoint, tmp_path / "base" / "pickled", allow_pickle=True)
    assert (info["architecture"], info["source"]["config"]) == ("sd1", "tiny-sd")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        from_pickle = load_file(tmp_path / "base" / "pickled" / part)
        from_safetensors = load_file(imported["tiny-sd"][1] / part)
        assert from_pickle.keys() == from_safetensors.keys()
        assert all(torch.equal(from_pickle[k], from_safetensors[k]) for k in from_pickle)


# ---------------------------------------------------------------- detection from headers

@pytest.mark.parametrize("arch, config", [("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl-base-1.0")])
def test_real_model_headers_pick_the_real_configs(arch, config, tmp_path):
    detected = base_files.detect(write_header_only(tmp_path / "real.safetensors", real_header(arch)))
    assert (detected.arch, detected.config, detected.prediction) == (arch, config, "epsilon")


def sd2_with_probe(tmp_path: Path, spread: float, metadata: dict | None = None) -> Path:
    probe = torch.linspace(-1, 1, 1280)
    probe = probe / probe.std(unbiased=False) * spread
    entries = real_header("sd2") | {base_files.SD2_V_PROBE: probe}
    return write_header_only(tmp_path / f"sd2-{spread}.safetensors", entries, metadata)


def test_prediction_flag_metadata_heuristic_and_override(tmp_path):
    v_flagged = write_header_only(tmp_path / "xl-v.safetensors", real_header("sdxl") | {"v_pred": (0,)})
    assert base_files.detect(v_flagged).prediction == "v_prediction"
    assert base_files.detect(v_flagged, prediction="epsilon").prediction == "epsilon"  # the user wins

    spread, flat = sd2_with_probe(tmp_path, 0.2), sd2_with_probe(tmp_path, 0.01)
    assert base_files.detect(spread).prediction == "v_prediction"
    assert "0.200" in base_files.detect(spread).reason
    assert base_files.detect(flat).prediction == "epsilon"
    declared = sd2_with_probe(tmp_path, 0.2, {"modelspec.prediction_type": "epsilon"})
    assert base_files.detect(declared).prediction == "epsilon"  # declared beats guessed

    odd = write_header_only(tmp_path / "flow.safetensors", real_header("sd1"), {"modelspec.prediction_type": "flow"})
    with pytest.raises(base_files.BaseFileError, match="flow"):
        base_files.detect(odd)
    with pytest.raises(base_files.BaseFileError, match="not one of"):
        base_files.detect(flat, prediction="v")


def test_unknown_layouts_name_the_file_and_what_was_looked_for(tmp_path):
    lora = write_header_only(tmp_path / "a_lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": (4, 320)})
    with pytest.raises(base_files.BaseFileError) as error:
        base_files.detect(lora)
    message = str(error.value)
    assert "a_lora.safetensors" in message and "lora_unet_down_blocks_0" in message
    for marker in ("conditioner.embedders.1.model.", UNET + "label_emb.", "cond_stage_model.model.",
                   "cond_stage_model.transformer."):
        assert marker in message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(base_files.BaseFileError, match="garbage.safetensors: not a readable"):
        base_files.detect(garbage)


def test_shapes_that_fit_no_shipped_config_are_explained(tmp_path):
    odd_width = write_header_only(tmp_path / "wide.safetensors", real_header("sd1", unet_width=64))
    with pytest.raises(base_files.BaseFileError, match=r"wide.safetensors.*unet width: file 64, sd15 320, tiny-sd 32"):
        base_files.detect(odd_width)
    unet_only = {k: v for k, v in real_header("sdxl").items() if not k.startswith("first_stage_model.")}
    with pytest.raises(base_files.BaseFileError, match="vae width: file has none, sdxl-base-1.0 128, tiny-sdxl 32"):
        base_files.detect(write_header_only(tmp_path / "unet-only.safetensors", unet_only))


# ---------------------------------------------------------------- shipped configs

def test_shipped_real_configs_build_the_real_models():
    """Parameter counts of SD1.5, SD2.1 and SDXL base 1.0 as published (UNet, VAE, text encoders);
    a wrong width, depth or head layout in a config changes them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    published = {"sd15": (859_520_964, 83_653_863, [123_060_480]),
                 "sd21": (865_910_724, 83_653_863, [340_387_840]),
                 "sdxl-base-1.0": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840])}
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    for name, (unet_size, vae_size, encoder_sizes) in published.items():
        folder = base_files.CONFIG_ROOT / name
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            encoders = [cls(CLIPTextConfig.from_pretrained(folder / sub)) for cls, sub in
                        ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
                        if (folder / sub).is_dir()]
        assert (count(unet), count(vae), [count(e) for e in encoders]) == (unet_size, vae_size, encoder_sizes), name


def test_tiny_config_sets_follow_models_py(tiny):
    """The tiny builtins' configs are read off a build; the build leaves the caller's RNG alone."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    configs = base_files.config_files("tiny-sdxl")
    assert torch.equal(torch.rand(3), expected)
    assert configs["unet/config.json"]["cross_attention_dim"] == bases.tiny_unet("sdxl").config.cross_attention_dim
    assert configs["model_index.json"] == json.loads((tiny["tiny-sdxl"] / "model_index.json").read_text())
    assert base_files.config_names("sd2") == ["sd21", "tiny-sd2-v"]


def test_materialized_config_is_a_complete_weightless_pipeline_folder(tmp_path):
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

    detected = base_files.Detected("sd2", "epsilon", "sd21", "test")  # SD 2.x-base: epsilon, same shapes
    folder = base_files.materialize_config(detected, tmp_path / "cfg")
    assert DiffusionPipeline.load_config(folder)["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert json.loads((base_files.CONFIG_ROOT / "sd21/scheduler/scheduler_config.json").read_text())[
        "prediction_type"] == "v_prediction"  # the shipped file is untouched
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.pad_token == "!" and tokenizer("a photo of a cat").input_ids[1:-1] == [320, 1125, 539, 320, 2368]
    assert not list(folder.rglob("*.safetensors"))
    with pytest.raises(base_files.BaseFileError, match="own configs"):
        base_files.materialize_config(base_files.Detected("sd1", "epsilon", None, "folder"), tmp_path / "x")


# ---------------------------------------------------------------- diffusers folders

@pytest.mark.parametrize("builtin", TINY)
def test_diffusers_folders_are_detected_from_their_configs(builtin, tiny):
    detected = base_files.detect(tiny[builtin])
    assert (detected.arch, detected.prediction, detected.config) == (*TINY[builtin], None)
    assert base_files.detect(tiny[builtin], prediction="epsilon").prediction == "epsilon"


def test_diffusers_folder_import_links_weights_and_keeps_the_source(tiny, tmp_path):
    source = tiny["tiny-sdxl"]
    out = tmp_path / "base" / "xl"
    info = base_files.import_diffusers_folder(source, out)
    assert (info["architecture"], info["prediction"], info["source"]["kind"]) == ("sdxl", "epsilon", "diffusers")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (out / component).is_symlink() and (out / component).resolve() == source / component
    base = bases.load_base(out)
    assert base.arch == "sdxl" and base.text_encoder_2 is not None

    overridden = base_files.import_diffusers_folder(source, out, prediction="v_prediction")  # replaces `out`
    assert overridden["id"] != info["id"] and overridden["source"]["sha256"] == info["source"]["sha256"]
    assert bases.load_base(out, parts=()).noise_scheduler.config.prediction_type == "v_prediction"
    assert json.loads((source / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert (source / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # replacing did not follow links


def test_diffusers_folder_with_pickled_or_missing_weights(tiny, tmp_path):
    source = tmp_path / "sd"
    shutil.copytree(tiny["tiny-sd"], source)
    encoder = source / "text_encoder"
    torch.save(load_file(encoder / "model.safetensors"), encoder / "pytorch_model.bin")
    (encoder / "model.safetensors").unlink()
    with pytest.raises(base_files.PickleRefused, match="pytorch_model.bin.*allow_pickle: true"):
        base_files.import_diffusers_folder(source, tmp_path / "out")
    assert base_files.import_base(source, tmp_path / "out", allow_pickle=True)["source"]["kind"] == "diffusers"
    (encoder / "pytorch_model.bin").unlink()
    with pytest.raises(base_files.BaseFileError, match=r"text_encoder: no weights file; looked for .*\.safetensors"):
        base_files.import_diffusers_folder(source, tmp_path / "out")


# ---------------------------------------------------------------- content ids

def test_content_id_hashes_a_file_once_until_it_changes(tmp_path, monkeypatch):
    reads = []
    real_sha256 = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda path: reads.append(Path(path)) or real_sha256(path))
    weights, cache = tmp_path / "model.safetensors", tmp_path / "ids.json"
    weights.write_bytes(b"weights v1")

    first = base_files.content_id(weights, cache)
    assert first == hashlib.sha256(b"weights v1").hexdigest() and len(reads) == 1
    assert base_files.content_id(weights, cache) == first and len(reads) == 1  # from the cache
    weights.write_bytes(b"weights v2, longer")
    assert base_files.content_id(weights, cache) == hashlib.sha256(b"weights v2, longer").hexdigest()
    assert len(reads) == 2
    assert list(json.loads(cache.read_text())) == [str(weights.resolve())]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_content_id_of_a_folder_covers_weights_and_configs_only(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "sd"
    shutil.copytree(tiny["tiny-sd"], folder)
    cache = tmp_path / "ids.json"
    first = base_files.content_id(folder, cache)
    (folder / "README.md").write_text("notes")  # not a weight or config file
    reads = []
    real_sha256 = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda path: reads.append(path) or real_sha256(path))
    assert base_files.content_id(folder, cache) == first and reads == []
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 16', '"sample_size": 32'))
    assert base_files.content_id(folder, cache) != first and reads
