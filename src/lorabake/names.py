"""Names a config gives (datasets, bases, runs, merges, extracts, resizes, svd_merges, comparisons,
sweep points) become file and folder names under `results/`. One check decides which names may:
letters, digits, '_', '-', '.', starting with a letter or digit — so no separator, no `..`, no
absolute path, no hidden file — and short enough for every filesystem once suffixes are added.
`config` refuses a bad name before anything is written; `paths` asks again, so no caller can build
an artifact path from an unchecked name.
"""
from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_LENGTH = 120  # filesystems allow 255 bytes; `-e0010.safetensors` and temp suffixes need room
RULE = ("may use letters, digits, '_', '-', '.' only, start with a letter or digit, and have at most "
        f"{MAX_LENGTH} characters (it becomes a file name under results/)")


class UnsafeName(ValueError):
    """A name that cannot become a file name under results/."""


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a name, or None when it can."""
    if not isinstance(name, str):
        return f"{name!r} is not text; a name {RULE}"
    if len(name) > MAX_LENGTH or not NAME_PATTERN.fullmatch(name):
        return f"{name!r} {RULE}"
    return None


def safe_name(name: str) -> str:
    """`name` itself, or UnsafeName saying why it cannot be one."""
    problem = name_problem(name)
    if problem is not None:
        raise UnsafeName(problem)
    return name
