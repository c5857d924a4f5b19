#!/usr/bin/env bash
# Creates .venv in the repository and installs ckd_ray with the CPU build of torch.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# The constraint pins torch to its CPU wheel in every pip resolution, including the isolated build
# environments of packages that compile (DeepSpeed imports torch in its setup.py).
export PIP_CONSTRAINT="$PWD/constraints/cpu.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.ckd_ray-installed
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing torch (CPU) and ckd_ray[test] into .venv (first time: a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done"
