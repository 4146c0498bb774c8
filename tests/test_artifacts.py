"""What only real training, merging and extraction make true, checked on the built demo project."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorabake import paths
from lorabake.models import bases, network
from lorabake.tools import merge

from conftest import planned_jobs, snakemake

pytestmark = pytest.mark.workflow  # runs Snakemake


def unet_output(base: bases.Base) -> torch.Tensor:
    """The UNet's prediction on a fixed input, conditioned through the text encoder."""
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    ids = base.tokenizer(["lbk_circle, red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = base.text_encoder(ids)[0]
        return base.unet(latents, torch.tensor([500]), text).sample


def test_merged_model_equals_runtime_lora(built_project):
    base_dir = built_project / "results/base/tiny"
    runtime = bases.load_base(base_dir)
    network.apply_weights(built_project / "results/runs/demo-lora/demo-lora.safetensors", runtime.unet, runtime.text_encoder, 1.0)
    merged = merge.load_merged(base_dir, built_project / "results/merged/demo-merged.safetensors")
    plain = unet_output(bases.load_base(base_dir))
    expected, actual = unet_output(runtime), unet_output(merged)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA really changes the output
    assert (actual - expected).abs().max() < 1e-4


def test_extract_recovers_trained_deltas(built_project):
    base = bases.load_base(built_project / "results/base/tiny", parts=("unet", "text_encoder"))
    trained = network.module_deltas(built_project / "results/runs/demo-lora/demo-lora.safetensors", base.unet, base.text_encoder)
    extracted = network.module_deltas(built_project / "results/extracted/demo-extracted.safetensors", base.unet, base.text_encoder)
    assert set(extracted) == set(trained)
    error = sum(((extracted[k] - trained[k]) ** 2).sum() for k in trained).sqrt()
    norm = sum((trained[k] ** 2).sum() for k in trained).sqrt()
    assert error / norm < 1e-3


def test_same_config_and_seed_give_identical_bytes(project_copy):
    """Retrain a run from scratch through the workflow; CPU float sums depend on the thread count,
    which Snakemake pins per rule (OMP_NUM_THREADS), so the same command gives the same bytes."""
    target = "results/runs/other-run/other-run.safetensors"
    first = (project_copy / target).read_bytes()
    # The target goes first: --forcerun takes every word after it as a rule or file to force, and
    # `--forcerun train <target>` would rebuild the whole of `all`.
    out = snakemake(project_copy, target, "--forcerun", "train")
    assert "train other-run" in (project_copy / "logs/train/other-run.log").read_text()
    assert out.stderr.count("rule train:") == 1, out.stderr
    assert (project_copy / target).read_bytes() == first


def test_lora_keys_and_metadata_follow_kohya(built_project):
    from safetensors import safe_open

    with safe_open(str(built_project / "results/runs/demo-lora/demo-lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    with safe_open(str(built_project / "results/runs/demo-unet-only/demo-unet-only.safetensors"), "pt") as f:
        assert not any(k.startswith("lora_te_") for k in f.keys())  # train_text_encoder: false


def test_an_emas_entry_is_built_by_all_from_the_runs_epoch_files_alone(project_copy):
    config_file = project_copy / "configs/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    entry = {"name": "demo-ema", "run": "demo-lora", "decay": 0.6}
    config_file.write_text(yaml.safe_dump({**config, "emas": [entry]}, sort_keys=False))
    assert planned_jobs(project_copy) == [("ema", {"name": "demo-ema"})]  # in `all`, and nothing retrains
    snakemake(project_copy, "all")
    epochs = [load_file(project_copy / paths.epoch_lora("demo-lora", epoch)) for epoch in (1, 2, 3, 4)]
    expected = {key: value.double() for key, value in epochs[0].items()}
    for state in epochs[1:]:  # ema_k = decay × ema_(k−1) + (1 − decay) × w_k
        expected = {key: 0.6 * expected[key] + 0.4 * state[key].double() for key in expected}
    result = load_file(project_copy / paths.posthoc_ema("demo-ema"))
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():  # the run saves fp16, and so does the EMA
        torch.testing.assert_close(result[key].double(), value, rtol=2e-3, atol=1e-5)
    out = snakemake(project_copy, "-n", "all")
    assert "Nothing to be done" in out.stdout + out.stderr
    config_file.write_text(yaml.safe_dump({**config, "emas": [{**entry, "epochs": [2, 9]}]}, sort_keys=False))
    refused = snakemake(project_copy, "-n", "all", check=False)
    assert refused.returncode != 0
    assert "emas.demo-ema.epochs: run demo-lora keeps no epoch file for epoch(s) [9]" in refused.stdout + refused.stderr
