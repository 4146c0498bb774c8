"""`lorabake init DIR`: a new project with the workflow, the demo configs and the demo dataset, so
that a plain `pip install lorabake` is enough to start (`cd DIR && snakemake -j1 all`)."""
from __future__ import annotations

import shutil
import site
import sys
import tempfile
from pathlib import Path

# What a project holds before its first build (results/ and logs/ are the build's).
TEMPLATE = ("Snakefile", "workflow", "configs", "datasets/demo")


def template_root() -> Path:
    """The source checkout when lorabake runs from one (an editable install), else the copy that the
    wheel installs under {prefix}/share/lorabake (pyproject's data-files; the user base for --user)."""
    installed = [Path(prefix) / "share" / "lorabake" for prefix in (sys.prefix, site.getuserbase())]  # pip --user
    for root in (Path(__file__).resolve().parents[2], *installed):
        if (root / "Snakefile").is_file() and (root / "workflow" / "rules").is_dir():
            return root
    raise FileNotFoundError(f"the lorabake workflow is not installed ({Path(sys.prefix) / 'share' / 'lorabake'} "
                            "is missing): reinstall lorabake with pip")


def init_project(dest: Path) -> list[Path]:
    """Copy the template into `dest` (created if needed); refuses to overwrite any of its parts.
    The parts are copied beside `dest` first and renamed into place, so a failed copy leaves nothing."""
    dest = Path(dest)
    taken = [str(dest / part) for part in TEMPLATE if (dest / part).exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: "
                              "`lorabake init` only starts new projects (pick an empty folder)")
    source = template_root()
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lorabake-init-", dir=dest))
    try:
        for part in TEMPLATE:
            src, out = source / part, staging / part
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, out)
        for part in TEMPLATE:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            (staging / part).rename(dest / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / part for part in TEMPLATE]
