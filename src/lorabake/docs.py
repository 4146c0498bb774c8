"""The option reference (docs/options.md), generated from the pydantic config models.

Every field of a run config appears with its type, default, meaning and kohya equivalent, taken from
the models themselves, so the page cannot drift from what the loader accepts. `lorabake docs` rewrites
it; a test fails when the committed page differs from what this module generates.
"""
from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorabake import config, project_file

HEADER = """# Option reference

Generated from `src/lorabake/config.py` by `lorabake docs` — do not edit by hand.

A run is `defaults` (in `configs/config.yaml`) ⊕ `configs/runs/<run>.yaml` ⊕ a sweep point. Keys are
grouped as below; unknown keys are refused with the file and key path. "kohya" names the sd-scripts
flag (or `network_args` entry) with the same meaning.
"""

SWEEP = """## sweep

A run file may hold `sweep:`, a mapping of dotted keys to lists of values, e.g.
`sweep: {network.dim: [4, 8], optimizer.type: [adamw, prodigy]}`. The file then stands for the
cartesian product of runs, named `{file}-{last key part}_{value}-…` (`style-dim_4-type_prodigy`);
each run folder's `config.json` records its resolved config.
"""


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a checked name: the docs say `name`, its rule is in the README
        return "name"
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{json.dumps(value)}`"


def nested_model(annotation: Any, key: str) -> tuple[type[BaseModel], str] | None:
    """The model inside a field (directly, optional, in a dict or a list) and its children's prefix."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, f"{key}."
    for arg in typing.get_args(annotation):
        found = nested_model(arg, key)
        if found is not None:
            model, _ = found
            prefix = {dict: f"{key}.<name>.", list: f"{key}[]."}.get(origin, f"{key}.")
            return model, prefix
    return None


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(dotted key, type, default, meaning, kohya) for every field, nested models flattened."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        annotation = info.annotation
        if extra.get("written_as") == "list":  # held keyed by name, written as a list of named entries
            annotation = list[typing.get_args(annotation)[1]]
        default = "`[]`" if extra.get("written_as") == "list" else default_text(info)
        rows.append((key, type_name(annotation), default, info.description or "", extra.get("kohya", "")))
        child = nested_model(annotation, key)
        if child is not None:
            rows += field_rows(*child)
    return rows


def table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| key | type | default | meaning | kohya |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") if i != 1 else cell for i, cell in enumerate(row)) + " |"
              for row in rows]
    return "\n".join(lines)


def option_reference() -> str:
    sections = [HEADER, "## Run options (`defaults:` and `configs/runs/*.yaml`)\n", table(field_rows(config.RunConfig)),
                "", SWEEP, "## Project file (`configs/config.yaml`)\n",
                table(field_rows(project_file.ProjectFile)), ""]
    return "\n".join(sections)
