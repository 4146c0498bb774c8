"""SDXL's block vocabulary (kohya's 23: EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT) on the tiny SDXL
UNet and on SDXL's real topology: which layer falls in which block, block-wise ranks and learning
rates, and LBW's SDXL block-weight lists."""
from __future__ import annotations

import pytest
import torch

from lorabake import block_weights as lbw
from lorabake.config import Network
from lorabake.unet_blocks import SDXL_BLOCKS
from lorabake.models import bases, network
from lorabake.models.blocks import block_of

ATTENTION_BLOCKS = {"IN04", "IN05", "IN07", "IN08", "MID01"} | {f"OUT{i:02d}" for i in range(6)}


@pytest.fixture(scope="module")
def tiny_xl():
    torch.manual_seed(0)
    return bases.tiny_unet("sdxl"), [bases.tiny_text_encoder(), bases.tiny_text_encoder(
        projection=True, width=bases.SDXL_TEXT_WIDTH_2)]


@pytest.mark.parametrize("name, block", [
    ("conv_in", "IN00"),
    ("down_blocks.0.resnets.1.conv1", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "IN04"),
    ("down_blocks.2.attentions.1.proj_out", "IN08"),
    ("mid_block.resnets.0.conv2", "MID00"),
    ("mid_block.attentions.0.proj_in", "MID01"),
    ("mid_block.resnets.1.time_emb_proj", "MID02"),
    ("up_blocks.0.attentions.2.proj_out", "OUT02"),
    ("up_blocks.1.upsamplers.0.conv", "OUT05"),
    ("up_blocks.2.resnets.2.conv_shortcut", "OUT08"),
    ("time_embedding.linear_1", "EMB"),
    ("add_embedding.linear_2", "EMB"),
    ("conv_out", "OUT"),
    # kohya's SDXL file names: the original UNet's paths
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "IN04"),
    ("lora_unet_middle_block_1_proj_in", "MID01"),
    ("lora_unet_output_blocks_8_0_skip_connection", "OUT08"),
    ("lora_unet_label_emb_0_0", "EMB"),
    ("lora_unet_out_2", "OUT"),
    ("down_blocks.3.resnets.0.conv1", None),  # SDXL has no fourth level
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", None),
])
def test_block_of_names_sdxl_blocks_as_kohya_does(name, block):
    assert block_of(name, "sdxl") == block


def test_the_diffusers_and_the_original_name_of_a_module_are_in_the_same_block(tiny_xl):
    """Every UNet module lycoris wraps (LoCon, convs too) has a block, and its kohya file name (the
    original UNet's path) lands in that same block: the two rules agree."""
    unet, encoders = tiny_xl
    net = network.create_network(unet, encoders, Network(algo="locon", dim=2, conv_dim=2), seed=1)
    lycoris_to_kohya = {lycoris: kohya for kohya, (lycoris, _, on_unet) in network.module_table(unet, encoders).items()
                        if on_unet}
    blocks = {lora.lora_name: block_of(lora.lora_name, "sdxl") for lora in net.unet_loras}
    assert None not in blocks.values()
    assert set(blocks.values()) == set(SDXL_BLOCKS) - {"EMB", "IN00", "OUT"}  # kohya puts no module there
    for name, block in blocks.items():
        assert block_of(lycoris_to_kohya[name], "sdxl") == block, lycoris_to_kohya[name]
    plain = network.create_network(unet, encoders, Network(algo="lora", dim=2), seed=1)
    assert {block_of(lora.lora_name, "sdxl") for lora in plain.unet_loras} == ATTENTION_BLOCKS


def test_real_sdxl_topology_puts_lora_in_the_attention_blocks():
    """SDXL's own UNet, built without weights: kohya's LoRA wraps the transformer layers of IN04, IN05,
    IN07, IN08, MID01 and OUT00–OUT05, 722 modules in all (its well-known count for SDXL's UNet)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    net = network.create_network(unet, None, Network(algo="lora", dim=4, train_text_encoder=False), seed=0)
    assert len(net.unet_loras) == 722
    assert {block_of(lora.lora_name, "sdxl") for lora in net.unet_loras} == ATTENTION_BLOCKS


def test_sdxl_block_dims_and_lr_weights(tiny_xl):
    unet, encoders = tiny_xl
    dims = dict.fromkeys(SDXL_BLOCKS, 4) | {"IN05": 2, "OUT03": 0}
    weights = dict.fromkeys(SDXL_BLOCKS, 1.0) | {"IN07": 0.0, "MID01": 0.25}
    cfg = Network(algo="lora", dim=4, alpha=4, block_dims=list(dims.values()), block_lr_weights=list(weights.values()))
    net = network.create_network(unet, encoders, cfg, seed=1)
    present = {block_of(lora.lora_name, "sdxl") for lora in net.unet_loras}
    assert present == ATTENTION_BLOCKS - {"OUT03", "IN07"}
    assert all(lora.lora_down.weight.shape[0] == dims[block_of(lora.lora_name, "sdxl")] for lora in net.unet_loras)
    groups = {g["name"]: g for g in network.param_groups(net, cfg, 1e-3, 1e-4, arch="sdxl")}
    assert groups["unet:MID01"]["lr"] == pytest.approx(0.25e-3) and groups["unet:IN04"]["lr"] == pytest.approx(1e-3)
    members = [lora for lora in net.unet_loras if block_of(lora.lora_name, "sdxl") == "MID01"]
    assert {id(p) for p in groups["unet:MID01"]["params"]} == {id(p) for lora in members for p in lora.parameters()}


def test_lbw_sdxl_lists_and_presets():
    twelve = lbw.resolve([0.5, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], "sdxl")  # BASE, IN04, IN05, IN07, IN08, M00, OUT00–05
    assert twelve.text_encoder == 0.5 and twelve.names == SDXL_BLOCKS
    assert [b for b in SDXL_BLOCKS if twelve.of(b)] == ["EMB", "IN04", "MID00", "MID01", "MID02", "OUT05", "OUT"]
    assert lbw.resolve([1.0] * 20, "sdxl").is_identity  # LBW's LyCORIS form names all the blocks it weights
    kohya = lbw.resolve([0.0] + [1.0] * 21 + [0.0], "sdxl")  # kohya's order: EMB and OUT by their own values
    assert (kohya.of("EMB"), kohya.of("IN00"), kohya.of("OUT")) == (0.0, 1.0, 0.0)
    assert lbw.resolve("ALL0.5", "sdxl").of("IN05") == 0.5
    with pytest.raises(ValueError, match="preset OUTS names SD1 blocks; on SDXL only NONE, ALL and ALL0.5"):
        lbw.resolve("OUTS", "sdxl")
    with pytest.raises(ValueError, match="on SDXL need 12 .*, 20 .* or 23 .* values, got 17"):
        lbw.resolve([1.0] * 17, "sdxl")
    lbw.check([1.0] * 12)  # a length of either vocabulary passes the file check; the base decides later
    with pytest.raises(ValueError, match="on SD1/SD2, 17 .*; on SDXL, 12 .*; got 11"):
        lbw.check([1.0] * 11)


def test_sdxl_grid_cells_apply_lbw_weights_to_their_blocks(tmp_path):
    """An SDXL LoRA applied under LBW's 20-value SDXL list: each UNet module runs at the strength × its
    block's weight, the text encoders at BASE; the cell's UNet output is the base's when every block
    weighs 0, and an SD1 list does not fit the SDXL pipeline."""
    from lorabake.models import lora_format
    from lorabake.render import cells

    base_dir = tmp_path / "xl"
    bases.build_base("tiny-sdxl", base_dir)
    base = bases.load_base(base_dir)
    net = network.create_network(base.unet, base.te, Network(algo="lora", dim=2), seed=1)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    lora = tmp_path / "xl.safetensors"
    lora_format.save_lora(network.kohya_state(net, base.unet, base.te), lora, "fp32", {})
    pipe = cells.load_pipeline(base_dir, "euler")
    encoders = cells.pipeline_text_encoders(pipe)
    outs_only = lbw.resolve([0.5] + [0.0] * 10 + [1.0] * 9, "sdxl")  # BASE, IN00–IN08, M00, OUT00–OUT08
    applied = network.apply_weights(lora, pipe.unet, encoders, 0.8, 0.8 * outs_only.text_encoder, outs_only.as_dict())
    try:
        on = [m for m in applied.unet_loras if m.multiplier != 0.0]
        assert on and all(block_of(m.lora_name, "sdxl").startswith("OUT") for m in on)
        assert [m.multiplier for m in on] == pytest.approx([0.8] * len(on))
        assert [m.multiplier for m in applied.text_encoder_loras] == pytest.approx([0.4] * len(applied.text_encoder_loras))
    finally:
        for module in applied.applied:
            module.restore()

    def unet_output():
        generator = torch.Generator().manual_seed(0)
        sample, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 96, generator=generator)
        extra = {"text_embeds": torch.randn(1, 64, generator=generator), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
        with torch.no_grad():
            return pipe.unet(sample, torch.tensor([10]), context, added_cond_kwargs=extra).sample

    plain = unet_output()
    with cells.lora_applied(pipe, lora, 1.0, te_strength=1.0, block_weights=lbw.resolve("NONE", "sdxl")):
        assert torch.equal(unet_output(), plain)
    with cells.lora_applied(pipe, lora, 1.0, block_weights=outs_only):
        assert not torch.allclose(unet_output(), plain)
    with pytest.raises(ValueError, match="block weights of 25 blocks do not fit this UNet"):
        with cells.lora_applied(pipe, lora, 1.0, block_weights=lbw.resolve("OUTS")):
            pass
