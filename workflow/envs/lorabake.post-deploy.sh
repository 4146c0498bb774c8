#!/usr/bin/env bash
# Snakemake runs this inside the env of lorabake.yaml (beside it) once it is created (`--sdm conda`),
# from the workflow's working directory: the project root.
set -euo pipefail
# lorabake itself: this checkout, or the one LORABAKE_SOURCE names when the project lives elsewhere.
pip install --quiet --no-deps "${LORABAKE_SOURCE:-.}"
lorabake --help > /dev/null
