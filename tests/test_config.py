from pathlib import Path

import pytest

from lorabake.config import ConfigError, RunConfig
from lorabake.project import load_project
from lorabake.workspace import Workspace

CONFIG = """
bases: {tiny: {builtin: tiny-sd}}
datasets: {demo: {path: data}}
defaults: {datasets: [demo], resolution: 128, network: {dim: 4, alpha: 2}}
"""


def project(tmp_path: Path, run: str, config: str = CONFIG) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "runs" / "a.yaml").write_text(run)
    return tmp_path / "config.yaml"


def test_defaults_merge_under_run(tmp_path):
    p = load_project(project(tmp_path, "network: {dim: 16}\n"))
    run = p.runs["a"]
    assert run.network.dim == 16 and run.network.alpha == 2 and run.size == (128, 128)


def test_unknown_key_names_run_file_and_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_project(project(tmp_path, "optimizer: {lr: 1.0e-4, betas: [0.9, 0.99]}\n"))
    assert "a.yaml: optimizer.betas" in str(e.value)


def test_error_from_defaults_names_config_yaml(tmp_path):
    config = CONFIG.replace("resolution: 128", "resolution: 100")
    with pytest.raises(ConfigError) as e:
        load_project(project(tmp_path, "", config))
    assert "config.yaml: defaults.resolution" in str(e.value)


def test_wrong_type_and_cross_field(tmp_path):
    with pytest.raises(ConfigError, match="training.epochs"):
        load_project(project(tmp_path, "training: {epochs: many}\n"))
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_project(project(tmp_path, "network: {train_unet: false, train_text_encoder: false}\n"))
    with pytest.raises(ConfigError, match="decouple"):
        load_project(project(tmp_path, "optimizer: {args: {decouple: true}}\n"))
    load_project(project(tmp_path, "optimizer: {type: prodigy, lr: 1.0, args: {decouple: true, d_coef: 2}}\n"))
    with pytest.raises(ConfigError, match="cannot be cached"):
        load_project(project(tmp_path, "augment: {color: true}\ntraining: {cache_latents: true}\n"))
    with pytest.raises(ConfigError, match="dropout is applied by LoRA/LoCon modules only, not loha"):
        load_project(project(tmp_path, "network: {algo: loha, dropout: 0.1}\n"))
    with pytest.raises(ConfigError, match="scheduler"):
        load_project(project(tmp_path, "optimizer: {type: adafactor}\n"))
    with pytest.raises(ConfigError, match="one learning rate"):
        load_project(project(tmp_path, "optimizer: {type: prodigy, lr: 1.0, unet_lr: 0.5}\n"))
    with pytest.raises(ConfigError, match="block_dims needs 25 values"):
        load_project(project(tmp_path, "network: {block_dims: [4, 4]}\n"))
    with pytest.raises(ConfigError, match="network.init_weights: file .* does not exist"):
        Workspace.load(project(tmp_path, "network: {init_weights: nope.safetensors}\n"))


def test_references_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'nope' is not a key of datasets"):
        load_project(project(tmp_path, "datasets: [nope]\n"))


def test_alpha_above_dim_is_a_warning(tmp_path):
    p = load_project(project(tmp_path, "network: {dim: 2, alpha: 8}\n"))
    assert any("network.alpha (8) > network.dim (2)" in w for w in p.warnings)


def test_bucket_spec_and_resolution_pairs():
    run = RunConfig(datasets=["d"], resolution=(192, 128))
    assert run.bucket_spec().resolution == (192, 128)


def test_sweep_expands_to_named_runs(tmp_path):
    p = load_project(project(tmp_path, "sweep: {network.dim: [4, 8], optimizer.type: [adamw, prodigy]}\n"
                                       "optimizer: {lr: 1.0}\n"))
    assert sorted(p.runs) == ["a-dim_4-type_adamw", "a-dim_4-type_prodigy", "a-dim_8-type_adamw", "a-dim_8-type_prodigy"]
    run = p.runs["a-dim_8-type_prodigy"]
    assert (run.network.dim, run.optimizer.type, run.optimizer.lr, run.network.alpha) == (8, "prodigy", 1.0, 2)


def test_sweep_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="a.yaml: sweep.network.dim: must be a non-empty list"):
        load_project(project(tmp_path, "sweep: {network.dim: 4}\n"))
    with pytest.raises(ConfigError, match="a.yaml: sweep point network.dimm"):
        load_project(project(tmp_path, "sweep: {network.dimm: [4]}\n"))


def test_option_reference_is_generated_from_the_models():
    from lorabake import config, docs

    committed = (Path(__file__).resolve().parent.parent / "docs" / "options.md").read_text()
    assert committed == docs.option_reference(), "run `lorabake docs` to regenerate docs/options.md"
    keys = {row[0] for row in docs.field_rows(config.RunConfig)}
    for name, field in config.RunConfig.model_fields.items():
        assert name in keys
        model = docs.nested_model(field.annotation, name)
        if model is not None:
            assert {f"{name}.{child}" for child in model[0].model_fields} <= keys
    assert "| network.algo |" in committed and "| loss.multires_noise.iterations |" in committed
    rows = [line.split("|") for line in committed.splitlines() if line.startswith("| ") and "---" not in line]
    undescribed = [row[1].strip() for row in rows if len(row) > 5 and not row[4].strip()]
    assert not undescribed, f"these options have no description: {undescribed}"


XL = CONFIG.replace("{tiny: {builtin: tiny-sd}}", "{tiny: {builtin: tiny-sdxl}}")


@pytest.mark.parametrize("run, message", [
    ("training: {clip_skip: 2}\n", "clip_skip has no meaning for SDXL"),
    ("network: {block_lr_weights: [" + ", ".join(["1"] * 25) + "]}\n",
     "network.block_lr_weights has 25 values, the SD1/SD2 block vocabulary; an SDXL base has 23 blocks: give 23 "
     r"values \(EMB, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT\)"),
])
def test_sdxl_refuses_options_it_cannot_honour(tmp_path, run, message):
    with pytest.raises(ConfigError, match=message):
        Workspace.load(project(tmp_path, run, XL))
    Workspace.load(project(tmp_path, run, CONFIG))  # the same run on an SD1 base is fine


def test_block_lists_follow_the_base_architecture(tmp_path):
    """23 values are SDXL's vocabulary: accepted there (with pivotal tuning), refused on SD1 with the count
    it wants; other lengths are refused when the file is read."""
    xl = "network: {block_dims: [" + ", ".join(["4"] * 23) + "]}\npivotal: {token: tok}\n"
    Workspace.load(project(tmp_path, xl, XL))
    with pytest.raises(ConfigError, match="network.block_dims has 23 values, the SDXL block vocabulary; an SD1 base "
                                          "has 25 blocks: give 25 values"):
        Workspace.load(project(tmp_path, xl, CONFIG))
    with pytest.raises(ConfigError, match="needs 25 values on SD1/SD2 .* or 23 on SDXL"):
        Workspace.load(project(tmp_path, "network: {block_alphas: [1, 2, 3]}\n", XL))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_base_is_refused_with_the_way_to_opt_in(tmp_path, suffix):
    (tmp_path / f"model{suffix}").write_bytes(b"not even read")
    config = CONFIG.replace("{tiny: {builtin: tiny-sd}}", f"{{tiny: {{path: model{suffix}}}}}")
    with pytest.raises(ConfigError) as error:
        Workspace.load(project(tmp_path, "", config))
    message = str(error.value)
    assert f"bases.tiny.path: {tmp_path / f'model{suffix}'} is a pickled checkpoint" in message
    assert "set `allow_pickle: true` under bases.tiny" in message


def test_base_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of builtin"):
        load_project(project(tmp_path, "", CONFIG.replace("{builtin: tiny-sd}", "{builtin: tiny-sd, path: x}")))
    with pytest.raises(ConfigError, match="does not exist"):
        Workspace.load(project(tmp_path, "", CONFIG.replace("{builtin: tiny-sd}", "{path: missing.safetensors}")))


def test_a_bad_default_is_blamed_on_config_yaml_not_a_run_file(tmp_path):
    config = CONFIG.replace("resolution: 128", "resolution: 128x")
    with pytest.raises(ConfigError) as error:
        load_project(project(tmp_path, "network: {dim: 8}\n", config))
    lines = str(error.value).splitlines()
    assert lines and all(line.startswith(f"{tmp_path / 'config.yaml'}: defaults.resolution: ") for line in lines), lines
    assert "sweep point" not in str(error.value)


def test_a_resolution_above_buckets_max_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"a.yaml: .*resolution 512x512 has a side larger than buckets.max \(256\)"):
        load_project(project(tmp_path, "resolution: 512\nbuckets: {min: 64, max: 256}\n"))
    load_project(project(tmp_path, "resolution: 512\nbuckets: {enabled: false, max: 256}\n"))  # no buckets: fine


def test_a_yaml_bomb_is_refused_within_a_second(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = "network:\n  args:\n" + "".join(f"    {line}\n" for line in lines)  # 10^9 values
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"a.yaml: expands to more than 100,000 values"):
        load_project(project(tmp_path, bomb))
    assert time.monotonic() - started < 1


MERGE_CONFIG = CONFIG.replace("bases: {tiny: {builtin: tiny-sd}}", "bases: {tiny: {builtin: tiny-sd}, other: {builtin: tiny-sd}}")


def test_merges_and_extracts_default_to_the_base_their_runs_trained_on(tmp_path):
    config = MERGE_CONFIG.replace("defaults: {", "defaults: {base: other, ") + """
merges: [{name: m, loras: [{run: a}]}]
extracts: [{name: e, tuned: m}]
"""
    p = load_project(project(tmp_path, "", config))
    assert p.file.merges["m"].base == "other" and p.file.extracts["e"].base == "other"


def test_a_merge_of_runs_on_two_bases_must_name_its_base(tmp_path):
    config = MERGE_CONFIG + "merges: [{name: m, loras: [{run: a}, {run: b}]}]\n"
    path = project(tmp_path, "base: other\n", config)
    (tmp_path / "runs" / "b.yaml").write_text("base: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_project(path)
    assert "config.yaml: merges.m.base: its LoRAs' runs trained on different bases (other, tiny)" in str(e.value)
    assert load_project(project(tmp_path, "base: other\n", config.replace("{name: m,", "{name: m, base: tiny,")))


def test_an_extract_from_a_bases_key_must_name_its_base(tmp_path):
    config = MERGE_CONFIG + "extracts: [{name: e, tuned: other}]\n"
    with pytest.raises(ConfigError) as e:
        load_project(project(tmp_path, "", config))
    assert "extracts.e.base: required when `tuned` ('other') is not a merge" in str(e.value)
