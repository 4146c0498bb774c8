"""Single-file checkpoints: written by sd_layout, read back by diffusers' own single-file loader.

diffusers' reader (`from_single_file`, `diffusers/loaders/single_file_utils.py`) is the ground truth
for the original layout: if it loads our file back to the very tensors we wrote from, every name is
right. The tiny bases are initialised with ones and zeros in every norm, so each weight is first
refilled with its own random numbers — otherwise two swapped norms would still compare equal.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake.models import bases, sd_layout
from lorabake.models.keys import ORIGINAL_PREFIXES, architecture_of

BUILTINS = ("tiny-sd", "tiny-sd2-v", "tiny-sdxl")


def _scramble(*modules: torch.nn.Module) -> None:
    """Give every tensor distinct values, so a misplaced one cannot compare equal by accident; the
    nudge is small so the models still compute finite outputs."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{builtin: (base dir, scrambled Base, single-file path)} for the three tiny architectures."""
    root = tmp_path_factory.mktemp("sd_layout")
    out = {}
    for builtin in BUILTINS:
        base_dir = root / builtin
        bases.build_base(builtin, base_dir)
        base = bases.load_base(base_dir)
        _scramble(base.unet, base.vae, *base.text_encoders)
        path = root / f"{builtin}.safetensors"
        save_file(sd_layout.to_single_file(base.arch, base.unet, base.vae, base.text_encoders), path)
        out[builtin] = (base_dir, base, path)
    return out


def _assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module, what: str) -> None:
    want, got = expected.state_dict(), loaded.state_dict()
    assert set(got) == set(want), what
    differing = [key for key in want if got[key].is_meta or not torch.equal(got[key], want[key])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _load_pipeline(base_dir, path, arch: str):
    """diffusers' own loader, offline, with the built base folder as config. Tiny SDXL's two text
    encoders share one width, and diffusers tells CLIP-L from bigG by width alone (it tries the
    CLIP-L keys first), so the second encoder is read by the same converter from its keys only."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    if arch != "sdxl":
        return StableDiffusionPipeline.from_single_file(str(path), config=str(base_dir), local_files_only=True)
    bigg_only = {key: tensor for key, tensor in load_file(path).items()
                 if not key.startswith(sd_layout.TEXT_ENCODER_PREFIXES["sdxl"][0])}
    text_encoder_2 = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, bigg_only, subfolder="text_encoder_2", config=str(base_dir),
        local_files_only=True)
    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(base_dir), local_files_only=True,
                                                      text_encoder_2=text_encoder_2)


@pytest.mark.parametrize("builtin", BUILTINS)
def test_diffusers_reads_the_single_file_back_to_the_same_model(written, builtin):
    base_dir, base, path = written[builtin]
    pipe = _load_pipeline(base_dir, path, base.arch)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(base, name) is not None:
            _assert_same_weights(getattr(base, name), getattr(pipe, name), f"{builtin} {name}")

    torch.manual_seed(0)
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim)
    extra = {}
    if base.arch == "sdxl":
        pooled = torch.randn(1, base.text_encoder_2.config.projection_dim)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        want = base.unet(latents, timestep, context, **extra).sample
        got = pipe.unet.eval()(latents, timestep, context, **extra).sample
    # The weights are identical (above); the loaded tensors' memory layout may differ, and with it the
    # order of float sums in a kernel (measured: 2.6e-6 on tiny-sd with diffusers 0.42, outputs ~1).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_file_keys_follow_the_original_layout(written):
    keys = {builtin: set(load_file(path)) for builtin, (_, _, path) in written.items()}
    assert {builtin: architecture_of(k) for builtin, k in keys.items()} == {
        "tiny-sd": "sd1", "tiny-sd2-v": "sd2", "tiny-sdxl": "sdxl"}
    sd1, sdxl = keys["tiny-sd"], keys["tiny-sdxl"]
    assert {"model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' SD1 marker
            "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
            "model.diffusion_model.middle_block.2.emb_layers.1.weight",
            "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= sd1
    assert {"model.diffusion_model.label_emb.0.2.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection"} <= sdxl
    assert not any(key.endswith("position_ids") for k in keys.values() for key in k)
    assert all(key.startswith(ORIGINAL_PREFIXES) for k in keys.values() for key in k)


def test_vae_attention_is_written_as_1x1_convs(written):
    _, base, path = written["tiny-sd"]
    checkpoint = load_file(path)
    linear = base.vae.state_dict()["decoder.mid_block.attentions.0.to_out.0.weight"]
    assert torch.equal(checkpoint["first_stage_model.decoder.mid.attn_1.proj_out.weight"], linear[:, :, None, None])


def test_sdxl_text_projection_is_used_as_openclip_does(written):
    """OpenCLIP pools as `x @ text_projection`; transformers' Linear as `x @ W.T`."""
    _, base, path = written["tiny-sdxl"]
    projection = load_file(path)["conditioner.embedders.1.model.text_projection"]
    pooled = torch.randn(3, projection.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # a transposed matrix would be off by the size of the values; float sums only by their rounding
        torch.testing.assert_close(pooled @ projection, base.text_encoder_2.text_projection(pooled),
                                   rtol=1e-4, atol=1e-5)


def test_unet_original_names_match_kohya_sdxl_names(written):
    """kohya's SDXL LoRA keys are `lora_unet_` + the original module path with `_` for `.`."""
    _, base, _ = written["tiny-sdxl"]
    names = sd_layout.unet_original_names(base.unet)
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj":
            "input_blocks_8_1_transformer_blocks_1_ff_net_0_proj",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k":
            "output_blocks_1_1_transformer_blocks_0_attn2_to_k",
        "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks_8_0_skip_connection",
        "up_blocks.2.resnets.0.norm2": "output_blocks_6_0_out_layers_0",
        "add_embedding.linear_2": "label_emb_0_2",
        "time_embedding.linear_1": "time_embed_0",
        "conv_in": "input_blocks_0_0",
        "conv_out": "out_2",
    }
    kohya = {path: "lora_unet_" + names[path].replace(".", "_") for path in expected}
    assert kohya == {path: f"lora_unet_{name}" for path, name in expected.items()}
    weighted = [path for path, module in base.unet.named_modules() if list(module.parameters(recurse=False))]
    assert len({names[path] for path in weighted}) == len(weighted)


def test_unet_original_names_agree_with_the_state_dict_converter(written):
    """Module names + `.weight`/`.bias` are the checkpoint keys (SD1, as diffusers read them back)."""
    _, base, _ = written["tiny-sd"]
    names = sd_layout.unet_original_names(base.unet)
    converted = sd_layout.unet_to_original(base.unet.state_dict())
    for key, tensor in base.unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        assert converted[f"{names[module]}.{parameter}"].data_ptr() == tensor.data_ptr()
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"  # no attention at that level


def test_a_weight_without_an_original_place_is_an_error(written):
    _, base, _ = written["tiny-sd"]
    unet = bases.tiny_unet("sd1")
    unet.down_blocks[0].extra_gate = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="down_blocks.0.extra_gate"):
        sd_layout.unet_original_names(unet)
    with pytest.raises(KeyError, match="down_blocks.0.extra_gate.weight"):
        sd_layout.unet_to_original(unet.state_dict())
    with pytest.raises(ValueError, match="2 text encoder"):
        sd_layout.to_single_file("sdxl", base.unet, base.vae, [base.text_encoder])


def test_clip_layout_with_or_without_the_text_model_level(written):
    _, base, _ = written["tiny-sd"]
    flat = base.text_encoder.state_dict()
    nested = {f"text_model.{key}": tensor for key, tensor in flat.items()}
    nested["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert sd_layout.clip_to_original(flat).keys() == sd_layout.clip_to_original(nested).keys() == nested.keys() - {
        "text_model.embeddings.position_ids"}


def test_sd2_depth_gets_kohyas_dummy_last_layer_and_diffusers_drops_it():
    """At SD2's real depth (23 layers kept by diffusers) the file carries OpenCLIP's 24th layer as a
    copy of the 23rd, as kohya writes it; diffusers' reader skips `resblocks.23` by name and gets
    exactly the encoder back."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=23,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(0)
    encoder = CLIPTextModel(config)
    _scramble(encoder)
    original = sd_layout.open_clip_to_original(encoder.state_dict(), projection=False)
    layer, dummy = "transformer.resblocks.22.", "transformer.resblocks.23."
    copied = {key.replace(layer, dummy) for key in original if key.startswith(layer)}
    assert {key for key in original if key.startswith(dummy)} == copied
    assert torch.equal(original[dummy + "attn.in_proj_weight"], original[layer + "attn.in_proj_weight"])
    assert original["text_projection"].shape == (8, 8) and original["logit_scale"].ndim == 0

    prefix = sd_layout.TEXT_ENCODER_PREFIXES["sd2"][0]
    read = convert_open_clip_checkpoint(encoder, {prefix + key: t for key, t in original.items()}, prefix=prefix)
    read = {key.removeprefix("text_model."): tensor for key, tensor in read.items()}
    want = encoder.state_dict()
    assert read.keys() == want.keys()
    assert all(torch.equal(read[key], want[key]) for key in want)
