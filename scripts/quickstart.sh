#!/usr/bin/env bash
# Sets up .venv (if needed), builds the bundled benchmark and the pretrained parts (if missing)
# and runs the tiny cascade on a local Ray on CPU. Extra arguments go to `ckd-ray cascade` (e.g. --set trainer.max_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# baselines.json: written by the benchmark's version 2 (answers that need the image); an older build is replaced.
if [[ ! -f data/kvqa/baselines.json ]]; then
  .venv/bin/ckd-ray data build-kvqa data/kvqa
fi
# The pretrained parts and the student, TA and teacher composed from them (cached: a later run reuses them).
.venv/bin/ckd-ray models pretrain data/kvqa --out models/parts --compose models/tiny
exec .venv/bin/ckd-ray cascade configs/tiny_cascade.yaml "$@"
