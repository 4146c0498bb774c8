"""The pretrained toy-shapes builtin: shipped files match their manifest, the built base has SD1's
topology (so networks, the 25 blocks and kohya names apply), the scorer tells the world's shapes and
colours apart, and the base really learnt the world (a few denoising steps draw the prompted shape)."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from lorabake import store
from lorabake.config import Network
from lorabake.unet_blocks import BLOCKS
from lorabake.models import bases, network, toy_world
from lorabake.models.blocks import block_of
from lorabake.render import scorer


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases") / "toy"
    bases.build_base("toy-shapes", out)
    return out


def test_shipped_files_match_the_manifest_and_fit_the_budget():
    manifest = bases.toy_shapes_manifest()
    names = {p.name for p in bases.TOY_SHAPES_DIR.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    for name, sha256 in manifest["files"].items():
        assert store.file_sha256(bases.TOY_SHAPES_DIR / name) == sha256, name
    sizes = {p.name: p.stat().st_size for p in bases.TOY_SHAPES_DIR.iterdir()}
    assert sum(sizes.values()) <= 20e6 and sizes[scorer.WEIGHTS] <= 2e6
    assert {"vae", "diffusion", "scorer"} <= set(manifest["phases"]) and manifest["seed"] == manifest["settings"]["seed"]


def test_changed_weights_are_refused(tmp_path, monkeypatch):
    shutil.copytree(bases.TOY_SHAPES_DIR, tmp_path / "toy-shapes")
    weights = tmp_path / "toy-shapes" / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(bases, "TOY_SHAPES_DIR", tmp_path / "toy-shapes")
    with pytest.raises(bases.ShippedWeightsError, match="unet.safetensors: sha256 .* manifest.json says"):
        bases.build_base("toy-shapes", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_built_base_has_sd1_topology(toy_dir):
    base = bases.load_base(toy_dir)
    unet, vae = base.unet.config, base.vae.config
    assert (base.arch, len(unet.block_out_channels), unet.layers_per_block) == ("sd1", 4, 2)
    assert unet.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert not unet.use_linear_projection and unet.cross_attention_dim == base.text_encoder.config.hidden_size
    assert (len(vae.block_out_channels), vae.latent_channels, base.resolution) == (4, 4, 64)
    assert base.text_encoder.config.vocab_size == bases.CLIP_VOCAB_SIZE
    assert base.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    schedule = base.noise_scheduler.config
    assert {k: schedule[k] for k in bases.SD1_NOISE_SCHEDULE} == bases.SD1_NOISE_SCHEDULE
    assert json.loads((toy_dir / "base.json").read_text())["builtin"] == "toy-shapes"
    assert all(p.dtype == torch.float32 for p in base.unet.parameters())  # shipped fp16, loaded fp32
    net = network.create_network(base.unet, base.text_encoder, Network(algo="locon", dim=2, alpha=1, conv_dim=2), seed=0)
    assert {block_of(lora.lora_name) for lora in net.unet_loras} == set(BLOCKS) - {"IN00"}


def test_scorer_separates_the_world():
    """Fresh images of all six shapes, from a seed the scorer never trained on."""
    images, scenes = toy_world.sample(np.random.default_rng(20240601), 120, toy_world.SHAPES)
    found = scorer.predict(images)
    for head in ("shape", "colour"):
        accuracy = np.mean([f[head] == getattr(s, head) for f, s in zip(found, scenes)])
        assert accuracy >= 0.9, (head, accuracy)
    star = next(i for i, s in enumerate(scenes) if s.shape == "star")
    image = toy_world.render(scenes[star])
    assert scorer.score(image, "star") > 0.5 and scorer.score(image, "circle") < 0.5
    assert scorer.score(image, f"{scenes[star].colour}") > 0.5
    with pytest.raises(ValueError, match="unknown concept"):
        scorer.score(image, "hexagon")


def test_base_draws_the_prompted_shape_more_often_than_chance(toy_dir):
    """8 prompts × 10 DDIM steps: chance would find the prompted shape in about 2 of 8."""
    combos = toy_world.combinations()[5::16]
    prompts = [toy_world.caption(*combo) for combo in combos]
    images = scorer.sample_prompts(toy_dir, prompts, steps=10, cfg=7.5, seed=1)
    found = scorer.predict(images)
    hits = sum(f["shape"] == shape for f, (shape, _, _) in zip(found, combos))
    assert hits >= 5, [(p, f) for p, f in zip(prompts, found)]


def test_shipped_demo_dataset_is_the_generator_s_stars(tmp_path):
    """datasets/demo is what scripts/make_demo_dataset.py makes: stars only, activation tag first."""
    from PIL import Image

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_demo_dataset", REPO / "scripts" / "make_demo_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_dataset(tmp_path / "demo")
    shipped = sorted((REPO / "datasets" / "demo").rglob("*.*"))
    made = sorted((tmp_path / "demo").rglob("*.*"))
    assert [p.relative_to(REPO / "datasets" / "demo") for p in shipped] == [p.relative_to(tmp_path / "demo") for p in made]
    for ours, theirs in zip(shipped, made):
        if ours.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs))), ours.name
        else:
            assert ours.read_text() == theirs.read_text() and ours.read_text().startswith(("lbk_star, a ", "lbk_star, an "))
    captions = [p.read_text() for p in made if p.suffix == ".txt"]
    assert len(captions) == 12 and all(" star on a " in c for c in captions)
    stars = [np.asarray(Image.open(p)) for p in made if p.suffix == ".png"]
    assert [f["shape"] for f in scorer.predict(np.stack(stars))] == ["star"] * 12


# ---------------------------------------------------------------- a short run teaches the demo's star

STAR_STEPS = 120  # the shipped demo's defaults (batch 2, lr 2e-3) otherwise


@pytest.fixture(scope="module")
def star_run(tmp_path_factory):
    """The shipped demo's bases, dataset, defaults and samples, with one run of STAR_STEPS steps,
    trained and sampled through the CLI as the workflow's jobs would."""
    import os

    import yaml

    from lorabake import cli
    from lorabake.workspace import Workspace

    from conftest import REPO

    root = tmp_path_factory.mktemp("star") / "project"
    shutil.copytree(REPO / "datasets" / "demo", root / "datasets" / "demo")
    (root / "configs" / "runs").mkdir(parents=True)
    shipped = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    config = root / "configs" / "config.yaml"
    config.write_text(yaml.safe_dump({key: shipped[key] for key in ("bases", "datasets", "defaults", "samples")}))
    (root / "configs" / "runs" / "star.yaml").write_text(yaml.safe_dump(
        {"training": {"max_steps": STAR_STEPS}, "save": {"every_n_epochs": None, "precision": "fp32"}}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        def run(*args):
            assert cli.main(["--config", str(config), *args]) == 0, args
        run("base", "--base", shipped["defaults"]["base"])
        for dataset, spec in Workspace.load(config).latent_jobs:
            run("cache-latents", "--dataset", dataset, "--spec", spec)
        run("train", "--run", "star")
        run("sample", "--run", "star")
        yield root / "results" / "runs" / "star"
    finally:
        os.chdir(cwd)


def test_a_short_run_teaches_the_star_and_the_grid_says_so(star_run):
    report = json.loads((star_run / "scores.json").read_text())
    assert report["concept"] == "star" and len(report["cells"]) == 2 * 3  # 2 prompts × 3 strengths, 1 file
    by_strength = {}
    for cell in report["cells"]:
        assert (star_run / "samples" / cell["image"]).is_file() and 0.0 <= cell["score"] <= 1.0
        by_strength.setdefault(cell["strength"], []).append(cell["score"])
    before, after = np.mean(by_strength[0.0]), np.mean(by_strength[1.0])
    assert before <= 0.3 and after >= before + 0.3, by_strength
