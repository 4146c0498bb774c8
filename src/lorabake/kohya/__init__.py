"""`lorabake import-kohya`: a kohya training config in, a lorabake run config and a migration report out.

Two kinds of input are read:
- a kohya_ss GUI config (`LoRA_type`, `optimizer`, `max_resolution`, `lr_warmup` in percent, …): the JSON
  the GUI's save button writes, or a TOML in the GUI's names (bmaltais/kohya_ss `kohya_gui/lora_gui.py`
  turns it into sd-scripts arguments; that translation is followed here);
- an sd-scripts `--config_file` TOML (argparse names: `network_module`, `network_args`, `optimizer_type`, …;
  top-level tables are flattened as sd-scripts' `read_config_from_file` does), optionally with a
  `--dataset_config` TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`: sd-scripts
  `library/config_util.py`, where a subset's value wins over its dataset's, which wins over `[general]`,
  which wins over the argparse value).

Values are carried over as kohya *used* them, not as they read: GUI percentages become fractions; keys a
TOML leaves out get sd-scripts' default where lorabake's default differs (network_dim 4, no buckets,
`.caption` files…); options kohya silently ignored (`--network_dropout` with LyCORIS, `conv_dim` with the
GUI's "Standard" LoRA) are reported, not switched on. Nothing is guessed: a warm-up given in steps becomes
a fraction only when the run's total step count is known. Every input key ends up either in `mapped`
(kohya key → lorabake key = value) or in `unmapped` with the reason (those whose omission changes
nothing start with "nothing lost: "). The run is validated with `RunConfig`; a single value lorabake
refuses is taken out and reported rather than failing the import. DreamBooth, fine-tuning and
textual-inversion configs, and other model families (FLUX, SD3, …), are refused with a message.

The package, by concept: vocabulary (the tables of kohya option names), values (value converters),
readers (reading the files), bookkeeping (one import's state and its result), bases, datasets, network,
optimizer and training (a mapper each), importer (import_kohya, the import top to bottom) and report
(writing the run config and the migration report).
"""
from __future__ import annotations

from lorabake.kohya.bookkeeping import FolderPlan, KohyaImport
from lorabake.kohya.importer import import_kohya
from lorabake.kohya.report import render_report, run_yaml_text, write_import
from lorabake.kohya.values import Entry, KohyaImportError
from lorabake.kohya.vocabulary import LORABAKE_KEYS, NOTHING_LOST, lorabake_key_for

__all__ = ["LORABAKE_KEYS", "NOTHING_LOST", "Entry", "FolderPlan", "KohyaImport", "KohyaImportError", "import_kohya",
           "lorabake_key_for", "render_report", "run_yaml_text", "write_import"]
