"""Masked loss on the tiny model: masks reach the loss (a black mask trains nothing, a partial one
trains), an image without alpha trains as unmasked, and the mask files decide what retrains."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from PIL import Image

from lorabake.data.dataset import DatasetError
from lorabake.workspace import Workspace

from conftest import FIXTURE, make_project
from trainer import working_in

SQUARES = FIXTURE / "datasets" / "demo" / "3_lbk_square"


def copy_squares(root, mask=None, alpha=None):
    """Two demo images in root/2_lbk_square/, each with a mask in masks/ (an "L" image filled by
    `mask(image)`) and/or with an alpha channel of `alpha`."""
    folder = root / "2_lbk_square"
    folder.mkdir(parents=True)
    for image in sorted(SQUARES.glob("*.png"))[:2]:
        shutil.copy2(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
        with Image.open(image) as pixels:
            pixels = pixels.convert("RGB")
        if alpha is not None:
            pixels.putalpha(alpha)
        pixels.save(folder / image.name)
        if mask is not None:
            (folder / "masks").mkdir(exist_ok=True)
            mask(pixels.size).save(folder / "masks" / image.name)


def left_half(size):
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("masked") / "project")
    copy_squares(project / "datasets" / "halves", mask=left_half)
    copy_squares(project / "datasets" / "hidden", alpha=0)  # fully transparent: nothing to train
    config_file = project / "configs/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["datasets"].update(halves={"path": "datasets/halves", "folders": {"2_lbk_square": {"flip": True}}},
                              hidden={"path": "datasets/hidden"})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    with working_in(project) as trainer:
        yield trainer


FAST = {"training": {"max_steps": 4, "batch_size": 2}, "optimizer": {"type": "adamw", "lr": 1e-2}}
FOLDER_MASKS = {"loss": {"masked": True, "mask_source": "folder"}}


def ups(weights):
    found = [v for k, v in weights.items() if k.endswith("lora_up.weight")]
    assert found
    return found


def test_a_partial_mask_trains_and_a_black_mask_trains_nothing(trainer):
    halves = trainer.train("halves", {**FAST, "datasets": ["halves"], **FOLDER_MASKS})
    assert all(0 < r["loss"] for r in halves.records)
    assert any(torch.count_nonzero(v) for v in ups(halves.weights()))  # the LoRA moved
    assert halves.metadata()["ss_masked_loss"] == "True"
    # an alpha of 0 everywhere, read from the pixels each step (no latent cache): every loss is 0
    hidden = trainer.train("hidden", {**FAST, "datasets": ["hidden"], "loss": {"masked": True},
                                      "training": {**FAST["training"], "cache_latents": False}})
    assert all(r["loss"] == 0.0 for r in hidden.records)
    assert all(torch.count_nonzero(v) == 0 for v in ups(hidden.weights()))  # zero-initialized, never moved
    plain = trainer.train("hidden-unmasked", {**FAST, "datasets": ["hidden"],
                                              "training": {**FAST["training"], "cache_latents": False}})
    assert all(r["loss"] > 0 for r in plain.records) and plain.metadata()["ss_masked_loss"] == "False"


def test_an_image_without_alpha_trains_as_if_unmasked(trainer):
    """kohya's behaviour: an RGB image under alpha masks has an alpha of 255 everywhere."""
    settings = {**FAST, "datasets": ["other"]}
    plain = trainer.train("rgb-plain", settings)
    masked = trainer.train("rgb-alpha", {**settings, "loss": {"masked": True}})
    for a, b in zip(plain.records, masked.records, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_mask_files_decide_what_retrains_and_a_missing_one_stops_the_check(trainer):
    trainer.write_run("halves", {**FAST, "datasets": ["halves"], **FOLDER_MASKS})
    trainer.write_run("halves-unmasked", {**FAST, "datasets": ["halves"]})
    ws = Workspace.load(trainer.project / "configs/config.yaml")
    spec = ws.latent_job("halves", "halves").name
    assert spec.endswith("-mask-masks")
    before_train, before_cache = ws.train_params("halves"), ws.latent_params("halves", spec)
    assert "masks" not in ws.train_params("halves-unmasked")  # unmasked runs keep their params
    assert before_cache["folder_flips"] == {"2_lbk_square": True}
    mask = sorted((trainer.project / "datasets/halves/2_lbk_square/masks").glob("*.png"))[0]
    original = mask.read_bytes()
    try:
        Image.new("L", Image.open(mask).size, 255).save(mask)
        ws = Workspace.load(trainer.project / "configs/config.yaml")
        after_train = ws.train_params("halves")
        assert after_train["masks"] != before_train["masks"]
        assert {k: v for k, v in after_train.items() if k != "masks"} == \
            {k: v for k, v in before_train.items() if k != "masks"}  # captions, config: unchanged
        assert ws.latent_params("halves", spec)["masks"] != before_cache["masks"]
        mask.unlink()
        ws = Workspace.load(trainer.project / "configs/config.yaml")
        with pytest.raises(DatasetError) as error:
            ws.run_datasets("halves")
        assert "images without a mask" in str(error.value)
        assert f"{mask.parent.parent / mask.name} (expected {mask})" in str(error.value)
    finally:
        mask.write_bytes(original)
