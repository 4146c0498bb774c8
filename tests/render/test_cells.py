"""The cell cache: keys name exactly what decides a picture, only missing cells render, batches change
nothing, and a LoRA's text-encoder strength and block weights reach exactly the modules they name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorabake import block_weights as lbw
from lorabake.config import Network
from lorabake.models import bases, lora_format, network
from lorabake.prompts import Prompt
from lorabake.render import cells

PROMPT = Prompt("a red circle", "", 64, 64, 3, 7.5, 3)


def random_lora(base_dir, out, seed=1):
    """A LoRA on the UNet and the text encoder with clearly non-zero weights."""
    base = bases.load_base(base_dir)
    net = network.create_network(base.unet, base.te, Network(algo="lora", dim=4, alpha=4), seed=seed)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + param.numel())))
    lora_format.save_lora(network.kohya_state(net, base.unet, base.te), out, "fp32", {})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    bases.build_base("tiny-sd", root / "tiny")
    return root / "tiny", random_lora(root / "tiny", root / "lora.safetensors")


@pytest.fixture(scope="module")
def pipe(tiny):
    return cells.load_pipeline(tiny[0], "euler_a")


def pixels(images):
    return [np.asarray(image, dtype=np.int16) for image in images]


def text_embedding(pipe, text="a red circle"):
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def unet_output(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 10, context).sample


def test_a_text_encoder_strength_of_0_leaves_the_text_encoder_untouched(tiny, pipe):
    _, lora = tiny
    plain_text, plain_unet = text_embedding(pipe), unet_output(pipe)
    with cells.lora_applied(pipe, lora, 1.0, te_strength=0.0):
        assert torch.equal(text_embedding(pipe), plain_text)
        assert not torch.allclose(unet_output(pipe), plain_unet)  # the UNet half is on
    with cells.lora_applied(pipe, lora, 0.0, te_strength=1.0):
        assert not torch.allclose(text_embedding(pipe), plain_text)
        assert torch.equal(unet_output(pipe), plain_unet)
    assert torch.equal(text_embedding(pipe), plain_text) and torch.equal(unet_output(pipe), plain_unet)  # restored


def test_all_zero_block_weights_render_the_base_image_exactly(tiny, pipe):
    _, lora = tiny
    base_image = cells.render_batch(pipe, [PROMPT])
    # Applied for real (not short-cut): every module's multiplier is 0, so none may touch its layer.
    zeros = dict.fromkeys(lbw.BLOCKS, 0.0)
    net = network.apply_weights(lora, pipe.unet, pipe.text_encoder, 1.0, 0.0, zeros)
    try:
        assert net.applied == []
        assert cells.render_batch(pipe, [PROMPT])[0].tobytes() == base_image[0].tobytes()
    finally:
        for module in net.applied:
            module.restore()
    for preset in ("NONE", [0.0] * 17, [0.0] * 26):
        cell = cells.Cell(tiny[0], PROMPT, lora=lora, strength=1.0, block_weights=lbw.resolve(preset))
        assert cell.key == cells.Cell(tiny[0], PROMPT).key  # the base's own picture: one cache entry
    with cells.lora_applied(pipe, lora, 1.0, block_weights=lbw.resolve("OUTALL")):
        changed = cells.render_batch(pipe, [PROMPT])[0]
    assert changed.tobytes() != base_image[0].tobytes()


def test_block_weights_reach_the_modules_of_their_blocks(tiny, pipe):
    _, lora = tiny
    weights = lbw.resolve("OUTS")  # BASE 1, OUT06–OUT11 1, everything else 0
    net = network.apply_weights(lora, pipe.unet, pipe.text_encoder, 0.8, 0.5,
                                dict(zip(lbw.BLOCKS, weights.blocks)))
    try:
        for module in net.unet_loras:
            block = network.block_of(module.lora_name)
            assert module.multiplier == pytest.approx(0.8 * weights.of(block))
            assert (module in net.applied) == (weights.of(block) != 0.0)
        assert all(module.multiplier == 0.5 for module in net.text_encoder_loras)
    finally:
        for module in net.applied:
            module.restore()


def test_lbw_presets_and_lists():
    every = lbw.resolve("ALL")  # 17 values: the blocks outside LBW's 17 get 0, as LBW's own to26 gives them
    assert [b for b in lbw.BLOCKS if every.of(b)] == [b for b in lbw.LBW17 if b != "BASE"]
    assert lbw.resolve([1.0] * 26).is_identity
    ind = lbw.resolve("IND")
    assert ind.text_encoder == 1.0 and [b for b in lbw.BLOCKS if ind.of(b)] == ["IN05", "IN07", "IN08"]
    kohya = lbw.resolve([0.5] * 25)
    assert kohya.text_encoder == 1.0 and set(kohya.blocks) == {0.5}
    lycoris = lbw.resolve([0.0] + [1.0] * 25)
    assert lycoris.text_encoder == 0.0 and set(lycoris.blocks) == {1.0}
    with pytest.raises(ValueError, match="17 .* 25 .* 26"):
        lbw.resolve([1.0] * 12)
    with pytest.raises(ValueError, match="unknown block-weight preset 'OUTX'"):
        lbw.resolve("OUTX")


def test_the_cache_renders_only_what_it_lacks_and_batches_change_nothing(tiny, tmp_path):
    base_dir, lora = tiny
    grid = [cells.Cell(base_dir, Prompt("a red circle", "", 64, 64, seed, 7.5, 3), "euler_a", lora=lora, strength=s)
            for seed in (1, 2) for s in (0.0, 1.0, 1.0)]  # a duplicate of every strength-1 cell
    lines = []
    cached = cells.render_cells(grid, tmp_path, batch_size=4, log=lines.append)
    assert lines[-1] == "rendered 4, reused 0" and len(cached) == 4
    assert cells.render_cells(grid, tmp_path, log=lines.append) and lines[-1] == "rendered 0, reused 4"
    more = grid + [cells.Cell(base_dir, Prompt("a red circle", "", 64, 64, 3, 7.5, 3), "euler_a", lora=lora, strength=1.0)]
    cells.render_cells(more, tmp_path, log=lines.append)
    assert lines[-1] == "rendered 1, reused 4"
    alone = tmp_path / "alone"
    cells.render_cells(grid, alone, batch_size=1, log=lines.append)
    for key, path in cached.items():
        batched, single = pixels([Image.open(path), Image.open(cells.cache_file(alone, key))])
        assert np.abs(batched - single).max() <= 2  # float summation order only


def test_a_second_base_is_its_own_cache_key(tiny, tmp_path):
    """Rendering a LoRA on another checkpoint keys its cells by that checkpoint's content id."""
    from lorabake.models import base_files
    from lorabake.tools.merge import MergeInput, merge

    base_dir, lora = tiny
    merged = tmp_path / "merged.safetensors"
    merge(base_dir, [MergeInput(random_lora(base_dir, tmp_path / "other.safetensors", seed=5), 1.0)], merged)
    second = tmp_path / "second"
    info = base_files.import_base(merged, second)
    assert info["id"] != bases.base_id(base_dir)
    on_first, on_second = (cells.Cell(b, PROMPT, "euler_a", lora=lora, strength=1.0) for b in (base_dir, second))
    assert on_second.identity()["base"] == info["id"] and on_first.identity()["base"] == bases.base_id(base_dir)
    assert on_first.key != on_second.key
    cached = cells.render_cells([on_first, on_second], tmp_path / "cache")
    first, other = pixels([Image.open(cached[on_first.key]), Image.open(cached[on_second.key])])
    assert np.abs(first - other).max() > 0


def test_sde_samplers_are_reproducible(tiny):
    """DPM++ SDE draws Brownian noise from its own seed; unseeded it would differ on every call."""
    base_dir, _ = tiny
    pipe = cells.load_pipeline(base_dir, "dpmpp_sde_karras")
    first, second = (cells.render_batch(pipe, [PROMPT, Prompt("a blue square", "", 64, 64, 9, 7.5, 3)]) for _ in range(2))
    assert [i.tobytes() for i in first] == [i.tobytes() for i in second]
    alone = cells.render_batch(pipe, [Prompt("a blue square", "", 64, 64, 9, 7.5, 3)])[0]
    assert np.abs(pixels([alone])[0] - pixels([first[1]])[0]).max() <= 2
