#!/usr/bin/env bash
# The TRL side of `oirl bench e2e` runs in its own virtual environment, so TRL's dependencies never touch oirl's.
# It gets the same torch build (the local CPU wheel), transformers and accelerate as the main environment (read
# from $OIRL_TRL_PYTHON, default python3), plus TRL and what TRL needs. deploy/setup.sh runs it; it downloads from
# PyPI, so it cannot run inside deploy/loopback.sh's namespace (where the benchmark itself runs).
#
#   bash benchmarks/trl_env.sh [--check] [VENV]   # default VENV: $OIRL_TRL_VENV, else ~/.cache/oirl/trl-venv
#
# Idempotent: a marker file records the pins the environment was built with; a matching marker skips the build.
# --check builds nothing: exit 0 when VENV is ready, 3 when it is not. OIRL_TRL_<PACKAGE> overrides a pin.
set -euo pipefail

CHECK=0
if [[ "${1:-}" == "--check" ]]; then CHECK=1; shift; fi
VENV="${1:-${OIRL_TRL_VENV:-$HOME/.cache/oirl/trl-venv}}"
PYTHON="${OIRL_TRL_PYTHON:-python3}"
main_version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
TORCH="${OIRL_TRL_TORCH:-$(main_version torch)}"
TRANSFORMERS="${OIRL_TRL_TRANSFORMERS:-$(main_version transformers)}"
ACCELERATE="${OIRL_TRL_ACCELERATE:-$(main_version accelerate)}"
TRL="${OIRL_TRL_VERSION:-1.16.0}"
DATASETS="${OIRL_TRL_DATASETS:-5.2.0}"

PINS=("torch==$TORCH" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" "trl==$TRL" "datasets==$DATASETS")
MARKER="$VENV/.oirl-trl-env"
WANT="${PINS[*]}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "trl_env: $VENV is ready ($WANT)"
  exit 0
fi
if (( CHECK )); then
  echo "trl_env: $VENV is not built for $WANT: run 'bash benchmarks/trl_env.sh' (deploy/setup.sh does)" >&2
  exit 3
fi

case "$TORCH" in
  *+cpu) ;;
  *) echo "trl_env: torch $TORCH is not a +cpu build; pin OIRL_TRL_TORCH to one (torch==X without +cpu pulls a" \
          "multi-GB CUDA build from PyPI)" >&2
     exit 2 ;;
esac

start=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
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
