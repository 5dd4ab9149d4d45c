#!/usr/bin/env bash
# The GPU check on a fresh machine with an NVIDIA GPU (H100/H200 class) and this repository: a
# virtual environment with the gpu and test extras, then scripts/gpu_check.py (the GPU test subset,
# the training rows in float32 and bfloat16, MFU, compiled memory, compile time, bfloat16 against
# float32), which writes one JSON. See docs/gpu.md.
#
#   scripts/gpu_check.sh                          # writes gpu_check.json; under 8 minutes in all
#   scripts/gpu_check.sh --out h200.json --batches 16,64
#   scripts/gpu_check.sh --dry-run                # any machine with .venv: all but the GPU steps, < 1 min
#
# Options go to scripts/gpu_check.py (--help lists them). SMSANET_VENV picks another environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GPU_CHECK_STARTED_AT="${GPU_CHECK_STARTED_AT:-$(date +%s)}"  # The JSON counts the installation too.
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    # The dry run installs nothing: it uses the environment of the CPU tests.
    VENV="${SMSANET_VENV:-$HERE/../.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
      echo "gpu_check.sh: error: no Python in $VENV; run scripts/test.sh once or set SMSANET_VENV" >&2
      exit 2
    fi
    exec "$VENV/bin/python" "$HERE/gpu_check.py" "$@"
  fi
done
# No PyTorch step runs here, but the test files import torch: its CPU build is a fraction of the
# CUDA one's download and pins no CUDA libraries that could clash with jax[cuda12]'s.
export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
CALLER="$PWD"  # _env.sh moves to the repository; --out stays relative to where the user is.
source "$HERE/_env.sh" gpu,test
cd "$CALLER"
exec python "$HERE/gpu_check.py" "$@"
