"""`lorabake import-kohya`: kohya_ss GUI JSON and sd-scripts TOML (+ dataset TOML) in, lorabake runs out.

The sample inputs in tests/fixtures/kohya/ are written the way the tools write them: a kohya_ss GUI save of an
SD1.5 LoCon, an SDXL GUI save, and an sd-scripts --config_file (tables as kohya's docs group them) for a
LyCORIS LoHa with a --dataset_config of a training and a regularization subset.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from lorabake import cli
from lorabake.config import RunConfig
from lorabake.kohya import LORABAKE_KEYS, NOTHING_LOST, KohyaImportError, import_kohya, lorabake_key_for, write_import
from lorabake.project import load_project

from conftest import REPO

DATA = REPO / "tests" / "fixtures" / "kohya"
MIGRATION_DOC = REPO / "docs" / "migration.md"


def reasons(result) -> dict[str, str]:
    return {key: why for key, _, why in result.unmapped}


def targets(result) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, target, _ in result.mapped:
        found.setdefault(key, []).append(target)
    return found


def patched_gui(tmp_path: Path, source: str, **changes) -> Path:
    """A copy of a sample GUI config with some keys changed (None removes a key)."""
    data = json.loads((DATA / source).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / source
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture(scope="module")
def locon():
    return import_kohya(DATA / "locon_sd15_gui.json")


@pytest.fixture(scope="module")
def loha():
    return import_kohya(DATA / "loha_sd_scripts.toml", DATA / "loha_dataset.toml")


@pytest.fixture(scope="module")
def sdxl():
    return import_kohya(DATA / "sdxl_gui.json")


def test_every_sample_imports_to_a_valid_run(locon, loha, sdxl):
    for result in (locon, loha, sdxl):
        run = RunConfig.model_validate(result.run)
        assert run.base in result.bases and set(run.datasets) == set(result.datasets)


def test_gui_locon_values_carry_over_as_kohya_used_them(locon):
    run = RunConfig.model_validate(locon.run)
    # "Kohya LoCon" is networks.lora with conv_dim: lorabake's lora with conv_dim (kohya's LoCon targets)
    assert (run.network.algo, run.network.dim, run.network.alpha) == ("lora", 16, 8.0)
    assert (run.network.conv_dim, run.network.conv_alpha) == (8, 4.0)
    assert run.optimizer.type == "adamw8bit"
    assert run.optimizer.args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}  # "k=v k=v", parsed as sd-scripts does
    assert (run.optimizer.lr, run.optimizer.unet_lr, run.optimizer.text_encoder_lr) == (1e-4, 1e-4, 5e-5)
    assert run.scheduler.type == "cosine" and run.scheduler.warmup == pytest.approx(0.10)  # lr_warmup: 10 (%)
    assert (run.training.epochs, run.training.batch_size, run.training.seed, run.training.clip_skip) == (8, 2, 1234, 2)
    assert run.training.attention == "sdpa" and reasons(locon)["xformers"].startswith("approximate")
    # noise_offset_type "Original": the GUI passes noise_offset, not the multires settings it also stores
    assert run.loss.noise_offset == 0.05 and run.loss.adaptive_noise_scale == 0.005
    assert run.loss.multires_noise.iterations == 0 and "inactive" in reasons(locon)["multires_noise_iterations"]
    assert run.captions.keep_tokens == 1 and run.captions.shuffle and run.save.every_n_epochs == 2
    assert locon.bases == {"v1-5-pruned-emaonly": {"path": "/models/sd15/v1-5-pruned-emaonly.safetensors"}}
    assert locon.run["datasets"] == ["lbk-cat-locon"] and locon.name == "lbk-cat-locon"
    assert locon.samples == {"prompts": ["lbk_cat sitting on a sofa --n blurry --w 512 --h 512 --d 7",
                                         "lbk_cat in the snow"], "sampler": "euler_a"}
    # LyCORIS options are stored in every GUI save, but kohya_ss passes none of them for "Kohya LoCon"
    assert "does not pass it for LoRA_type Kohya LoCon" in reasons(locon)["train_on_input"]
    # kohya's newer loss options are carried: clipping, the loss and its threshold, the timestep range
    assert (run.training.max_grad_norm, run.loss.type, run.loss.huber_c, run.loss.huber_schedule) == (1.0, "l2", 0.1, "snr")
    assert (run.loss.min_timestep, run.loss.max_timestep, run.loss.ip_noise_gamma) == (0, 1000, None)


def test_sd_scripts_loha_with_a_dataset_toml(loha):
    run = RunConfig.model_validate(loha.run)
    assert (run.network.algo, run.network.dim, run.network.alpha) == ("loha", 8, 4.0)
    assert (run.network.conv_dim, run.network.conv_alpha, run.network.module_dropout) == (4, 2.0, 0.1)
    assert run.network.args == {"use_tucker": True}
    assert (run.optimizer.type, run.optimizer.lr) == ("prodigy", 1.0)
    assert run.optimizer.args == {"decouple": True, "weight_decay": 0.01, "d_coef": 2, "use_bias_correction": True,
                                  "safeguard_warmup": True}
    assert run.scheduler.warmup == pytest.approx(100 / 2000)  # 100 warm-up steps of max_train_steps 2000
    assert run.training.max_steps == 2000 and run.training.max_token_length == 150
    # dataset settings come from the dataset TOML's tables: [[datasets]] and [general]
    assert (run.resolution, run.training.batch_size, run.buckets.enabled) == (512, 2, True)
    assert run.captions.shuffle and run.captions.extension == ".txt" and run.captions.keep_tokens == 1
    assert [(f.source, f.target, f.repeats, f.is_reg) for f in loha.folders] == [
        ("/data/dog/img/10_lbk_dog", "datasets/lbk-dog-loha/10_lbk_dog dog", 10, False),
        ("/data/dog/reg", "datasets/lbk-dog-loha/reg/1_dog", 1, True)]
    why = reasons(loha)
    # sd-scripts hands --network_dropout to LyCORIS, whose LoHa modules ignore it: nothing to switch on
    assert why["network_dropout"].startswith(NOTHING_LOST) and "ignored" in why["network_dropout"]
    # the subsets disagree on flip_aug: the subset that flips does so on its own folder
    assert targets(loha)["datasets[0].subsets[0].flip_aug"] == ["datasets.lbk-dog-loha.folders.10_lbk_dog dog.flip"]
    assert run.augment.flip is False
    assert why["network_args.preset"].startswith("approximate")
    assert why["my_experimental_flag"].startswith("no lorabake equivalent")
    # a subset's caption_prefix lands on its own folder (datasets.<ds>.folders)
    assert loha.datasets["lbk-dog-loha"]["folders"] == {"reg/1_dog": {"caption_prefix": "photo of"},
                                                        "10_lbk_dog dog": {"flip": True}}
    assert "datasets[0].subsets[1].caption_prefix" not in why
    assert run.loss.zero_terminal_snr and run.training.max_grad_norm == 1.0


def test_loraplus_and_huber_come_over_from_sd_scripts(tmp_path):
    config = tmp_path / "plus.toml"
    config.write_text('pretrained_model_name_or_path = "/models/sd15.safetensors"\ntrain_data_dir = "/data/x"\n'
                      'network_module = "networks.lora"\nnetwork_dim = 8\nmax_train_steps = 100\n'
                      'network_args = ["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"]\n'
                      'loss_type = "huber"\nhuber_c = 0.2\nhuber_schedule = "exponential"\nmin_timestep = 100\n'
                      'max_grad_norm = 0.0\ndebiased_estimation_loss = true\nip_noise_gamma = 0.1\n'
                      'validation_split = 0.1\nvalidation_seed = 3\ntext_encoder_lr = [1.0e-5, 2.0e-5]\n')
    result = import_kohya(config)
    run = RunConfig.model_validate(result.run)
    assert (run.network.loraplus_lr_ratio, run.network.loraplus_text_encoder_lr_ratio) == (16.0, 4.0)
    assert (run.loss.type, run.loss.huber_c, run.loss.huber_schedule, run.loss.min_timestep) == ("huber", 0.2, "exponential", 100)
    assert run.training.max_grad_norm == 0.0 and run.loss.debiased_estimation and run.loss.ip_noise_gamma == 0.1
    assert (run.validation.split, run.validation.seed, run.validation.every_n_epochs) == (0.1, 3, 1)
    assert (run.optimizer.text_encoder_lr, run.optimizer.text_encoder_2_lr) == (1e-5, 2e-5)  # SDXL's two encoders
    assert not [entry for entry in result.unmapped if "loraplus" in entry[0] or "huber" in entry[0] or "valid" in entry[0]]


def test_sdxl_gui_warmup_steps_are_reported_not_guessed(sdxl):
    run = RunConfig.model_validate(sdxl.run)
    assert (run.resolution, run.buckets.max, run.buckets.step) == (1024, 2048, 32)
    assert not run.network.train_text_encoder  # text_encoder_lr 0 with a UNet rate: kohya_ss trains the UNet only
    assert run.network.conv_dim is None  # "Standard" never passes the conv_dim the save also holds
    assert run.optimizer.type == "adafactor" and run.optimizer.args["relative_step"] is False
    assert run.scheduler.type == "constant_with_warmup" and run.scheduler.warmup == 0.0
    assert "total step count" in reasons(sdxl)["lr_warmup_steps"]  # epochs × dataset size: unknown here
    assert run.training.full_precision and run.save.keep_last == 3 and run.loss.scale_weight_norms == 5.0
    assert "sdxl" in targets(sdxl) and any("Hugging Face" in note for note in sdxl.notes)
    assert reasons(sdxl)["seed"].startswith("approximate")  # an empty seed: kohya drew a random one


def test_warmup_steps_become_a_fraction_when_the_total_is_known(tmp_path):
    result = import_kohya(patched_gui(tmp_path, "sdxl_gui.json", max_train_steps=1000))
    assert result.run["scheduler"]["warmup"] == pytest.approx(0.1)
    assert result.run["training"]["max_steps"] == 1000
    assert "max_train_steps" in reasons(result)["epoch"]  # the GUI's epoch only computes max_train_steps


def test_every_input_key_is_mapped_or_reported(locon, loha, sdxl):
    accounted = lambda result: {k for k, *_ in result.mapped} | {k for k, *_ in result.unmapped}  # noqa: E731
    for result, name in ((locon, "locon_sd15_gui.json"), (sdxl, "sdxl_gui.json")):
        assert set(json.loads((DATA / name).read_text())) <= accounted(result)
    config = tomllib.loads((DATA / "loha_sd_scripts.toml").read_text())
    keys = {key for table in config.values() for key in table}
    keys |= {"network_args." + item.split("=")[0] for item in config["additional_network_arguments"]["network_args"]}
    keys |= {"optimizer_args." + item.split("=")[0] for item in config["optimizer_arguments"]["optimizer_args"]}
    dataset = tomllib.loads((DATA / "loha_dataset.toml").read_text())
    keys |= {f"general.{k}" for k in dataset["general"]}
    for i, ds in enumerate(dataset["datasets"]):
        keys |= {f"datasets[{i}].{k}" for k in ds if k != "subsets"}
        keys |= {f"datasets[{i}].subsets[{j}].{k}" for j, subset in enumerate(ds["subsets"]) for k in subset}
    assert keys <= accounted(loha)


@pytest.mark.parametrize("lora_type, algo", [("LyCORIS/LoCon", "locon"), ("LyCORIS/LoHa", "loha"),
                                             ("LyCORIS/LoKr", "lokr"), ("LyCORIS/iA3", "ia3")])
def test_gui_lycoris_types(tmp_path, lora_type, algo):
    result = import_kohya(patched_gui(tmp_path, "locon_sd15_gui.json", LoRA_type=lora_type, network_dropout=0.1))
    network = RunConfig.model_validate(result.run).network
    assert network.algo == algo and (network.conv_dim, network.conv_alpha) == (8, 4.0)
    assert reasons(result)["LyCORIS_preset"].startswith("approximate")
    if algo == "locon":
        assert network.dropout == 0.1  # reaches LyCORIS' LoCon through sd-scripts' dropout workaround
    else:
        assert network.dropout == 0.0 and "ignored" in reasons(result)["network_dropout"]


def test_adaptive_optimizer_gets_one_rate_and_adafactor_its_schedule(tmp_path):
    prodigy = import_kohya(patched_gui(tmp_path, "locon_sd15_gui.json", optimizer="Prodigy", learning_rate=1.0,
                                       unet_lr=1.0, text_encoder_lr=0.5, optimizer_args="d_coef=2"))
    opt = RunConfig.model_validate(prodigy.run).optimizer
    # kohya: only the first param group's rate counts, the text encoder's
    assert (opt.lr, opt.unet_lr, opt.text_encoder_lr) == (0.5, None, None)
    assert reasons(prodigy)["unet_lr"].startswith("approximate")
    toml = tmp_path / "adafactor.toml"
    toml.write_text('pretrained_model_name_or_path = "m.safetensors"\nnetwork_module = "networks.lora"\n'
                    'optimizer_type = "AdaFactor"\nlr_scheduler = "cosine"\nlr_warmup_steps = 0.05\n')
    adafactor = import_kohya(toml)
    run = RunConfig.model_validate(adafactor.run)  # relative_step (kohya's default) needs Adafactor's schedule
    assert run.scheduler.type == "adafactor" and run.scheduler.warmup == 0.0
    assert reasons(adafactor)["lr_scheduler"].startswith("approximate")


def test_sdxl_block_options_map_onto_kohyas_23_sdxl_blocks(tmp_path):
    """kohya's SDXL LoRA: 23 block dims; down/up lr weights of 9, mid of 3, the embedding and the out
    layer added at 1.0 (get_block_lr_weight with is_sdxl)."""
    dims = ",".join(["8"] * 22 + ["0"])
    toml = tmp_path / "xl.toml"
    toml.write_text(f'pretrained_model_name_or_path = "/m/sdxl.safetensors"\ntrain_data_dir = "/data/img"\nsdxl = true\n'
                    f'network_module = "networks.lora"\nnetwork_args = ["block_dims={dims}", '
                    '"down_lr_weight=1,1,1,1,0,1,1,1,1", "mid_lr_weight=1,0.5,1"]\n')
    run = RunConfig.model_validate(import_kohya(toml).run)
    assert run.network.block_dims == [8] * 22 + [0]
    assert run.network.block_lr_weights == [1.0] + [1, 1, 1, 1, 0, 1, 1, 1, 1] + [1, 0.5, 1] + [1.0] * 9 + [1.0]
    assert run.unsupported_on("sdxl") == [] and "give 25 values" in run.unsupported_on("sd1")[0]


def test_missing_toml_keys_get_sd_scripts_defaults(tmp_path):
    """Where sd-scripts' default differs from lorabake's, a key the TOML leaves out gets sd-scripts' value."""
    dims = ",".join(["4"] * 25)
    toml = tmp_path / "minimal.toml"
    toml.write_text(f'pretrained_model_name_or_path = "/m/base.safetensors"\ntrain_data_dir = "/data/img"\n'
                    f'network_module = "networks.lora"\nnetwork_args = ["conv_dim=4", "block_dims={dims}", '
                    '"down_lr_weight=zeros+0.5", "mid_lr_weight=2", "block_lr_zero_threshold=0.1"]\n')
    result = import_kohya(toml)
    run = RunConfig.model_validate(result.run)
    assert (run.network.dim, run.network.alpha, run.network.conv_dim, run.network.conv_alpha) == (4, 1.0, 4, 1.0)
    assert run.network.block_dims == [4] * 25 and run.network.block_lr_zero_threshold == 0.1
    assert run.network.block_lr_weights == [0.5] * 12 + [2.0] + [1.0] * 12  # down curve, mid, up defaulted to 1
    assert (run.optimizer.type, run.optimizer.lr) == ("adamw", 2e-6)
    assert (run.training.max_steps, run.buckets.enabled, run.captions.extension) == (1600, False, ".caption")
    assert (run.training.attention, run.training.cache_latents) == ("eager", False)
    assert (run.save.every_n_epochs, run.save.precision) == (None, "fp32")
    assert any(key.startswith("network_dim (not set") for key, *_ in result.mapped)


def test_folders_are_read_from_a_kohya_train_data_dir(tmp_path):
    for folder in ("img/10_lbk_cat", "img/3_lbk_cat_sleeping", "img/notes", "reg/1_cat"):
        (tmp_path / folder).mkdir(parents=True)
    result = import_kohya(patched_gui(tmp_path, "locon_sd15_gui.json"))  # train_data_dir ./img, reg ./reg
    assert [(f.target, f.repeats, f.concept, f.is_reg) for f in result.folders] == [
        ("datasets/lbk-cat-locon/10_lbk_cat", 10, "lbk_cat", False),
        ("datasets/lbk-cat-locon/3_lbk_cat_sleeping", 3, "lbk_cat_sleeping", False),
        ("datasets/lbk-cat-locon/reg/1_cat", 1, "cat", True)]
    assert any("notes" in note and "<repeats>_" in note for note in result.notes)
    assert result.datasets == {"lbk-cat-locon": {"path": "datasets/lbk-cat-locon"}}


def test_values_lorabake_refuses_are_reported_not_fatal(tmp_path):
    # kohya_ss's own test configs hold bucket_reso_steps 1; lorabake's latents need multiples of 8
    result = import_kohya(patched_gui(tmp_path, "locon_sd15_gui.json", bucket_reso_steps=1, max_resolution="512,650"))
    run = RunConfig.model_validate(result.run)
    assert run.buckets.step == 64 and "lorabake refuses 1 for buckets.step" in reasons(result)["bucket_reso_steps"]
    assert run.resolution == (512, 648) and "rounded down" in reasons(result)["max_resolution"]


def test_unsupported_values_are_reported(tmp_path):
    result = import_kohya(patched_gui(tmp_path, "locon_sd15_gui.json", mixed_precision="fp8",
                                      optimizer="AdEMAMix8bit", lr_scheduler="rex"))
    why = reasons(result)
    assert "no, fp16, bf16" in why["mixed_precision"] and "AdEMAMix8bit" in why["optimizer"]
    assert "rex" in why["lr_scheduler"] and "optimizer was not carried over" in why["optimizer_args.weight_decay"]
    assert "warm-up" in why["lr_warmup"]  # no schedule carried over, so no warm-up either
    assert "type" not in result.run["optimizer"] and "mixed_precision" not in result.run["training"]


@pytest.mark.parametrize("name, text, message", [
    ("broken.json", '{"learning_rate": 1e-4,', r"broken\.json: not valid JSON \(line 1"),
    ("list.json", "[1, 2]", r"list\.json: the top level must be an object"),
    ("other.json", '{"name": "not kohya"}', r"other\.json: does not look like a kohya config"),
    ("rate.json", '{"network_dim": 8, "learning_rate": "fast"}', r"rate\.json: learning_rate: expected a number"),
    ("flux.json", '{"LoRA_type": "Flux1"}', r"flux\.json: LoRA_type: 'Flux1' is not a network"),
    ("broken.toml", "network_dim = [", r"broken\.toml: not valid TOML"),
    ("algo.toml", 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=tlora"]', r"algo 'tlora'"),
    ("config.yaml", "network_dim: 8", r"config\.yaml: expected a kohya_ss GUI config \(\.json\)"),
    ("db.json", '{"train_data_dir": "img", "learning_rate": 1e-6}', r"db\.json: not a LoRA config"),
    ("flux_on.json", '{"LoRA_type": "Standard", "flux1_checkbox": true}', r"flux1_checkbox is on"),
])
def test_garbage_input_names_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(KohyaImportError, match=message):
        import_kohya(tmp_path / name)


def test_bad_dataset_toml_names_the_file(tmp_path):
    (tmp_path / "ds.toml").write_text("[general]\nshuffle_caption = true\n")
    with pytest.raises(KohyaImportError, match=r"ds\.toml: datasets: needs at least one \[\[datasets\]\]"):
        import_kohya(DATA / "loha_sd_scripts.toml", tmp_path / "ds.toml")
    with pytest.raises(KohyaImportError, match=r"missing\.toml: file not found"):
        import_kohya(DATA / "loha_sd_scripts.toml", tmp_path / "missing.toml")


def test_written_run_loads_with_the_project_loader(tmp_path, loha):
    runs = tmp_path / "configs" / "runs"
    write_import(loha, runs / "lbk-dog-loha.yaml", runs / "lbk-dog-loha.kohya-import.md")
    assert sorted(p.name for p in runs.iterdir()) == ["lbk-dog-loha.kohya-import.md", "lbk-dog-loha.yaml"]
    (tmp_path / "data").mkdir()
    # the suggested names, with the embedded tiny model standing in for the checkpoint
    (tmp_path / "configs" / "config.yaml").write_text(yaml.safe_dump({
        "bases": {"v1-5-pruned-emaonly": {"builtin": "tiny-sd"}}, "datasets": {"lbk-dog-loha": {"path": "data"}}}))
    project = load_project(tmp_path / "configs" / "config.yaml")
    assert project.runs["lbk-dog-loha"] == RunConfig.model_validate(loha.run)
    report = (runs / "lbk-dog-loha.kohya-import.md").read_text()
    assert "| `network_args.conv_dim` | `network.conv_dim` | `4` |" in report
    assert "`datasets/lbk-dog-loha/reg/1_dog/`" in report and "folders.10_lbk_dog dog.flip" in report
    suggested = re.search(r"```yaml\n(.*?)```", report, re.S).group(1)
    assert yaml.safe_load(suggested)["bases"] == loha.bases


def test_gui_settings_saved_as_toml_are_read_in_the_gui_vocabulary(tmp_path):
    toml = tmp_path / "gui.toml"
    toml.write_text('[model]\npretrained_model_name_or_path = "/m/base.safetensors"\ntrain_data_dir = "/d/img"\n'
                    '[basic]\nLoRA_type = "Standard"\noptimizer = "AdamW"\nmax_resolution = "768,768"\n'
                    'lr_scheduler = "cosine"\nlr_warmup = 5\nepoch = 4\nnetwork_dim = 8\nnetwork_alpha = 4\n')
    run = RunConfig.model_validate(import_kohya(toml).run)
    assert (run.resolution, run.scheduler.warmup, run.training.epochs, run.optimizer.type) == (768, 0.05, 4, "adamw")


def test_command_line(tmp_path, capsys):
    out = tmp_path / "runs" / "style.yaml"
    assert cli.main(["import-kohya", "--from", str(DATA / "sdxl_gui.json"), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["datasets"] == ["style"]  # the run is named after the file
    assert len(list(out.parent.glob("*.md"))) == 1
    (tmp_path / "bad.json").write_text("{")
    assert cli.main(["import-kohya", "--from", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_migration_doc_table_matches_the_importer():
    """docs/migration.md's key table names each kohya key and the lorabake key the importer maps it to."""
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", MIGRATION_DOC.read_text(), re.M)
    documented = dict(rows)
    assert documented, "no key table found in docs/migration.md"
    for kohya_key, lorabake_key in documented.items():
        assert lorabake_key_for(kohya_key) == lorabake_key, kohya_key
    assert set(LORABAKE_KEYS) <= set(documented)


def test_subsets_that_disagree_keep_their_settings_per_folder(tmp_path):
    config, dataset = tmp_path / "run.toml", tmp_path / "dataset.toml"
    config.write_text('pretrained_model_name_or_path = "/models/sd15.safetensors"\nnetwork_module = "networks.lora"\n'
                      'max_train_steps = 100\n')
    dataset.write_text('[general]\nkeep_tokens = 1\n[[datasets]]\nresolution = 512\n'
                       '  [[datasets.subsets]]\n  image_dir = "/data/5_cat"\n  num_repeats = 5\n  keep_tokens = 2\n'
                       '  caption_suffix = "masterpiece"\n'
                       '  [[datasets.subsets]]\n  image_dir = "/data/2_dog"\n  num_repeats = 2\n')
    result = import_kohya(config, dataset)
    folders = result.datasets[result.run["datasets"][0]]["folders"]
    assert folders == {"5_cat": {"caption_suffix": "masterpiece", "keep_tokens": 2}, "2_dog": {"keep_tokens": 1}}
    assert "keep_tokens" not in result.run.get("captions", {})  # no single run-wide value to pick
    from lorabake.config import DatasetSpec
    DatasetSpec.model_validate({"path": "datasets/x", "folders": folders})  # what config.yaml accepts


def masked_import(tmp_path, main: str, subsets: list[str]):
    config, dataset = tmp_path / "run.toml", tmp_path / "dataset.toml"
    config.write_text('pretrained_model_name_or_path = "/models/sd15.safetensors"\nnetwork_module = "networks.lora"\n'
                      f'max_train_steps = 100\n{main}')
    dataset.write_text("[[datasets]]\nresolution = 512\n" + "".join(
        f'  [[datasets.subsets]]\n  image_dir = "/data/{i + 1}_c{i}"\n{extra}' for i, extra in enumerate(subsets)))
    result = import_kohya(config, dataset)
    return result, RunConfig.model_validate(result.run)


def test_masked_loss_and_alpha_masks_come_over(tmp_path):
    # alpha_mask on every subset: kohya masks with the alpha channel (masked_loss or not)
    result, run = masked_import(tmp_path, "", ['  alpha_mask = true\n', '  alpha_mask = true\n'])
    assert (run.loss.masked, run.loss.mask_source) == (True, "alpha")
    assert targets(result)["datasets[0].subsets[0].alpha_mask"] == ["loss.mask_source"]
    # on one subset only: still alpha masks, reported as approximate (lorabake reads every image's alpha)
    result, run = masked_import(tmp_path, "masked_loss = true\n", ['  alpha_mask = true\n', ''])
    assert (run.loss.masked, run.loss.mask_source) == (True, "alpha")
    assert reasons(result)["datasets[0].subsets[0].alpha_mask"].startswith("approximate")
    assert targets(result)["masked_loss"] == ["loss.masked"]
    # masked_loss with conditioning images: masks from a folder, and a note on where they go
    result, run = masked_import(tmp_path, "masked_loss = true\n", ['  conditioning_data_dir = "/data/masks"\n'])
    assert (run.loss.masked, run.loss.mask_source, run.loss.mask_folder) == (True, "folder", "masks")
    assert targets(result)["datasets[0].subsets[0].conditioning_data_dir"] == ["loss.mask_folder"]
    assert any("conditioning_data_dir's images into masks/" in note for note in result.notes)
    # masked_loss alone masks nothing in kohya
    result, run = masked_import(tmp_path, "masked_loss = true\n", [''])
    assert run.loss.masked is False and reasons(result)["masked_loss"].startswith(NOTHING_LOST)
