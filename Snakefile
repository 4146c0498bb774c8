# lorabake: datasets/ + configs/ → cached latents → LoRAs → grids, merges, extractions.
# Run `snakemake -j1 all`; `--config project=path/to/configs/config.yaml` builds another project
# (outputs go under its root, the folder above configs/, wherever snakemake starts).
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/merge.smk"


rule all:
    input:
        get_all_targets(),
    default_target: True
