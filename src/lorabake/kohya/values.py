"""Converting values: a kohya entry (key, value, file) to what a lorabake key takes.

The converters raise KohyaImportError for a malformed value (naming file and key) and _NotCarried for
a well-formed one lorabake has no equivalent for.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class KohyaImportError(ValueError):
    """A kohya config that cannot be imported; the message names the file (and key) and what to do."""


class _NotCarried(Exception):
    """A well-formed kohya value lorabake has no equivalent for; the message is the reason."""


@dataclass(frozen=True)
class Entry:
    label: str  # the key as its file spells it: "optimizer", "network_args.conv_dim", "datasets[0].resolution"
    value: Any
    file: Path


def _fail(entry: Entry, expected: str) -> KohyaImportError:
    return KohyaImportError(f"{entry.file}: {entry.label}: expected {expected}, got {entry.value!r}")


def _unset(value: Any) -> bool:
    """Empty in kohya's sense: the GUI writes "" for a field left blank."""
    return value is None or (isinstance(value, str) and not value.strip())


def _off(value: Any) -> bool:
    return _unset(value) or value is False or value == 0 or value in ([], {}) or str(value).lower() == "none"


def _number(entry: Entry) -> float:
    value = entry.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(entry, "a number")


def _integer(entry: Entry) -> int:
    value = _number(entry)
    if not value.is_integer():
        raise _fail(entry, "a whole number")
    return int(value)


def _boolean(entry: Entry) -> bool:
    value = entry.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise _fail(entry, "true or false")


def _text(entry: Entry) -> str:
    if isinstance(entry.value, (dict, list)):
        raise _fail(entry, "a string")
    return str(entry.value).strip()


def _positive_or_none(entry: Entry) -> float | None:
    """kohya_ss passes 0 as "off" (None) for these."""
    return _number(entry) or None


def _count_or_none(entry: Entry) -> int | None:
    return _integer(entry) or None


def _one_of(*allowed: Any, convert: Callable[[Entry], Any] = _text) -> Callable[[Entry], Any]:
    def pick(entry: Entry) -> Any:
        value = convert(entry)
        if value not in allowed:
            raise _NotCarried(f"lorabake takes {', '.join(map(str, allowed))}")
        return value
    return pick


def _save_precision(entry: Entry) -> str:
    value = _text(entry).lower()
    value = {"float": "fp32", "float32": "fp32"}.get(value, value)  # kohya_ss calls fp32 "float"
    if value not in ("fp16", "bf16", "fp32"):
        raise _NotCarried("lorabake saves fp16, bf16 or fp32")
    return value


def _clip_skip(entry: Entry) -> int:
    return _integer(entry) or 1  # kohya_ss passes 0 as None: the last layer, lorabake's 1


def _resolution(entry: Entry) -> int | list[int]:
    """"512", "512,768" (width,height), 512 or [512, 768]; a square becomes one number."""
    value = entry.value
    parts = value if isinstance(value, list) else str(value).split(",")
    try:
        sides = [int(float(str(part).strip())) for part in parts]
    except ValueError:
        raise _fail(entry, '"width,height" or one number') from None
    if len(sides) not in (1, 2):
        raise _fail(entry, '"width,height" or one number')
    return sides[0] if len(set(sides)) == 1 else sides


def _numbers(entry: Entry) -> list[float]:
    """"2,2,4" (kohya_ss), or the list a network_args value "2,2,4" reads as."""
    items = entry.value if isinstance(entry.value, list) else str(entry.value).split(",")
    return [_number(Entry(entry.label, item, entry.file)) for item in items]


def _literal(text: str) -> Any:
    """A network_args / optimizer_args value: sd-scripts reads optimizer args with ast.literal_eval;
    networks read strings and convert them ("True", "4"), which this covers too."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False}.get(lowered, text)
    return list(value) if isinstance(value, tuple) else value


def _key_value_args(entry: Entry, prefix: str) -> list[Entry]:
    """`["k=v", …]` (TOML) or "k=v k=v" (GUI; kohya_ss drops quotes and splits on spaces) as entries."""
    value = entry.value
    items = value.replace('"', "").split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _fail(entry, 'a list of "key=value" strings')
    entries = []
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise _fail(entry, f'"key=value" items (this one is {item!r})')
        entries.append(Entry(f"{prefix}.{key.strip()}", _literal(text.strip()), entry.file))
    return entries
