import pytest

from lorabake.render.sample import Prompt, parse_prompt

DEFAULTS = Prompt("", "", 128, 128, 42, 7.5, 20)


def test_kohya_prompt_syntax():
    p = parse_prompt("lbk, red circle --n blurry, lowres --w 192 --h 64 --d 7 --l 5.5 --s 12", DEFAULTS)
    assert p == Prompt("lbk, red circle", "blurry, lowres", 192, 64, 7, 5.5, 12)


def test_defaults_fill_missing_options():
    assert parse_prompt("just a prompt", DEFAULTS) == Prompt("just a prompt", "", 128, 128, 42, 7.5, 20)


def test_unknown_or_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown option"):
        parse_prompt("x --q 3", DEFAULTS)
    with pytest.raises(ValueError, match="--w needs a int"):
        parse_prompt("x --w wide", DEFAULTS)
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_prompt("x --w 100", DEFAULTS)


def test_sdxl_grid_renders_with_its_own_pipeline_and_the_lora_changes_it(tmp_path):
    """SDXL samples go through StableDiffusionXLPipeline (two encoders, pooled, size conditioning),
    and a LoRA on both encoders and the UNet changes the picture; the strength-0 cell is the base."""
    import torch
    from PIL import Image

    from lorabake.config import Network
    from lorabake.models import bases, lora_format, network
    from lorabake.project_file import Samples
    from lorabake.render.cells import load_pipeline
    from lorabake.render.sample import sample_grid

    base_dir = tmp_path / "xl"
    bases.build_base("tiny-sdxl", base_dir)
    base = bases.load_base(base_dir)
    net = network.create_network(base.unet, base.te, Network(algo="lora", dim=4, alpha=4), seed=1)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    lora = tmp_path / "xl-lora.safetensors"
    lora_format.save_lora(network.kohya_state(net, base.unet, base.te), lora, "fp32", {})
    assert type(load_pipeline(base_dir, "euler").text_encoder_2).__name__ == "CLIPTextModelWithProjection"

    samples = Samples(prompts=["a red circle --w 64 --h 64"], strengths=[0.0, 1.0], steps=2, sampler="euler")
    sample_grid(base_dir, [("final", lora)], samples, (64, 64), tmp_path / "grid.png", tmp_path / "cells", title="xl")
    plain = Image.open(tmp_path / "cells/p0-final-s0.png").tobytes()
    with_lora = Image.open(tmp_path / "cells/p0-final-s1.png").tobytes()
    assert plain != with_lora
    assert Image.open(tmp_path / "grid.png").size[0] > 128
