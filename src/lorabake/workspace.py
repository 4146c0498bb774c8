"""A project resolved for the workflow: scanned datasets, latent specs, training plans, params.

The Snakefile's input functions and the `lorabake` commands both go through this, so what a rule
declares and what its job does cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lorabake import paths, store
from lorabake.checks import check_project
from lorabake.config import ConfigError, Loss, RunConfig
from lorabake.config_fields import MAX_STEPS, STEPS_WHY
from lorabake.data.buckets import BucketSpec
from lorabake.data.dataset import Dataset, caption_digest, scan_dataset, with_folder_settings
from lorabake.data.scan_cache import image_sha256
from lorabake.project import Project, load_project
from lorabake.train.plan import TrainingPlan, kept_epochs, plan_training, saved_epochs

TRAINER_VERSION = 2  # bump when training semantics change: every run retrains


@dataclass(frozen=True)
class LatentJob:
    dataset: str
    base: str
    spec: BucketSpec
    flip: bool
    mask: str | None = None  # loss masks cached too: "alpha", or the mask folder's name

    @property
    def name(self) -> str:
        return paths.latent_spec(self.base, self.spec, self.flip, self.mask)


class Workspace:
    def __init__(self, project: Project):
        self.project = project
        self._datasets: dict[str, Dataset] = {}
        self._plans: dict[str, TrainingPlan] = {}
        self._image_digests: dict[str, str] = {}

    @classmethod
    def load(cls, config_file: str | Path = "configs/config.yaml") -> "Workspace":
        """The project, its cross-references and the files it names checked (lorabake.checks)."""
        return cls(check_project(load_project(config_file)))

    # ------------------------------------------------------------ datasets
    def dataset(self, name: str, caption_extension: str = ".txt") -> Dataset:
        key = f"{name}{caption_extension}"
        if key not in self._datasets:
            scanned = scan_dataset(self.project.dataset_root(name), name, caption_extension,
                                   cache_file=self.project.root / paths.scan_cache(name),
                                   mask_folders=self.mask_folder_names, mask_folder=self.mask_folder(name))
            self._datasets[key] = with_folder_settings(scanned, self.project.file.datasets[name].folders,
                                                       f"{self.project.config_file}: datasets.{name}")
        return self._datasets[key]

    @cached_property
    def mask_folder_names(self) -> frozenset[str]:
        """Subfolders of image folders that hold masks, in every dataset: the default and each run's."""
        return frozenset({Loss().mask_folder} |
                         {cfg.loss.mask_folder for cfg in self.project.runs.values()})

    def mask_folder(self, dataset: str) -> str | None:
        """The folder the dataset's masks are read from, when a run reads them (loss.mask_source folder).
        One per dataset: its images are then scanned with their masks for every run (an unmasked run
        ignores them), so the scan cache keeps the masks' facts from one parse to the next."""
        users = {run: cfg.loss.mask_folder_used for run, cfg in self.project.runs.items()
                 if dataset in cfg.datasets and cfg.loss.mask_folder_used}
        folders = sorted(set(users.values()))
        if len(folders) > 1:
            raise ConfigError(f"dataset {dataset}: its runs read masks from different folders ("
                              + ", ".join(f"{run}: loss.mask_folder {folder}" for run, folder in sorted(users.items()))
                              + "); use one mask folder per dataset")
        return folders[0] if folders else None

    def run_datasets(self, run: str) -> dict[str, Dataset]:
        cfg = self.project.runs[run]
        return {ds: self.dataset(ds, cfg.captions.extension) for ds in cfg.datasets}

    # ------------------------------------------------------------ bases
    def base_params(self, name: str) -> dict:
        """The base spec, and for a path base the size and mtime of its files: replacing the checkpoint
        rebuilds the base (whose id, a content hash, is cached by the same stat)."""
        spec = self.project.file.bases[name].model_dump(mode="json")
        path = self.project.base_path(name)
        if path is None or not path.exists():
            return spec
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [(p.relative_to(path).as_posix() if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
                 for p in files]
        return {**spec, "files": store.digest(stats)}

    # ------------------------------------------------------------ latents
    def latent_job(self, run: str, dataset: str) -> LatentJob:
        cfg = self.project.runs[run]
        mask = None if not cfg.loss.masked else cfg.loss.mask_folder_used or "alpha"
        return LatentJob(dataset, cfg.base, cfg.bucket_spec(), cfg.augment.flip, mask)

    def folder_flips(self, dataset: str) -> dict[str, bool]:
        """The dataset's folders with their own flip (datasets.<ds>.folders.<folder>.flip), by folder."""
        folders = self.project.file.datasets[dataset].folders
        return {folder: own.flip for folder, own in sorted(folders.items()) if own.flip is not None}

    def latent_params(self, dataset: str, spec: str) -> str | dict:
        """What decides a latent index besides the base: the images (a digest), and, where set, the
        folders' own flips and the masks' contents. Without those it is the image digest alone, as
        before either existed, so no existing cache reruns."""
        job = self.latent_jobs.get((dataset, spec))
        flips = self.folder_flips(dataset)
        if job is None or (not flips and job.mask is None):
            return self.image_digest(dataset)
        return {"images": self.image_digest(dataset), "folder_flips": flips,
                "masks": self.mask_digest(dataset) if job.mask not in (None, "alpha") else job.mask}

    def mask_digest(self, dataset: str) -> str:
        """Digest of the mask files' contents (mask_source folder): an edited mask reruns what reads it."""
        return store.digest([(item.rel, image_sha256(item.mask) if item.mask else None)
                             for item in self.dataset(dataset).items])

    @cached_property
    def latent_jobs(self) -> dict[tuple[str, str], LatentJob]:
        """The (dataset, spec) caches the runs need; runs that read pixels (color/crop) need none."""
        jobs = {}
        for run, cfg in self.project.runs.items():
            if not cfg.caches_latents:
                continue
            for ds in cfg.datasets:
                job = self.latent_job(run, ds)
                jobs[(ds, job.name)] = job
        return jobs

    def latent_indexes(self, run: str) -> dict[str, str]:
        if not self.run(run).caches_latents:
            return {}
        return {ds: paths.latent_index(ds, self.latent_job(run, ds).name) for ds in self.project.runs[run].datasets}

    def image_digest(self, dataset: str) -> str:
        """Digest of a dataset's image contents (sha256 per image, from the scan cache): jobs that read
        images take it as a param instead of 20,000 input files, so an added, removed or changed image
        reruns them and a `touch` does not."""
        if dataset not in self._image_digests:
            items = self.dataset(dataset).items
            self._image_digests[dataset] = store.digest([(item.rel, image_sha256(item.path)) for item in items])
        return self._image_digests[dataset]

    # ------------------------------------------------------------ training
    def run(self, name: str) -> RunConfig:
        return self.project.runs[name]

    def plan(self, run: str) -> TrainingPlan:
        """The run's steps and epochs; a plan past MAX_STEPS (known only once the datasets are
        scanned) is a ConfigError, as an absurd max_steps is."""
        if run not in self._plans:
            plan = plan_training(self.run(run), self.run_datasets(run))
            if plan.total_steps > MAX_STEPS:
                raise ConfigError(
                    f"{self.project.run_files[run]}: training.epochs: run {run} plans {plan.epochs:,} epochs × "
                    f"{plan.steps_per_epoch:,} steps = {plan.total_steps:,} steps, more than {MAX_STEPS:,}, the most "
                    f"lorabake accepts: {STEPS_WHY}; lower training.epochs or set training.max_steps")
            self._plans[run] = plan
        return self._plans[run]

    def epoch_files(self, run: str) -> list[str]:
        return [paths.epoch_lora(run, e) for e in kept_epochs(self.run(run), self.plan(run))]

    # ------------------------------------------------------------ post-hoc EMAs
    def ema_epochs(self, name: str) -> list[int]:
        """The epochs an `emas` entry averages: its `epochs`, or every epoch file its run keeps. A
        ConfigError naming the key and what to set when the run keeps fewer than two, or not those."""
        entry, where = self.project.file.emas[name], self.project.config_file
        run = self.run(entry.run)
        kept, run_file = kept_epochs(run, self.plan(entry.run)), self.project.run_files[entry.run]
        every, keep_last = run.save.every_n_epochs, run.save.keep_last
        settings = f"save.every_n_epochs: {every or 'null'}, save.keep_last: {keep_last or 'null'}"
        if entry.epochs is None and len(kept) < 2:
            pruned = keep_last and len(saved_epochs(run, self.plan(entry.run))) > 1
            fix = "save.keep_last to 2 or more (or remove it)" if pruned else "save.every_n_epochs (e.g. 1)"
            raise ConfigError(f"{where}: emas.{name}.run: run {entry.run} keeps only the epoch file of epoch "
                              f"{kept[0]} ({settings}); a post-hoc EMA averages two or more: set {fix} in {run_file}")
        unknown = [epoch for epoch in entry.epochs or [] if epoch not in kept]
        if unknown:
            raise ConfigError(f"{where}: emas.{name}.epochs: run {entry.run} keeps no epoch file for epoch(s) "
                              f"{unknown}; it keeps {kept} ({settings}): pick epochs from those, or set "
                              f"save.every_n_epochs and save.keep_last in {run_file} so that they are saved")
        return list(entry.epochs or kept)

    def check_emas(self) -> None:
        """Every `emas` entry's epoch files will be there (ema_epochs): a ConfigError otherwise."""
        for name in self.project.file.emas:
            self.ema_epochs(name)

    def caption_digests(self, run: str) -> dict[str, str]:
        return {ds: caption_digest(d) for ds, d in self.run_datasets(run).items()}

    def train_params(self, run: str) -> dict:
        """Everything besides input files that decides a run's bytes: rebuild when it changes."""
        resolved = self.run(run).identity()
        cfg = self.run(run)
        folders = {ds: self.folder_params(ds) for ds in cfg.datasets}
        params = {"config": store.digest(resolved), "captions": self.caption_digests(run), "folders": folders,
                  "images": {} if cfg.caches_latents else {ds: self.image_digest(ds) for ds in cfg.datasets},
                  "trainer_version": TRAINER_VERSION * 1000 + self.project.file.trainer_version}
        if cfg.loss.mask_folder_used:  # like captions: an edited mask retrains (alpha masks are the images')
            params["masks"] = {ds: self.mask_digest(ds) for ds in cfg.datasets}
        return params

    def folder_params(self, dataset: str) -> dict:
        """The dataset's folder settings as the train digest takes them; a folder's flip only when set,
        so runs from before the key existed keep their digest."""
        folders = self.project.file.datasets[dataset].model_dump(mode="json")["folders"]
        return {folder: {key: value for key, value in own.items() if key != "flip" or value is not None}
                for folder, own in folders.items()}

    # ------------------------------------------------------------ comparisons
    def comparison_inputs(self, name: str) -> dict[str, list[str]]:
        comparison = self.project.file.comparisons[name]
        runs = self.project.comparison_runs(name)
        bases = comparison.bases or sorted({self.run(run).base for run in runs})
        loras = [paths.run_lora(run) for run in runs]
        if comparison.epochs != "last":
            loras += [paths.epochs_dir(run) for run in runs]
        return {"loras": loras, "bases": [paths.base_json(base) for base in bases]}

    def check_comparisons(self) -> None:
        """Each comparison's axes resolve (its epochs are kept by some run): a ConfigError otherwise."""
        from lorabake.render.compare import comparison_axes

        for comparison in self.project.file.comparisons.values():
            comparison_axes(self, comparison)

    def comparison_params(self, name: str) -> dict:
        """What decides the comparison's cells besides the input files: its entry, the samples it takes
        defaults from, and the compared runs' settings (shown on its page)."""
        samples = self.project.file.samples
        runs = self.project.comparison_runs(name)
        return {"comparison": self.project.file.comparisons[name].model_dump(mode="json"),
                "samples": samples.model_dump(mode="json") if samples else None,
                "runs": {run: store.digest(self.run(run).identity()) for run in runs}}

    def report_runs(self, dataset: str) -> dict[str, dict]:
        """Each run using the dataset: its settings and the steps its own training plan counts (over
        all of the run's datasets, with the run's own bucket spec)."""
        runs = {}
        for run in self.project.runs_using(dataset):
            cfg, plan = self.run(run), self.plan(run)
            runs[run] = {"batch_size": cfg.global_batch, "grad_accum": cfg.training.grad_accum,
                         "epochs": cfg.training.epochs, "max_steps": cfg.training.max_steps,
                         "buckets": str(cfg.bucket_spec()), "datasets": list(cfg.datasets),
                         "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps}
        return runs

    def report_params(self, dataset: str) -> dict:
        runs = {run: {"spec": str(self.run(run).bucket_spec()), "plan": str(self.plan(run))}
                for run in self.project.runs_using(dataset)}
        return {"captions": caption_digest(self.dataset(dataset)), "runs": store.digest(runs)}

    def report_spec(self, dataset: str) -> BucketSpec:
        """The bucket spec the report histograms: the first run's using it, else the defaults'."""
        users = self.project.runs_using(dataset)
        if users:
            return self.run(users[0]).bucket_spec()
        return RunConfig.model_validate({**self.project.file.defaults, "datasets": [dataset]}).bucket_spec()
