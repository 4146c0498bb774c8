"""The base model and the run name."""
from __future__ import annotations

import re
from pathlib import Path

from lorabake.kohya.bookkeeping import _Importer
from lorabake.kohya.values import _boolean, _text


def _entry_name(text: str, fallback: str) -> str:
    """A config.yaml key from a path or name: its last part, without the file suffix."""
    last = re.split(r"[\\/]", text.strip().rstrip("\\/"))[-1]
    last = re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", last, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", last).strip("-._")
    return name or fallback


def _map_model(imp: _Importer) -> None:
    entry = imp.take("pretrained_model_name_or_path")
    if entry is None:
        name = "base"
        imp.notes.append("The config names no base model: add bases.base to configs/config.yaml, or edit `base:`.")
    else:
        path = _text(entry)
        name = _entry_name(path, "base")
        imp.bases[name] = {"path": path}
        imp.record(entry, f"bases.{name}.path", path)
        _note_model_path(imp, name, path)
    imp.run["base"] = name
    for key, architecture in (("sdxl", "SDXL"), ("v2", "SD2")):
        flag = imp.take(key)
        if flag is not None and _boolean(flag):
            imp.record(flag, f"bases.{name}", f"{architecture} (read from the checkpoint)")
        elif flag is not None:
            imp.skip(flag, "nothing lost: off in kohya")
    v_param = imp.take("v_parameterization")
    if v_param is not None:  # kohya trains the epsilon target unless told otherwise, whatever the base
        imp.set(v_param, "loss.prediction", "v_prediction" if _boolean(v_param) else "epsilon")


def _note_model_path(imp: _Importer, name: str, path: str) -> None:
    if path.lower().endswith(".ckpt"):
        imp.notes.append(f"bases.{name}: {path} is a pickled .ckpt; lorabake refuses those unless the base entry "
                         "says `allow_pickle: true` (a .safetensors copy is safer).")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).exists():
        imp.notes.append(f"bases.{name}: '{path}' looks like a Hugging Face repo id; lorabake loads bases offline: "
                         "download it first and point `path` at the folder or .safetensors file.")


def _run_name(imp: _Importer, config: Path) -> str:
    entry = imp.take("output_name")
    name = _entry_name(_text(entry), "") if entry is not None else ""
    name = name or _entry_name(config.stem, "imported")
    if entry is not None:
        imp.record(entry, "run name (configs/runs/<name>.yaml)", name)
    return name
