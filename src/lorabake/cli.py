"""`lorabake <stage>`: one command per workflow stage; the Snakemake rules call these."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from lorabake import paths, store
from lorabake.config import SCORED_BUILTINS, ConfigError
from lorabake.data.dataset import DatasetError, image_files, split_tags
from lorabake.train.plan import validation_entries
from lorabake.workspace import Workspace


def cmd_validate(ws: Workspace, args) -> None:
    """Check the config and every dataset, and print what `all` would build."""
    for ds in ws.project.file.datasets:
        ws.dataset(ds)
    for run in ws.project.runs:
        plan = ws.plan(run)
        held_out = len(validation_entries(ws.run(run), ws.run_datasets(run)))
        validation = f", {held_out} images held out for validation" if ws.run(run).validation else ""
        print(f"run {run}: datasets {ws.run(run).datasets}, {plan.steps_per_epoch} steps/epoch × "
              f"{plan.epochs} epochs = {plan.total_steps} steps{validation}")
    ws.check_comparisons()
    ws.check_emas()
    print(f"ok: {len(ws.project.file.datasets)} datasets, {len(ws.project.runs)} runs")


def cmd_base(ws: Workspace, args) -> None:
    """Build a tiny base, or import a checkpoint (single file → diffusers layout; folder → linked)."""
    from lorabake.models import base_files, bases

    spec, out = ws.project.file.bases[args.base], ws.project.root / paths.base_dir(args.base)
    if spec.builtin is not None:
        print(f"base {args.base}: built {spec.builtin}, id {bases.build_base(spec.builtin, out)}")
        return
    try:
        info = base_files.import_base(ws.project.base_path(args.base), out, allow_pickle=spec.allow_pickle,
                                      prediction=spec.prediction, id_cache=ws.project.root / paths.base_id_cache())
    except base_files.BaseFileError as error:
        raise ConfigError(f"{ws.project.config_file}: bases.{args.base}: {error}") from None
    print(f"base {args.base}: {info['architecture']} ({info['prediction']}) from {spec.path}, id {info['id']}"
          f" — {info['source']['detected']}")


def cmd_dataset_report(ws: Workspace, args) -> None:
    from lorabake.data import report

    report.write_report(ws.dataset(args.dataset), ws.report_spec(args.dataset), ws.report_runs(args.dataset),
                        ws.project.root / paths.dataset_report(args.dataset))


def cmd_cache_latents(ws: Workspace, args) -> None:
    from lorabake.data import latents
    from lorabake.models import bases

    job = ws.latent_jobs.get((args.dataset, args.spec))
    if job is None:
        raise ConfigError(f"no run uses dataset {args.dataset!r} with latent spec {args.spec!r}")
    base_dir = ws.project.root / paths.base_dir(job.base)
    vae = bases.load_base(base_dir, parts=("vae",)).vae
    vae_id = bases.base_id(base_dir)
    root = ws.project.dataset_root(args.dataset)
    images = [(p, p.relative_to(root).as_posix()) for p in image_files(root)]
    latent_store = ws.project.root / paths.latent_store(vae_id, job.spec)
    latents.cache_latents(images, job.spec, job.flip, vae, vae_id, latent_store,
                          ws.project.root / paths.latent_index(args.dataset, args.spec),
                          meta={"dataset": args.dataset, "spec": args.spec},
                          folder_flips=ws.folder_flips(args.dataset), mask=job.mask)


def free_port() -> int:
    import socket

    with socket.socket() as probe:  # a free rendezvous port, so parallel jobs do not collide
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One data-parallel process: torch.distributed's environment, then the ordinary train command.
    accelerate reads it and joins the group (NCCL on GPUs, gloo on the CPU)."""
    import os

    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if main(argv) != 0:
        raise SystemExit(f"training process {rank} failed")


def launch_processes(processes: int, argv: list[str]) -> None:
    """Run `lorabake <argv>` as `processes` data-parallel processes and wait for all of them."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_train_worker, args=(processes, free_port(), argv), nprocs=processes, join=True)
    except mp.ProcessRaisedException as error:
        raise TrainingFailed(f"a training process failed: {error}") from None
    except mp.ProcessExitedException as error:
        raise TrainingFailed(f"a training process exited: {error}") from None


def cmd_train(ws: Workspace, args) -> None:
    import os

    from lorabake.data import latents
    from lorabake.train.loop import Diverged, RunInputs, train

    run, root = ws.run(args.run), ws.project.root
    if run.processes > 1 and "WORLD_SIZE" not in os.environ:
        print(f"train {args.run}: launching {run.processes} data-parallel processes", flush=True)
        launch_processes(run.processes, ["--config", args.config, "train", "--run", args.run])
        return
    datasets = ws.run_datasets(args.run)
    params = ws.train_params(args.run)
    store.write_json(root / paths.run_config(args.run), {"run": args.run, "config": run.model_dump(mode="json"),
                                                          "params": params})
    facts = {"ss_tag_frequency": tag_frequency(datasets), "ss_num_train_images": str(sum(len(d.train_items) for d in datasets.values())),
             "ss_num_reg_images": str(sum(len(d.reg_items) for d in datasets.values())),
             "lorabake_config_digest": params["config"], "lorabake_caption_digests": params["captions"]}
    indexes = {ds: latents.read_index(root / p) for ds, p in ws.latent_indexes(args.run).items()}
    for ds, index in indexes.items():  # this project's store, also when the index was written before a move
        index["store"] = str(root / paths.latent_store(index["vae_id"], ws.latent_job(args.run, ds).spec))
    for folder in (paths.epochs_dir(args.run), paths.steps_dir(args.run)):
        (root / folder).mkdir(parents=True, exist_ok=True)
    try:
        train(RunInputs(args.run, run, root / paths.base_dir(run.base), datasets, indexes, facts,
                        root=ws.project.root, digest=store.digest(params)))
    except Diverged as error:
        raise TrainingFailed(str(error)) from None


# ss_tag_frequency is for people and viewers, which show a folder's top few dozen tags: the most common
# 1000 tags per folder, each cut to 100 characters, keep the metadata well under a MB per folder.
METADATA_TAGS, METADATA_TAG_CHARS = 1000, 100


def tag_frequency(datasets: dict) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: tag counts per image folder (`5_lbk_circle`), each image once; the
    METADATA_TAGS most common tags of each folder, cut to METADATA_TAG_CHARS."""
    folders: dict[str, Counter] = {}
    for dataset in datasets.values():
        for item in dataset.train_items:
            tags = (tag[:METADATA_TAG_CHARS] for tag in split_tags(item.caption))
            folders.setdefault(item.rel.rsplit("/", 1)[0], Counter()).update(tags)
    return {folder: dict(counts.most_common(METADATA_TAGS)) for folder, counts in sorted(folders.items())}


class TrainingFailed(RuntimeError):
    pass


def cmd_sample(ws: Workspace, args) -> None:
    from lorabake.render.sample import sample_grid
    from lorabake.train.plan import kept_epochs

    run, samples, root = ws.run(args.run), ws.project.file.samples, ws.project.root
    if samples is None:
        raise ConfigError(f"{ws.project.config_file}: samples: not configured, nothing to render")
    epochs = kept_epochs(run, ws.plan(args.run))
    checkpoints = [(f"epoch {e}", root / paths.epoch_lora(args.run, e)) for e in epochs]
    embeddings = (run.pivotal, root / paths.embeddings(args.run, run.pivotal.token)) if run.pivotal else None
    scored = ws.project.file.bases[run.base].builtin in SCORED_BUILTINS
    sample_grid(root / paths.base_dir(run.base), checkpoints, samples, run.size, root / paths.sample_grid(args.run),
                root / paths.sample_dir(args.run), title=f"{args.run}: epochs x strengths",
                clip_skip=run.training.clip_skip, embeddings=embeddings, scores=root / paths.sample_scores(args.run),
                scorer_concept=samples.concept if scored else None, epochs=list(epochs), cache_root=root)


def cmd_compare(ws: Workspace, args) -> None:
    from lorabake.render.compare import build_comparison, page_files

    if args.name not in ws.project.file.comparisons:
        raise ConfigError(f"{ws.project.config_file}: comparisons: no comparison named {args.name!r} "
                          f"({sorted(ws.project.file.comparisons)})")
    plan = build_comparison(ws, args.name)
    print(f"comparison {args.name}: {len(plan.cells)} cells in {', '.join(page_files(plan))}, "
          f"{paths.comparison_dir(args.name)}/index.html")


def cmd_merge(ws: Workspace, args) -> None:
    from lorabake.tools.merge import MergeInput, merge

    spec = ws.project.file.merges[args.name]
    root = ws.project.root
    loras = [MergeInput(root / paths.run_lora(lora.run), lora.ratio, lora.block_weights) for lora in spec.loras]
    merge(root / paths.base_dir(spec.base), loras, root / paths.merged(spec.name), spec.precision)


def cmd_merge_diffusers(ws: Workspace, args) -> None:
    """The merged single file as a diffusers folder, converted by the same importer as user bases."""
    from lorabake.models import base_files

    spec = ws.project.file.merges[args.name]
    root = ws.project.root
    info = base_files.import_single_file(root / paths.merged(spec.name), root / paths.merged_diffusers(spec.name),
                                         id_cache=root / paths.base_id_cache())
    print(f"merge {spec.name}: diffusers folder {paths.merged_diffusers(spec.name)} ({info['architecture']})")


def cmd_extract(ws: Workspace, args) -> None:
    from lorabake.models import bases
    from lorabake.tools import merge
    from lorabake.tools.extract import extract

    spec = ws.project.file.extracts[args.name]
    root = ws.project.root
    base_dir = root / paths.base_dir(spec.base)
    base = bases.load_base(base_dir)
    if spec.tuned in ws.project.file.bases:  # a checkpoint the user has, imported like any base
        tuned = bases.load_base(root / paths.base_dir(spec.tuned))
        source = f"base {spec.tuned}"
    else:
        tuned = merge.load_merged(base_dir, root / paths.merged(spec.tuned))
        source = f"merge {spec.tuned}"
    if tuned.arch != base.arch:
        raise ConfigError(f"{ws.project.config_file}: extracts: {spec.name}: tuned model is {tuned.arch}, base is {base.arch}")
    extract(base, bases.base_info(base_dir), tuned, root / paths.extracted(spec.name), dim=spec.dim,
            conv_dim=spec.conv_dim, clamp_quantile=spec.clamp_quantile, min_diff=spec.min_diff,
            precision=spec.precision, source=source)


def cmd_resize(ws: Workspace, args) -> None:
    from lorabake.models import lora_format
    from lorabake.tools import lora_tools

    spec = ws.project.file.resizes[args.name]
    root = ws.project.root
    state, metadata = lora_tools.load_lora(root / paths.run_lora(spec.run))
    resized, report = lora_tools.resize_lora(state, spec.rank, conv_rank=spec.conv_rank, dynamic=spec.dynamic,
                                             dynamic_param=spec.dynamic_param)
    lora_format.save_lora(resized, root / paths.resized(spec.name), spec.precision,
                          lora_tools.resized_metadata(metadata, report))
    store.write_json(root / paths.resize_report(spec.name), report.as_dict())
    print(f"resize {spec.name}: {report.summary()}")


def cmd_svd_merge(ws: Workspace, args) -> None:
    from lorabake.models import lora_format
    from lorabake.tools import lora_tools

    spec = ws.project.file.svd_merges[args.name]
    root = ws.project.root
    loaded = [lora_tools.load_lora(root / paths.run_lora(lora.run)) for lora in spec.loras]
    merged = lora_tools.svd_merge([(state, lora.ratio) for (state, _), lora in zip(loaded, spec.loras)],
                                  spec.rank, spec.conv_rank, spec.clamp_quantile)
    metadata = lora_tools.svd_merged_metadata(spec.name, [(lora.run, lora.ratio) for lora in spec.loras],
                                              loaded[0][1], spec.rank, spec.conv_rank)
    lora_format.save_lora(merged, root / paths.svd_merged(spec.name), spec.precision, metadata)
    print(f"svd-merge {spec.name}: {len(lora_tools.module_names(merged))} modules at rank {spec.rank}")


def cmd_ema(ws: Workspace, args) -> None:
    """A post-hoc EMA of a run's saved epoch files (lora_tools.posthoc_ema)."""
    from lorabake.models import lora_format
    from lorabake.tools import lora_tools

    spec, root = ws.project.file.emas[args.name], ws.project.root
    epochs = ws.ema_epochs(args.name)
    files = [paths.epoch_lora(spec.run, epoch) for epoch in epochs]
    missing = [file for file in files if not (root / file).is_file()]
    if missing:
        raise ConfigError(f"{ws.project.config_file}: emas.{spec.name}: run {spec.run}'s epoch files {missing} "
                          f"are missing (removed after it trained?); train it again: "
                          f"snakemake -j1 -f {paths.run_lora(spec.run)}")
    loaded = [lora_tools.load_lora(root / file) for file in files]
    try:
        averaged = lora_tools.posthoc_ema([state for state, _ in loaded], spec.decay, files)
    except ValueError as e:
        raise SystemExit(f"lorabake: error: emas.{spec.name}: {e}") from None
    metadata = lora_tools.posthoc_ema_metadata(spec.name, spec.run, epochs, spec.decay, loaded[0][1], loaded[-1][1])
    lora_format.save_lora(averaged, root / paths.posthoc_ema(spec.name), spec.precision, metadata)
    weights = ", ".join(f"e{epoch}: {weight:.3g}" for epoch, weight in
                        zip(epochs, lora_tools.ema_weights(len(epochs), spec.decay)))
    print(f"ema {spec.name}: {len(files)} epoch files of {spec.run}, decay {spec.decay:g}, weights {weights}")


def cmd_resume(ws: Workspace, args) -> None:
    """Continue a killed Snakemake run: `snakemake ARGS --rerun-incomplete`, after clearing the lock
    the killed run left in the project root, which is done only when no Snakemake or lorabake process
    still works there (after a `kill -9` of Snakemake, its running jobs live on)."""
    import subprocess

    snakemake, root = [sys.executable, "-m", "snakemake"], ws.project.root.resolve()
    if any((root / ".snakemake" / "locks").glob("*.lock")):
        busy = project_processes(root)
        if busy:
            listed = "".join(f"\n  pid {pid}: {command}" for pid, command in busy)
            raise SystemExit(f"lorabake: error: {root} stays locked: these processes still work in it:{listed}\n"
                             "let them finish or stop them (kill PID), then run `lorabake resume` again")
        print(f"resume: no Snakemake or lorabake process works in {root}: the lock is stale, unlocking", flush=True)
        if subprocess.run([*snakemake, "--unlock", *args.snakemake_args]).returncode:
            raise SystemExit("lorabake: error: `snakemake --unlock` failed (see above)")
    rerun = [*snakemake, *args.snakemake_args]
    if "--rerun-incomplete" not in rerun:
        rerun.append("--rerun-incomplete")
    if returncode := subprocess.run(rerun).returncode:
        raise SystemExit(returncode)


def project_processes(root: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live Snakemake or lorabake process working in `root` (this one and
    its parents aside), read from Linux's /proc; zombies and other users' processes are not seen."""
    import os
    import re

    if not Path("/proc/self/cwd").exists():
        raise SystemExit("lorabake: error: cannot tell whether Snakemake still runs here (no /proc); if it "
                         "does not, run `snakemake --unlock`, then `lorabake resume` again")
    workflow_command = re.compile(r"(?:^|[\s/])(?:snakemake|lorabake)(?:\s|$)")
    here, mine, found = os.stat(root), _ancestors(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cwd = os.stat(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, a zombie, or another user's
            continue
        if (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino) and any(map(workflow_command.search, argv)):
            found.append((int(entry.name), " ".join(argv).strip()))
    return sorted(found)


def _ancestors() -> set[int]:
    import os

    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:  # /proc/PID/stat: "PID (command) STATE PPID …"
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def add_resume(sub) -> None:
    # Every argument goes to Snakemake (-j1, --profile, targets…): "+" is this parser's option prefix.
    resume = sub.add_parser("resume", prefix_chars="+", add_help=False,
                            help="continue a killed snakemake run: unlock if no job of it lives on, then "
                                 "snakemake ARGS --rerun-incomplete")
    resume.add_argument("snakemake_args", nargs="*", help="the killed run's snakemake arguments")
    resume.set_defaults(func=cmd_resume)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lorabake", description="A Makefile for LoRA artifacts: the stages Snakemake runs.")
    top.add_argument("--config", default="configs/config.yaml", help="project config (default: %(default)s)")
    sub = top.add_subparsers(dest="command", required=True, metavar="<stage>")

    def add(name: str, func, help: str, *options: str):
        p = sub.add_parser(name, help=help, description=help)
        for option in options:
            p.add_argument(f"--{option}", required=True)
        p.set_defaults(func=func)
        return p

    add("validate", cmd_validate, "check config and datasets; print each run's step count")
    add("base", cmd_base, "build a base model into results/base/{base}/", "base")
    dataset = sub.add_parser("dataset", help="dataset tools (report)")
    dataset_sub = dataset.add_subparsers(dest="action", required=True)
    report = dataset_sub.add_parser("report", help="write results/datasets/{ds}/report.json, .md and buckets.png")
    report.add_argument("--dataset", required=True)
    report.set_defaults(func=cmd_dataset_report)
    add("cache-latents", cmd_cache_latents, "encode a dataset's missing latents and write its index", "dataset", "spec")
    add("train", cmd_train, "train one run: LoRA per saved epoch, train.jsonl, loss.png", "run")
    add("sample", cmd_sample, "render a run's sample grid (epochs × strengths × prompts)", "run")
    add("compare", cmd_compare, "render a comparison's grid, cells.json and index.html (only cells not cached)", "name")
    add("merge", cmd_merge, "merge LoRAs into a base: a single-file checkpoint in the original SD layout", "name")
    add("merge-diffusers", cmd_merge_diffusers, "write a merge's checkpoint as a diffusers folder too", "name")
    add("extract", cmd_extract, "extract a LoRA from (merged − base) by SVD", "name")
    add("resize", cmd_resize, "resize a run's LoRA to a lower (or dynamic) rank by SVD", "name")
    add("svd-merge", cmd_svd_merge, "merge several runs' LoRAs into one LoRA by SVD", "name")
    add("ema", cmd_ema, "average a run's saved epoch files into one LoRA (a post-hoc EMA)", "name")
    add_resume(sub)
    kohya = sub.add_parser("import-kohya", help="turn a kohya training config (+ dataset TOML) into a run config",
                           description="Turn a kohya_ss GUI config (JSON/TOML) or an sd-scripts --config_file, "
                                       "plus its dataset TOML, into a lorabake run config and a report of what "
                                       "could not be mapped.")
    kohya.add_argument("--from", dest="source", required=True, help="the kohya config (.json or .toml)")
    kohya.add_argument("--dataset-config", help="sd-scripts --dataset_config TOML")
    kohya.add_argument("--out", required=True, help="the run config to write, e.g. configs/runs/NAME.yaml")
    kohya.add_argument("--report", help="the report to write (default: beside --out, NAME.import.md)")
    kohya.set_defaults(func=None)
    init = sub.add_parser("init", help="start a project: Snakefile, workflow/, the demo configs/ and datasets/demo",
                          description="Start a project in DIR: the workflow (Snakefile, workflow/), the demo's "
                                      "configs/ and datasets/demo, ready for `cd DIR && snakemake -j1 all`.")
    init.add_argument("dir", nargs="?", default=".", help="the project folder (default: the current one)")
    init.set_defaults(func=None)
    docs = sub.add_parser("docs", help="write the option reference generated from the config models")
    docs.add_argument("--out", default="docs/options.md")
    docs.set_defaults(func=None)
    return top


def write_docs(out: str) -> None:
    from lorabake.docs import option_reference

    store.write_text(out, option_reference())
    print(f"wrote {out}")


def import_kohya(args) -> int:
    from lorabake.kohya import NOTHING_LOST, KohyaImportError, import_kohya as read_kohya, write_import

    out = Path(args.out)
    report = Path(args.report) if args.report else out.with_name(out.name.removesuffix(".yaml") + ".import.md")
    try:
        result = read_kohya(Path(args.source), Path(args.dataset_config) if args.dataset_config else None,
                            name=out.name.removesuffix(".yaml"))
    except (KohyaImportError, FileNotFoundError) as e:
        print(f"lorabake: error: {e}", file=sys.stderr)
        return 2
    write_import(result, out, report)
    lost = [entry for entry in result.unmapped if not entry[2].startswith(NOTHING_LOST)]
    print(f"wrote {out} and {report}: {len(result.mapped)} settings mapped, {len(lost)} not or only "
          f"approximately (see the report); add the suggested bases/datasets entries to configs/config.yaml")
    return 0


def init(folder: str) -> int:
    from lorabake.scaffold import init_project

    try:
        init_project(Path(folder))
    except (FileExistsError, FileNotFoundError) as e:
        print(f"lorabake: error: {e}", file=sys.stderr)
        return 2
    print(f"started a project in {folder}: Snakefile, workflow/, configs/, datasets/demo/\n"
          f"build the demo with: cd {folder} && snakemake -j1 all   (then add your datasets and runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "docs":  # needs no project
        write_docs(args.out)
        return 0
    if args.command == "import-kohya":
        return import_kohya(args)
    if args.command == "init":
        return init(args.dir)
    try:
        ws = Workspace.load(args.config)
        for warning in ws.project.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        args.func(ws, args)
    except (ConfigError, DatasetError, TrainingFailed, store.DiskFull, store.NonFiniteWeights) as e:
        print(f"lorabake: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
