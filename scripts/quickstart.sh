#!/usr/bin/env bash
# The main job on the embedded default: prepare the sample photos, train the quickstart SMSANet,
# colorize a few photos, and say where everything is. Creates .venv and installs on first use.
# Usage: scripts/quickstart.sh [WORKDIR] [--config.key=value ...]   (WORKDIR: runs/quickstart)
# Paths are relative to the folder you run it from, like every smsanet-jax path.
HERE="$PWD"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" data
cd "$HERE"
WORKDIR=runs/quickstart
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  WORKDIR="$1"
  shift
fi
CONFIGS="$ROOT/configs"
DATA_DIR="${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}"

smsanet-jax prepare-data sample_photos --data-dir "$DATA_DIR"
smsanet-jax train --config "$CONFIGS/quickstart.py" --workdir "$WORKDIR" \
  --config.data.data_dir="$DATA_DIR" "$@"

# Colorize the validation photos (written as grayscale first, so the model sees only L).
mkdir -p "$WORKDIR/gray"
python - "$WORKDIR/gray" <<'PY'
import sys
import numpy as np
from PIL import Image
from skimage import data
for name in ("astronaut", "coffee", "chelsea"):
    Image.fromarray(getattr(data, name)()).convert("L").save(f"{sys.argv[1]}/{name}.png")
PY
smsanet-jax colorize "$WORKDIR/gray" --workdir "$WORKDIR" --out "$WORKDIR/colorized" --overwrite

cat <<MSG

Done. Results in $WORKDIR:
  checkpoints/          orbax checkpoints (rerun the same command to continue training)
  eval/step_*/          evaluation reports: grid.png (gray | prediction | truth), summary.json
  colorized/            the photos in $WORKDIR/gray, colorized at full resolution
  tensorboard/          open with: .venv/bin/tensorboard --logdir $WORKDIR/tensorboard
MSG
