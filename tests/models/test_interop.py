"""Our LoRA files load in the clients people use, and compute there what lorabake's runtime computes.

diffusers: `load_lora_weights` (its kohya converter, then PEFT) must take every module of an SD1, SD2
or SDXL file, LoRA or LoCon, without a warning; its UNet and text encoders must then give the outputs
that `network.apply_weights` gives at strength 1. LyCORIS: its loaders must rebuild every module of
our LoHa and LoKr files and apply the same update.

transformers 5 dropped CLIPTextModel's `text_model.` level, so LyCORIS' name matching (module path,
dots as underscores) no longer finds the text encoder modules that kohya, A1111 and ComfyUI name
`lora_te_text_model_encoder_…`: on today's CLIPTextModel it silently skips them; on the
transformers 4 layout (the `text_model.` level restored) it finds every one.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lorabake.config import Network
from lorabake.models import bases, lora_format, network

# An alpha below dim, and another for 3×3 convs, so a client that ignores alpha or reads one for all fails.
LORA = Network(algo="lora", dim=4, alpha=2)
LOCON = Network(algo="lora", dim=4, alpha=2, conv_dim=4, conv_alpha=1)  # kohya's LoCon: conv_dim set
TOLERANCE = 1e-4  # fp32 on these tiny models; measured differences are ~1e-6
TOKENS = 8  # a short prompt keeps the forward passes fast; CLIP takes any length up to 77


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Callable[[str], Path]:
    """A built tiny base by name, built once per module on first use."""
    root = tmp_path_factory.mktemp("bases")

    @functools.cache
    def build(builtin: str) -> Path:
        bases.build_base(builtin, root / builtin)
        return root / builtin

    return build


@pytest.fixture(scope="module")
def plain_outputs(base_dir) -> Callable[[str], dict[str, torch.Tensor]]:
    """What a base computes without any LoRA, by name, computed once."""

    @functools.cache
    def compute(builtin: str) -> dict[str, torch.Tensor]:
        plain = bases.load_base(base_dir(builtin), ("unet", "text_encoder"))
        return outputs(plain.unet, plain.text_encoders)

    return compute


@torch.no_grad()
def pretend_trained(net, seed: int = 2) -> None:
    """Move every parameter off its initial value (up weights start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for param in net.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=generator))


def write_lora(base: Path, cfg: Network, path: Path) -> Path:
    """A LoRA file as a lorabake run writes it: kohya key names, fp32, kohya's metadata."""
    loaded = bases.load_base(base, ("unet", "text_encoder"))
    net = network.create_network(loaded.unet, loaded.te, cfg, seed=1)
    pretend_trained(net)
    metadata = lora_format.lora_metadata(
        run_name="interop", algo=cfg.algo, dim=cfg.dim, alpha=cfg.alpha, network_args=network.kohya_network_args(cfg),
        base=bases.base_info(base), resolution=(128, 128), epoch=1, steps=1, facts={})
    lora_format.save_lora(network.kohya_state(net, loaded.unet, loaded.te), path, "fp32", metadata)
    return path


def modules_in(path: Path, prefix: str = "lora_") -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key.split(".")[0] for key in f.keys() if key.startswith(prefix)}


def unet_inputs(unet) -> dict:
    """Fixed latents, timestep and text context; SDXL also gets its pooled embedding and size/crop ids."""
    generator = torch.Generator().manual_seed(3)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=generator), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, TOKENS, unet.config.cross_attention_dim, generator=generator)}
    if network.is_sdxl(unet):
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
    return inputs


@torch.no_grad()
def outputs(unet, text_encoders: list) -> dict[str, torch.Tensor]:
    """The UNet's prediction and, per text encoder, the last and penultimate hidden states (SD1 and SD2
    condition on one, SDXL on the other) and the pooled projection where there is one."""
    found = {"unet": unet(**unet_inputs(unet)).sample} if unet is not None else {}
    ids = torch.randint(0, 49406, (1, TOKENS), generator=torch.Generator().manual_seed(4))
    for i, text_encoder in enumerate(text_encoders):
        out = text_encoder(ids, output_hidden_states=True)
        found |= {f"te{i}.last": out.last_hidden_state, f"te{i}.penultimate": out.hidden_states[-2]}
        if getattr(out, "text_embeds", None) is not None:
            found[f"te{i}.pooled"] = out.text_embeds
    return found


def differences(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    return {key: (got[key] - want[key]).abs().max().item() for key in want}


def runtime_outputs(base: Path, path: Path) -> dict[str, torch.Tensor]:
    """What lorabake's own runtime application of the file computes (strength 1)."""
    reference = bases.load_base(base, ("unet", "text_encoder"))
    network.apply_weights(path, reference.unet, reference.te, 1.0)
    return outputs(reference.unet, reference.text_encoders)


# ---------------------------------------------------------------- diffusers

class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def client_complaints() -> Iterator[list[str]]:
    """Every warning diffusers logs (its library logger does not propagate to the root logger, so
    caplog misses them), plus Python warnings that speak of keys or LoRA modules."""
    collected = Collected()
    logging.getLogger("diffusers").addHandler(collected)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield collected.messages
    finally:
        logging.getLogger("diffusers").removeHandler(collected)
    about_keys = re.compile(r"unexpected|not loaded|missing|lora", re.IGNORECASE)
    collected.messages += [str(w.message) for w in raised if about_keys.search(str(w.message))]


def pipeline_text_encoders(pipe) -> list:
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def wrapped_by_peft(pipe, kohya_names: dict[int, str]) -> dict[str, torch.nn.Module]:
    """The layers PEFT wrapped with a LoRA layer (it keeps the original as base layer), by kohya name."""
    from peft.tuners.lora import LoraLayer

    wrapped = {}
    for model in [pipe.unet, *pipeline_text_encoders(pipe)]:
        originals = [layer.get_base_layer() for layer in model.modules() if isinstance(layer, LoraLayer)]
        wrapped |= {kohya_names[id(original)]: original for original in originals}
    return wrapped


def load_in_diffusers(base: Path, path: Path):
    """The base's pipeline with the file loaded; returns (pipeline, complaints, the layers it wrapped by
    kohya name)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    text_encoders = pipeline_text_encoders(pipe)
    te_argument = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    kohya_names = {id(module): name for name, (_, module, _) in network.module_table(pipe.unet, te_argument).items()}
    with client_complaints() as complaints:
        pipe.load_lora_weights(str(path))
    return pipe, complaints, wrapped_by_peft(pipe, kohya_names)


@pytest.mark.parametrize("builtin, cfg", [("tiny-sd", LORA), ("tiny-sd", LOCON), ("tiny-sdxl", LORA),
                                          ("tiny-sdxl", LOCON), ("tiny-sd2-v", LORA)],
                         ids=["sd1-lora", "sd1-locon", "sdxl-lora", "sdxl-locon", "sd2-lora"])
def test_diffusers_loads_every_module_and_computes_what_our_runtime_does(base_dir, plain_outputs, tmp_path,
                                                                        builtin, cfg):
    base = base_dir(builtin)
    path = write_lora(base, cfg, tmp_path / "lora.safetensors")
    pipe, complaints, wrapped = load_in_diffusers(base, path)
    assert complaints == []
    assert wrapped.keys() == modules_in(path)
    if cfg.conv_dim is not None:  # LoCon's 3×3 convs were taken, not only the attention layers
        assert any(getattr(layer, "kernel_size", None) == (3, 3) for layer in wrapped.values())

    got = outputs(pipe.unet, pipeline_text_encoders(pipe))
    want = runtime_outputs(base, path)
    assert max(differences(got, want).values()) < TOLERANCE, differences(got, want)
    # and the LoRA did change every output, so the agreement above is not both sides doing nothing
    assert min(differences(got, plain_outputs(builtin)).values()) > 100 * TOLERANCE


def test_the_complaint_check_sees_a_module_diffusers_cannot_place(base_dir, tmp_path):
    """A file naming a layer the UNet lacks: diffusers loads the rest and only logs a warning, which is
    why the test above must read its log."""
    from safetensors.torch import load_file, save_file

    base = base_dir("tiny-sd")
    saved = load_file(str(write_lora(base, LORA, tmp_path / "lora.safetensors")))
    real = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for key in [k for k in saved if k.startswith(f"{real}.")]:
        saved[key.replace("down_blocks_0", "down_blocks_7")] = saved[key].clone()
    save_file(saved, str(tmp_path / "stray.safetensors"))
    _, complaints, wrapped = load_in_diffusers(base, tmp_path / "stray.safetensors")
    assert any("unexpected keys" in message and "down_blocks.7" in message for message in complaints)
    assert len(wrapped) == len(modules_in(tmp_path / "stray.safetensors")) - 1


# ---------------------------------------------------------------- LyCORIS

@pytest.fixture(scope="module", params=["loha", "lokr"])
def lycoris_file(request, base_dir, plain_outputs, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(base, an SD1 file of this algo, what our runtime computes with it, which differs everywhere from
    what the base computes: agreeing with it means applying the file)."""
    base = base_dir("tiny-sd")
    path = write_lora(base, Network(algo=request.param, dim=4, alpha=2),
                      tmp_path_factory.mktemp(request.param) / "lora.safetensors")
    want = runtime_outputs(base, path)
    assert min(differences(want, plain_outputs("tiny-sd")).values()) > 100 * TOLERANCE
    return base, path, want


def test_lycoris_kohya_loader_applies_our_unet_modules_and_skips_flattened_text_encoders(lycoris_file, plain_outputs):
    """`lycoris.kohya.create_network_from_weights` is what sd-scripts runs for
    `--network_module lycoris.kohya --network_weights`. It drops names it cannot place without a word."""
    from lycoris.kohya import create_network_from_weights

    base, path, want = lycoris_file
    client = bases.load_base(base, ("unet", "text_encoder"))
    net, _ = create_network_from_weights(1.0, str(path), None, client.text_encoder, client.unet)
    net.apply_to(client.text_encoder, client.unet, apply_text_encoder=True, apply_unet=True)

    assert {lora.lora_name for lora in net.unet_loras} == modules_in(path, "lora_unet_")
    got = outputs(client.unet, [])
    assert differences(got, {"unet": want["unet"]})["unet"] < TOLERANCE
    # transformers 5's CLIPTextModel has no `text_model.` level: LyCORIS looks for `lora_te_encoder_…`
    assert net.text_encoder_loras == []
    untouched = plain_outputs("tiny-sd")
    assert all(torch.equal(value, untouched[key]) for key, value in outputs(None, client.text_encoders).items())


class Transformers4Layout(torch.nn.Module):
    """CLIPTextModel as transformers 4 (and so kohya, A1111, ComfyUI) lays it out: `text_model.encoder…`."""

    def __init__(self, text_model: torch.nn.Module):
        super().__init__()
        self.text_model = text_model


@contextlib.contextmanager
def lycoris_prefix(prefix: str) -> Iterator[None]:
    """LyCORIS' generic loader names modules `<prefix>_<path>`; its own files use `lycoris`."""
    from lycoris.wrapper import LycorisNetwork

    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.apply_preset({"lora_prefix": prefix})
    try:
        yield
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": saved})


def test_lycoris_generic_loader_finds_every_module_by_kohya_names(lycoris_file):
    """`lycoris.create_lycoris_from_weights` pointed at kohya's prefixes: every UNet module, and every
    text encoder module once the transformers 4 layout is restored; same outputs as our runtime."""
    from lycoris import create_lycoris_from_weights

    base, path, want = lycoris_file
    client = bases.load_base(base, ("unet", "text_encoder"))
    for prefix, module in (("lora_unet", client.unet), ("lora_te", Transformers4Layout(client.text_encoder))):
        with lycoris_prefix(prefix):
            net, _ = create_lycoris_from_weights(1.0, str(path), module)
        assert {lora.lora_name for lora in net.loras} == modules_in(path, f"{prefix}_")
        net.apply_to()
    got = outputs(client.unet, client.text_encoders)
    assert max(differences(got, want).values()) < TOLERANCE, differences(got, want)
