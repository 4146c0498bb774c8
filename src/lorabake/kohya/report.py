"""Writing: the run config (YAML) and the migration report (Markdown)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lorabake import store
from lorabake.kohya.bookkeeping import KohyaImport
from lorabake.kohya.vocabulary import NOTHING_LOST


class _RunDumper(yaml.SafeDumper):
    """Mappings in block style, lists of values on one line (block_dims' 25 numbers)."""


_RunDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def run_yaml_text(result: KohyaImport, report_name: str) -> str:
    header = (f"# Imported from {', '.join(p.name for p in result.sources)} by `lorabake import-kohya`.\n"
              f"# What did not carry over, and the configs/config.yaml entries it needs: {report_name}\n")
    return header + yaml.dump(result.run, Dumper=_RunDumper, sort_keys=False, allow_unicode=True)


def write_import(result: KohyaImport, run_yaml: Path, report_md: Path) -> None:
    """Write the run config and the migration report, each atomically."""
    store.write_text(run_yaml, run_yaml_text(result, Path(report_md).name))
    store.write_text(report_md, render_report(result, Path(run_yaml)))


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ⏎ ") + "`" if text != "" else '`""`'


def _config_entries(result: KohyaImport) -> str:
    entries: dict[str, Any] = {"bases": result.bases, "datasets": result.datasets}
    if result.samples:
        entries["samples"] = result.samples
    return yaml.dump(entries, Dumper=_RunDumper, sort_keys=False, allow_unicode=True)


def _report_folders(result: KohyaImport) -> list[str]:
    lines = ["## Dataset folders", "", "lorabake reads kohya's layout: `datasets/<dataset>/<repeats>_<concept>/` with "
             "caption files beside the images, and regularization images in `reg/<repeats>_<class>/` inside the "
             "dataset. Copy or link each folder:", ""]
    if not result.folders:
        return lines + ["No image folders were found on this machine; see the notes.", ""]
    lines += ["| kohya folder | lorabake folder | repeats | concept | regularization |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {_cell(f.source)} | {_cell(f.target + '/')} | {f.repeats} | {_cell(f.concept)} | "
              f"{'yes' if f.is_reg else 'no'} |" for f in result.folders]
    return lines + [""]


def _unmapped_table(rows: list[tuple[str, Any, str]]) -> list[str]:
    return ["| kohya key | value | why |", "| --- | --- | --- |"] + [
        f"| {_cell(key)} | {_cell(value)} | {why.removeprefix(NOTHING_LOST)} |" for key, value, why in rows]


def render_report(result: KohyaImport, run_yaml: Path) -> str:
    """The migration report: what to add to config.yaml, folders to arrange, mapped and unmapped keys."""
    lost = [row for row in result.unmapped if not row[2].startswith(NOTHING_LOST)]
    idle = [row for row in result.unmapped if row[2].startswith(NOTHING_LOST)]
    lines = [f"# kohya import: {result.name}", "",
             f"Imported from {', '.join(f'`{p}`' for p in result.sources)} into `{run_yaml}` by "
             "`lorabake import-kohya`.", "",
             "## Before the first run", "",
             "1. Add the entries below to `configs/config.yaml` (keep your other entries).",
             "2. Arrange the dataset folders as listed.",
             f"3. Read the {len(lost)} settings below that did not carry over exactly, then run `lorabake validate`.",
             "   Settings the kohya config does not give come from lorabake's defaults and the `defaults:` of",
             "   `configs/config.yaml`.", "",
             "## Add to configs/config.yaml", "", "```yaml", _config_entries(result).rstrip(), "```", ""]
    lines += _report_folders(result)
    lines += ["## Carried over", "", "| kohya key | lorabake key | value |", "| --- | --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(target)} | {_cell(v)} |" for k, target, v in result.mapped]
    lines += ["", "## Not carried over, or only approximately", ""] + _unmapped_table(lost)
    if idle:
        lines += ["", f"<details><summary>{len(idle)} keys left out with nothing lost (off, empty, inactive or "
                      "bookkeeping)</summary>", ""] + _unmapped_table(idle) + ["", "</details>"]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
