#!/usr/bin/env bash
# Everything a fresh machine with Python 3.11 and pip needs: a .venv with lorabake and its tools.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${LORABAKE_TORCH:-torch==2.13.0}   # CUDA users: set LORABAKE_TORCH to their torch build

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip "$TORCH"
pip -r envs/requirements-cpu.txt
[ -z "${LORABAKE_FARM:-}" ] || pip -r envs/requirements-slurm.txt   # farms: the SLURM executor plugin
pip --no-deps -e .
.venv/bin/lorabake --help > /dev/null
echo "lorabake is set up in .venv (run: .venv/bin/snakemake -j1 all)"
