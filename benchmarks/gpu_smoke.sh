#!/usr/bin/env bash
# GPU smoke test of composed models at real shapes (Qwen2.5-0.5B-shaped student, 1.5B-shaped
# teacher, SigLIP-B/14-384 tower; random weights, nothing downloaded): a few bf16 DFT steps with
# the teacher pool on the same GPU; prints tokens/s, the student step's MFU, peak GPU memory per
# role and the teacher pool's throughput (JSON, also to $OUT/gpu_smoke.json when $OUT is set).
# Extra arguments go to benchmarks/gpu_smoke.py (e.g. --work DIR, --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke.sh: no CUDA device is visible to $PYTHON (torch.cuda.is_available() is False)." >&2
    echo "  Run it on a GPU machine with the CUDA build of torch (README, 'On a GPU cluster');" >&2
    echo "  on CPU, '$PYTHON benchmarks/gpu_smoke.py --dry-run' prints the shapes, parameters and FLOPs." >&2
    exit 2
fi
exec "$PYTHON" benchmarks/gpu_smoke.py "$@"
