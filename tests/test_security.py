"""Hostile config input: names that would steer a write outside results/, pickles that would run
code, and files whose headers are not what they claim — all refused before any job runs."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lorabake import paths
from lorabake.config import ConfigError
from lorabake.models import base_files
from lorabake.names import UnsafeName
from lorabake.project import load_project
from lorabake.workspace import Workspace

from conftest import FIXTURE


def write_project(root: Path, edit=None, run: str = "") -> Path:
    """A minimal project under root/ (the demo dataset, one run), with `edit(config)` applied."""
    (root / "configs" / "runs").mkdir(parents=True)
    (root / "datasets").symlink_to(FIXTURE / "datasets")
    config = {"bases": {"tiny": {"builtin": "tiny-sd"}}, "datasets": {"demo": {"path": "datasets/demo"}},
              "defaults": {"datasets": ["demo"], "resolution": 128, "network": {"dim": 4, "alpha": 4}}}
    if edit is not None:
        edit(config)
    (root / "configs" / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "configs" / "runs" / "a.yaml").write_text(run)
    return root / "configs" / "config.yaml"


def snapshot(top: Path, project: Path) -> dict[str, str]:
    """Every file under `top` outside the project's results/, with a hash of its bytes."""
    results = project / "results"
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(top.rglob("*"))
            if p.is_file() and not p.is_symlink() and results not in p.parents}


def validate(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorabake", "--config", str(config), "validate"],
                          cwd=config.parent.parent, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- names that become paths

def test_dataset_keys_that_leave_results_are_refused_and_write_nothing(tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "victim.json").write_text('{"precious": true}')
    project = tmp_path / "outer" / "project"
    hostile = ["../x", str(outer / "abs-ds"), str(outer / "victim"), "..", "a/b", ".hidden", "x\n"]

    def edit(config):
        for key in hostile:
            config["datasets"][key] = {"path": "datasets/demo"}
    config = write_project(project, edit)
    before = snapshot(tmp_path, project)
    out = validate(config)
    assert out.returncode != 0, out.stdout
    for key in hostile:
        assert f"datasets: key {key!r}" in out.stderr
    assert "ok" not in out.stdout
    assert snapshot(tmp_path, project) == before
    assert json.loads((outer / "victim.json").read_text()) == {"precious": True}
    assert not (outer / "abs-ds.json").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("where, edit", [
    ("bases", lambda c: c["bases"].update({"../../evil-base": {"builtin": "tiny-sd"}})),
    ("merges: entry 0: name", lambda c: c.update(merges=[{"name": "../m", "loras": [{"run": "a"}]}])),
    ("extracts: entry 0: name", lambda c: c.update(extracts=[{"name": "/tmp/e", "tuned": "tiny"}])),
    ("resizes: entry 0: name", lambda c: c.update(resizes=[{"name": "r/../../x", "run": "a", "rank": 2}])),
    ("svd_merges: entry 0: name", lambda c: c.update(svd_merges=[{"name": "..", "loras": [{"run": "a"}], "rank": 2}])),
    ("emas: entry 0: name", lambda c: c.update(emas=[{"name": "../../e", "run": "a", "decay": 0.5}])),
])
def test_every_name_that_becomes_a_path_passes_one_check(tmp_path, where, edit):
    with pytest.raises(ConfigError, match=rf"config.yaml: {where}.*becomes a file name under results/"):
        load_project(write_project(tmp_path, edit))


def test_sweep_point_names_are_checked(tmp_path):
    config = write_project(tmp_path, run="sweep: {captions.extension: ['." + "x" * 130 + "']}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: sweep: the run name of a point .*at most 120"):
        load_project(config)


def test_paths_refuse_an_unchecked_name():
    assert paths.run_lora("demo-lora") == "results/runs/demo-lora/demo-lora.safetensors"
    for bad in ("../x", "/abs", "a/b", ""):
        with pytest.raises(UnsafeName):
            paths.base_json(bad)
        with pytest.raises(UnsafeName):
            paths.scan_cache(bad)


# ---------------------------------------------------------------- pickles

class RunsCode:
    """Unpickling this object creates a file: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_even_when_allowed(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, checkpoint)
    with pytest.raises(base_files.PickleRefused) as error:
        base_files.import_single_file(checkpoint, tmp_path / "out", allow_pickle=True)
    message = str(error.value)
    assert str(checkpoint) in message and "weights_only=True" in message and "save_file" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- headers, before any job

def _header_file(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def malformed_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2, 3)}, str(good))
    data = good.read_bytes()
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    files = {
        "truncated": data[:-5], "length 2^62": struct.pack("<Q", 2**62) + data[8:],
        "length past EOF": struct.pack("<Q", len(data)) + data[8:], "empty": b"",
        "non-JSON": struct.pack("<Q", 9) + b"not json!",
    }
    out = {name: folder / f"{name.replace(' ', '_')}.safetensors" for name in files}
    for name, raw in files.items():
        out[name].write_bytes(raw)
    out["bad dtype"] = _header_file(folder / "dtype.safetensors", json.dumps({"x": {**entry, "dtype": "F99"}}).encode(),
                                    bytes(24))
    out["bad offsets"] = _header_file(folder / "offsets.safetensors",
                                      json.dumps({"x": {**entry, "data_offsets": [0, 4000]}}).encode(), bytes(24))
    return out


def test_a_malformed_base_header_is_refused_before_any_job(tmp_path):
    for name, bad in malformed_files(tmp_path).items():
        project = tmp_path / name.replace(" ", "_")
        config = write_project(project, lambda c: c["bases"].update(user={"path": str(bad)}), run="base: user\n")
        started = time.monotonic()
        with pytest.raises(ConfigError) as error:
            Workspace.load(config)
        assert time.monotonic() - started < 5
        assert f"bases.user.path: {bad}" in str(error.value), name
        assert not (project / "results").exists()


def test_bad_init_weights_are_refused_before_any_job(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(8, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 8)},
              str(lora))
    pickled = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, pickled)
    text = tmp_path / "passwd.safetensors"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    base = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(base))
    cases = {pickled: "not a .safetensors file", text: "not a readable .safetensors file",
             malformed_files(tmp_path)["truncated"]: "not a readable .safetensors file",
             base: "not a LoRA/LyCORIS file in kohya's key layout", lora: r"has ranks \[8\].*dim 4",
             Path("/etc/passwd"): "not a .safetensors file"}
    for i, (path, why) in enumerate(cases.items()):
        config = write_project(tmp_path / f"p{i}", run=f"network: {{init_weights: {path}}}\n")
        with pytest.raises(ConfigError, match=rf"a.yaml: network.init_weights: .*{why}"):
            Workspace.load(config)
    good = write_project(tmp_path / "fits", run=f"network: {{dim: 8, init_weights: {lora}}}\n")
    assert Workspace.load(good).run("a").network.init_weights == str(lora)
