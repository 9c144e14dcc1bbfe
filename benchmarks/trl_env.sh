#!/usr/bin/env bash
# The TRL side of `oirl bench e2e` runs in its own virtual environment, so TRL's dependencies never touch oirl's.
# It gets the same CPU build of torch and the same transformers as the main environment (their versions are
# passed in by benchmarks/e2e.py from the interpreter that runs it), plus TRL and what TRL needs.
#
#   bash benchmarks/trl_env.sh [VENV]      # default: $OIRL_TRL_VENV, else ~/.cache/oirl/trl-venv
#
# Idempotent: a marker file records the pins the environment was built with; a matching marker skips the build.
# Versions can be overridden with the environment variables below (e2e.py sets them to the main environment's).
set -euo pipefail

VENV="${1:-${OIRL_TRL_VENV:-$HOME/.cache/oirl/trl-venv}}"
PYTHON="${OIRL_TRL_PYTHON:-python3}"
TORCH="${OIRL_TRL_TORCH:-2.13.0+cpu}"               # a +cpu pin only matches the local CPU wheel (never CUDA)
TRANSFORMERS="${OIRL_TRL_TRANSFORMERS:-5.19.0}"
ACCELERATE="${OIRL_TRL_ACCELERATE:-1.15.0}"
TRL="${OIRL_TRL_VERSION:-1.16.0}"
DATASETS="${OIRL_TRL_DATASETS:-5.2.0}"

PINS=("torch==$TORCH" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" "trl==$TRL" "datasets==$DATASETS")
MARKER="$VENV/.oirl-trl-env"
WANT="${PINS[*]}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "trl_env: $VENV is ready ($WANT)"
  exit 0
fi

case "$TORCH" in
  *+cpu) ;;
  *) echo "trl_env: OIRL_TRL_TORCH=$TORCH must be a +cpu build (an unpinned torch pulls a multi-GB CUDA build)" >&2
     exit 2 ;;
esac

start=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first and alone, so nothing after it can swap it for another build.
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
# A CUDA torchvision/torchaudio beside the CPU torch breaks transformers' imports (see DESIGN.md): none may be here.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<EOF
import torch, transformers, trl
assert torch.__version__ == "$TORCH", torch.__version__
assert transformers.__version__ == "$TRANSFORMERS", transformers.__version__
assert trl.__version__ == "$TRL", trl.__version__
EOF
echo "$WANT" > "$MARKER"
echo "trl_env: built $VENV in $(( $(date +%s) - start )) s ($WANT)"
