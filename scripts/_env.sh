# Sourced by the scripts: creates ./.venv on first use and installs the package with the given extras.
# Usage: source scripts/_env.sh EXTRAS   (e.g. "test" or "data,convert")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SMSANET_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# Re-install only when pyproject.toml changed since the last install (a stamp per extras set).
STAMP="$VENV/.smsanet-installed-${1:-none}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing smsanet-jax[${1:-}] into $VENV (first run: a few minutes)"
  # torch is pinned to the CPU build 2.13.0; pip finds it in PIP_FIND_LINKS where the machine has it.
  "$VENV/bin/pip" install -q -e "$ROOT[${1:-}]"
  # jax2onnx (export --format onnx) pins an orbax-checkpoint older than ours, which it never imports.
  case ",${1:-}," in *,test,*|*,export,*) "$VENV/bin/pip" install -q --no-deps "jax2onnx==0.17.1" ;; esac
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
