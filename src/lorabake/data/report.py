"""The dataset report a trainer wants to read before baking anything.

What kohya would do with the folders (entries per epoch, buckets, steps per run) and what is likely
wrong with the captions (a missing activation tag, stray punctuation, duplicate or empty tags),
written as report.json for machines, report.md for people and buckets.png for a glance.
"""
from __future__ import annotations

import dataclasses
import string
from collections import Counter
from pathlib import Path

from lorabake import store
from lorabake.data.buckets import BucketSpec, place
from lorabake.data.dataset import Dataset, ImageItem, epoch_items, split_tags

TOP_TAGS = 30
# Parentheses are judged by balance instead: "smile (expression)" is a fine tag.
STRAY_EDGE_CHARS = set(string.punctuation) - set("()")


def build_report(dataset: Dataset, spec: BucketSpec, runs: dict[str, dict]) -> dict:
    """Everything in the report as a JSON-able dict. `spec` is the bucket spec the histogram uses;
    `runs` maps each run using the dataset to its settings and the step counts of its own training
    plan (`Workspace.report_runs`), so the report never redoes the arithmetic with another spec."""
    placements = {item.rel: place(item.width, item.height, spec).bucket for item in dataset.items}
    entries = epoch_items(dataset)
    return {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "bucket_spec": dataclasses.asdict(spec),
        "images": {"train": len(dataset.train_items), "reg": len(dataset.reg_items)},
        "folders": _folders(dataset),
        "epoch_entries": len(entries),
        "buckets": _bucket_histogram(placements.values()),
        "runs": runs,
        # a list of pairs, not a dict, because the JSON is written with sorted keys
        "tag_counts": _tag_counts(dataset.train_items),
        "missing_activation_tag": [
            item.rel for item in dataset.train_items if not _has_activation_tag(item)
        ],
        "suspicious_tags": [problem for item in dataset.items for problem in _suspicious(item)],
        "skipped_files": list(dataset.skipped),
        "other_captions": list(dataset.other_captions),
    }


def _folders(dataset: Dataset) -> list[dict]:
    folders = {}
    for item in dataset.items:
        folder = folders.setdefault(item.folder, {
            "folder": item.folder, "concept": item.concept, "repeats": item.repeats,
            "images": 0, "image_repeats": 0, "is_reg": item.is_reg, "captions_missing": 0})
        folder["images"] += 1
        folder["image_repeats"] += item.repeats
        folder["captions_missing"] += not item.has_caption_file
    return sorted(folders.values(), key=lambda folder: folder["folder"])


def _bucket_histogram(buckets) -> dict[str, int]:
    """Images per bucket, keyed "WxH"."""
    counts = Counter(f"{w}x{h}" for w, h in buckets)
    return {label: counts[label] for label in sorted(counts, key=_tallest_first)}


def _tallest_first(label: str) -> tuple[float, int, int]:
    # the JSON file sorts keys as text, so order is recomputed from the "WxH" label when rendering
    width, height = map(int, label.split("x"))
    return width / height, width, height


def _tag_counts(items: tuple[ImageItem, ...]) -> list[list]:
    """How many training captions carry each tag, most common first."""
    counts = Counter(tag for item in items for tag in set(split_tags(item.caption)))
    return [[tag, count] for tag, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _has_activation_tag(item: ImageItem) -> bool:
    # CLIP's tokenizer lowercases, so "LBK_Circle" teaches the same token as "lbk_circle"
    return " ".join(item.concept.split()).lower() in {tag.lower() for tag in split_tags(item.caption)}


def _suspicious(item: ImageItem) -> list[dict]:
    """Tags that are probably typos: stray edge punctuation, unbalanced parentheses, repeats."""
    tags = split_tags(item.caption)
    if not tags:
        return [{"rel": item.rel, "tag": "", "problem": "empty caption"}]
    problems = []
    for tag in tags:
        if tag[0] in STRAY_EDGE_CHARS or tag[-1] in STRAY_EDGE_CHARS:
            problems.append({"rel": item.rel, "tag": tag, "problem": "leading or trailing punctuation"})
        if not _balanced(tag):
            problems.append({"rel": item.rel, "tag": tag, "problem": "unbalanced parentheses"})
    counts = Counter(tag.lower() for tag in tags)
    problems += [{"rel": item.rel, "tag": tag, "problem": "duplicate tag"}
                 for tag, count in counts.items() if count > 1]
    return problems


def _balanced(tag: str) -> bool:
    depth = 0
    for char in tag:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


# --------------------------------------------------------------------------------------------
# rendering

def render_markdown(report: dict) -> str:
    spec = report["bucket_spec"]
    lines = [
        f"# Dataset report: {report['dataset']}",
        "",
        f"Root: `{report['root']}`  ",
        f"Images: {report['images']['train']} training, {report['images']['reg']} regularization  ",
        f"Entries per epoch (images x repeats, reg matched to training): {report['epoch_entries']}",
        "",
        "## Folders",
        "",
        *_table(["folder", "concept", "repeats", "images", "images x repeats", "reg", "no caption file"],
                [[f["folder"], f["concept"], f["repeats"], f["images"], f["image_repeats"],
                  "yes" if f["is_reg"] else "no", f["captions_missing"]] for f in report["folders"]]),
        "",
        "## Runs",
        "",
        *_table(["run", "batch size", "grad accum", "epochs", "max steps", "steps per epoch", "total steps"],
                [[name, r["batch_size"], r["grad_accum"], r["epochs"], r["max_steps"] or "-", r["steps_per_epoch"],
                  r["total_steps"]] for name, r in report["runs"].items()]),
        "",
        f"## Buckets (resolution {spec['resolution'][0]}x{spec['resolution'][1]})",
        "",
        *_table(["bucket", "images"], [[label, report["buckets"][label]]
                                       for label in sorted(report["buckets"], key=_tallest_first)]),
        "",
        "![buckets](buckets.png)",
        "",
        f"## Top {TOP_TAGS} tags (training captions)",
        "",
        *_table(["tag", "captions"], report["tag_counts"][:TOP_TAGS]),
        "",
        *_warnings(report),
    ]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list]) -> list[str]:
    if not rows:
        return ["(none)"]
    cells = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *[f"| {' | '.join(row)} |" for row in cells]]


def _warnings(report: dict) -> list[str]:
    missing = report["missing_activation_tag"]
    suspicious = report["suspicious_tags"]
    lines = ["## Warnings", "", f"### Missing activation tag ({len(missing)})", ""]
    lines += [f"- `{rel}`" for rel in missing] or ["(none)"]
    lines += ["", f"### Suspicious tags ({len(suspicious)})", ""]
    lines += [f"- `{s['rel']}`: {s['problem']} `{s['tag']}`" for s in suspicious] or ["(none)"]
    other = report.get("other_captions", [])
    lines += ["", f"### Caption files not read ({len(other)}: another extension than captions.extension)", ""]
    lines += [f"- `{rel}`" for rel in other] or ["(none)"]
    skipped = report.get("skipped_files", [])
    lines += ["", f"### Skipped OS files ({len(skipped)}: Thumbs.db, desktop.ini, .DS_Store, ._*, …)", ""]
    lines += [f"- `{rel}`" for rel in skipped] or ["(none)"]
    return lines


# --------------------------------------------------------------------------------------------
# writing

def write_report(dataset: Dataset, spec: BucketSpec, runs: dict[str, dict], out_json: Path) -> dict:
    """Write report.json, report.md and buckets.png side by side, and print a short summary."""
    from lorabake.render import plots  # imported here so the rest of the module works without matplotlib

    out_json = Path(out_json)
    report = build_report(dataset, spec, runs)
    # report.json goes last: once it exists, the files beside it are complete too
    plots.bar_chart(list(report["buckets"]), list(report["buckets"].values()),
                    out_json.with_name("buckets.png"), title=f"{dataset.name}: images per bucket",
                    xlabel="bucket (WxH)", ylabel="images")
    store.write_text(out_json.with_suffix(".md"), render_markdown(report))
    store.write_json(out_json, report)
    print(_summary(report, out_json))
    return report


def _summary(report: dict, out_json: Path) -> str:
    lines = [
        f"dataset {report['dataset']}: {report['images']['train']} training and "
        f"{report['images']['reg']} reg images, {report['epoch_entries']} entries per epoch, "
        f"{len(report['buckets'])} buckets",
        *[f"  run {name}: {r['steps_per_epoch']} steps/epoch, {r['total_steps']} steps in total"
          for name, r in report["runs"].items()],
        f"  warnings: {len(report['missing_activation_tag'])} missing activation tag, "
        f"{len(report['suspicious_tags'])} suspicious tags",
        f"  report: {out_json.with_suffix('.md')}",
    ]
    return "\n".join(lines)
