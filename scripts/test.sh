#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-prometheus.sh || echo "[test] prometheus could not be installed: its dashboard test will be skipped"
# The lint first (seconds): unused imports, undefined names and the like fail the run before any test.
.venv/bin/ruff check ckd_ray benchmarks jobs tests scripts
# The import layers (pyproject's [tool.importlinter]): one-way packages, no import cycles.
.venv/bin/lint-imports --no-cache
# Two workers, each running one group of Ray tests one at a time (tests/conftest.py), the rest beside.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
