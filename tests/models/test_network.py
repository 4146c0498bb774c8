"""Networks on the tiny SD1-topology model: every algo's keys, file round trips, kohya's LoCon targets,
the 25-block vocabulary, block-wise dims / lr weights, and continuing from a file."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from lorabake.config import ALGOS, Network
from lorabake.models import bases, network
from lorabake.models.blocks import block_of
from lorabake.unet_blocks import BLOCKS

# Which tensor tells each algo's files apart (lycoris detects the algo from it when loading).
SIGNATURE = {"lora": "lora_down.weight", "locon": "lora_down.weight", "dylora": "lora_down.weight",
             "loha": "hada_w1_a", "lokr": "lokr_w1", "ia3": "on_input", "full": "diff", "glora": "a1.weight",
             "diag-oft": "oft_blocks", "boft": "oft_blocks"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return bases.tiny_unet(), bases.tiny_text_encoder()


def fresh(tiny):
    """Untouched copies: networks hook into (and `full` rewires) the modules they wrap."""
    return copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])


def build(tiny, **fields):
    unet, text_encoder = fresh(tiny)
    root = fields.pop("root", None)
    net = network.create_network(unet, text_encoder, Network(**fields), seed=1, root=root)
    return net, unet, text_encoder


@torch.no_grad()
def pretend_trained(net, seed: int = 2) -> None:
    """Move every parameter off its initial value (zero-initialised up weights included)."""
    generator = torch.Generator().manual_seed(seed)
    for param in net.parameters():
        param.add_(0.02 * torch.randn(param.shape, generator=generator))


def save(net, unet, text_encoder, path) -> dict:
    state = {k: v.detach().float().contiguous() for k, v in network.kohya_state(net, unet, text_encoder).items()}
    save_file(state, str(path))
    return state


def outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    ids = torch.randint(0, 49406, (1, 77), generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), context).sample, text_encoder(ids)[0]


def layers_by_kohya_name(unet, text_encoder) -> dict[str, torch.nn.Module]:
    named = {f"lora_unet_{path}": m for path, m in unet.named_modules() if path}
    named |= {f"lora_te_{path}": m for path, m in text_encoder.named_modules() if path}
    return network.to_kohya_keys({name.replace(".", "_"): m for name, m in named.items()}, unet, text_encoder)


def module_names(net) -> set[str]:
    return {lora.lora_name for lora in net.unet_loras + net.text_encoder_loras}


# ---------------------------------------------------------------- the block vocabulary

@pytest.mark.parametrize("name, block", [
    ("conv_in", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "IN01"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
    ("lora_unet_down_blocks_0_attentions_1_proj_in.lora_down.weight", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "IN04"),
    ("down_blocks.2.downsamplers.0.conv", "IN09"),
    ("down_blocks.3.resnets.1.conv2", "IN11"),
    ("mid_block.attentions.0.proj_out", "MID"),
    ("lora_unet_mid_block_resnets_1_conv1", "MID"),
    ("up_blocks.0.resnets.0.conv1", "OUT00"),
    ("up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "OUT05"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "OUT05"),
    ("up_blocks.3.attentions.2.proj_out", "OUT11"),
    ("conv_out", "OUT11"),
    ("conv_norm_out", "OUT11"),
    ("time_embedding.linear_1", None),
    ("down_blocks.3.downsamplers.0.conv", None),  # SD1 has no IN12
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", None),
    ("encoder.layers.0.mlp.fc1", None),
])
def test_block_of_maps_names_to_kohya_blocks(name, block):
    assert block_of(name) == block


def test_block_of_covers_every_wrapped_unet_module(tiny):
    net, _, _ = build(tiny, algo="locon", dim=2, alpha=1, conv_dim=2)
    blocks = [block_of(lora.lora_name) for lora in net.unet_loras]
    assert None not in blocks
    assert set(blocks) == set(BLOCKS) - {"IN00"}  # IN00 is conv_in, which kohya never trains
    assert {block_of(lora.lora_name) for lora in net.text_encoder_loras} == {None}


def test_real_sd1_topology_gets_kohyas_modules_and_blocks():
    """SD1's own UNet and CLIP ViT-L text encoder, built without weights (meta device). kohya's LoRA
    makes 192 UNet + 72 text-encoder modules, in the blocks that hold attention; its LoCon adds 86
    (22 ResNets × conv1/conv2/time_emb_proj, 14 conv_shortcuts, 3 downsamplers, 3 upsamplers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def sd1():
        with torch.device("meta"):
            return (UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
                    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)))

    lora = network.create_network(*sd1(), Network(algo="lora", dim=4), seed=0)
    locon = network.create_network(*sd1(), Network(algo="locon", dim=4, conv_dim=4), seed=0)
    assert (len(lora.unet_loras), len(lora.text_encoder_loras), len(locon.unet_loras)) == (192, 72, 278)
    with_attention = {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"} | {f"OUT{i:02d}" for i in range(3, 12)}
    assert {block_of(m.lora_name) for m in lora.unet_loras} == with_attention
    assert {block_of(m.lora_name) for m in locon.unet_loras} == set(BLOCKS) - {"IN00"}


# ---------------------------------------------------------------- every algo: keys and file round trip

@pytest.mark.parametrize("algo", ALGOS)
def test_algo_keys_and_file_round_trip(tiny, algo, tmp_path):
    # dim 4 = one DyLoRA rank block, so DyLoRA's forward (random rank prefixes) is deterministic here
    net, unet, text_encoder = build(tiny, algo=algo, dim=4, alpha=2, conv_dim=4, conv_alpha=1)
    pretend_trained(net)
    state = save(net, unet, text_encoder, tmp_path / "lora.safetensors")

    modules = {key.split(".")[0] for key in state}
    text_modules = {m for m in modules if not m.startswith("lora_unet_")}
    assert 0 < len(text_modules) < len(modules)  # both models carry modules
    assert all(m.startswith("lora_te_text_model_") for m in text_modules)
    assert {key.split(".", 1)[1] for key in state} <= network.KEY_SUFFIXES[algo]
    assert all(f"{m}.{SIGNATURE[algo]}" in state for m in modules)

    # Merging the file gives the models the trained network's behaviour…
    net.eval()
    trained = outputs(unet, text_encoder)
    merged_unet, merged_text_encoder = fresh(tiny)
    assert network.merge_weights(tmp_path / "lora.safetensors", merged_unet, merged_text_encoder) == len(modules)
    for before, after, expected in zip(outputs(*tiny), outputs(merged_unet, merged_text_encoder), trained):
        assert (expected - before).abs().max() > 1e-4  # the update really changes both models
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=2e-5)
    # …and module_deltas are exactly what the merge added to each layer.
    deltas = network.module_deltas(tmp_path / "lora.safetensors", *tiny)  # reads the models, changes nothing
    assert deltas.keys() == modules
    base, merged = layers_by_kohya_name(*tiny), layers_by_kohya_name(merged_unet, merged_text_encoder)
    for name, delta in deltas.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(delta, merged[name].weight - base[name].weight, rtol=1e-4, atol=1e-6, msg=name)


def test_file_naming_missing_modules_is_refused(tiny, tmp_path):
    net, unet, text_encoder = build(tiny, algo="lora", dim=2)
    state = save(net, unet, text_encoder, tmp_path / "lora.safetensors")
    state["lora_unet_no_such_block_proj.alpha"] = torch.tensor(1.0)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(network.UnmatchedKeys, match="odd.safetensors.*lora_unet_no_such_block_proj"):
        network.load_weights(tmp_path / "odd.safetensors", *tiny)


# ---------------------------------------------------------------- kohya's LoRA and LoCon targets

def test_locon_adds_resnet_and_sampler_convs_only(tiny):
    lora, _, _ = build(tiny, algo="lora", dim=4)
    locon, _, _ = build(tiny, algo="locon", dim=4, alpha=1, conv_dim=2)
    added = module_names(locon) - module_names(lora)
    assert module_names(lora) < module_names(locon)
    assert all("resnets" in n or "samplers" in n for n in added)
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
            "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_mid_block_resnets_0_conv2"} <= added
    assert not any(part in n for n in module_names(locon) for part in ("conv_in", "conv_out", "time_embedding"))
    conv = next(m for m in locon.unet_loras if m.lora_name == "lora_unet_down_blocks_0_resnets_0_conv1")
    assert tuple(conv.lora_down.weight.shape) == (2, 32, 3, 3)  # conv_dim, in channels, 3×3 kernel


# ---------------------------------------------------------------- block-wise dims, alphas, lr weights

def test_block_dims_and_alphas_set_each_blocks_rank(tiny):
    dims = [1 + i % 5 for i in range(len(BLOCKS))]
    alphas = [0.5 * (1 + i % 3) for i in range(len(BLOCKS))]
    net, _, _ = build(tiny, algo="locon", dim=4, alpha=4, conv_dim=3, conv_alpha=1.5, block_dims=dims,
                      block_alphas=alphas)
    rank_of = dict(zip(BLOCKS, dims))
    alpha_of = dict(zip(BLOCKS, alphas))
    for lora in net.unet_loras:
        is_3x3 = lora.lora_down.weight.dim() == 4 and lora.lora_down.weight.shape[2:] != (1, 1)
        block = block_of(lora.lora_name)
        expected = (3, 1.5) if is_3x3 else (rank_of[block], alpha_of[block])
        assert (lora.lora_down.weight.shape[0], float(lora.alpha)) == expected, lora.lora_name
    assert {lora.lora_down.weight.shape[0] for lora in net.text_encoder_loras} == {4}


def test_blocks_without_learning_rate_get_no_module(tiny):
    weights = dict.fromkeys(BLOCKS, 1.0) | {"IN04": 0.0, "OUT05": 0.05}
    dims = dict.fromkeys(BLOCKS, 4) | {"MID": 0}
    net, _, _ = build(tiny, algo="locon", dim=4, conv_dim=2, block_lr_weights=list(weights.values()),
                      block_lr_zero_threshold=0.1, block_dims=list(dims.values()))
    present = {block_of(lora.lora_name) for lora in net.unet_loras}
    assert present == set(BLOCKS) - {"IN00", "IN04", "OUT05", "MID"}


def test_param_groups_follow_block_lr_weights(tiny):
    weights = [0.1 * (i + 1) for i in range(len(BLOCKS))]
    cfg = Network(algo="lora", dim=2, block_lr_weights=weights)
    net = network.create_network(*fresh(tiny), cfg, seed=1)
    frozen = net.text_encoder_loras[0].lora_down.weight
    frozen.requires_grad_(False)
    groups = network.param_groups(net, cfg, unet_lr=1e-3, text_encoder_lr=5e-5)

    lr_weight = dict(zip(BLOCKS, weights))
    for group in groups[:-1]:
        block = group["name"].removeprefix("unet:")
        assert group["lr"] == pytest.approx(1e-3 * lr_weight[block])
        members = [lora for lora in net.unet_loras if block_of(lora.lora_name) == block]
        assert {id(p) for p in group["params"]} == {id(p) for lora in members for p in lora.parameters()}
    assert groups[-1]["name"] == "text_encoder" and groups[-1]["lr"] == 5e-5
    assert all(p is not frozen for p in groups[-1]["params"])
    # blocks holding only ResNet convs (IN03 downsampler…) train nothing in plain LoRA: no group
    assert [g["name"] for g in groups[:-1]] == [f"unet:{b}" for b in BLOCKS if b in
                                                {block_of(lora.lora_name) for lora in net.unet_loras}]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    torch.optim.AdamW(groups)  # the groups are what an optimizer takes


def test_param_groups_without_block_weights(tiny):
    cfg = Network(algo="loha", dim=2, train_text_encoder=False)
    net = network.create_network(*fresh(tiny), cfg, seed=1)
    groups = network.param_groups(net, cfg, unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4)]
    assert len(groups[0]["params"]) == sum(1 for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------- init_weights

@pytest.mark.parametrize("algo", ["lora", "dylora", "ia3", "full"])
def test_init_weights_continues_from_the_file_exactly(tiny, tmp_path, algo):
    fields = dict(algo=algo, dim=4, alpha=2, conv_dim=4)
    first, unet, text_encoder = build(tiny, **fields)
    pretend_trained(first)
    (tmp_path / "runs").mkdir()
    saved = save(first, unet, text_encoder, tmp_path / "runs/first.safetensors")
    again, unet, text_encoder = build(tiny, **fields, init_weights="runs/first.safetensors", root=tmp_path)
    continued = network.kohya_state(again, unet, text_encoder)
    assert continued.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(continued[key].float(), value, rtol=0, atol=0, msg=key)


def test_init_weights_of_another_dim_is_refused(tiny, tmp_path):
    first, unet, text_encoder = build(tiny, algo="lora", dim=4)
    save(first, unet, text_encoder, tmp_path / "dim4.safetensors")
    with pytest.raises(network.UnmatchedKeys, match=r"dim4\.safetensors.*shape"):
        build(tiny, algo="lora", dim=8, init_weights="dim4.safetensors", root=tmp_path)
