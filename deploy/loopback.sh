#!/usr/bin/env bash
# Run a command in a network namespace that has only loopback: Ray then binds 127.0.0.1 and nothing can leave
# the machine. Used by tests, benchmarks and .ci/run for anything that starts Ray.
#   deploy/loopback.sh oirl train --config configs/smoke.yaml --out /tmp/smoke
set -euo pipefail
if [ "${OIRL_IN_LOOPBACK_NS:-}" = "1" ]; then exec "$@"; fi
exec unshare --net bash -c 'ip link set lo up && export OIRL_IN_LOOPBACK_NS=1 && exec "$@"' -- "$@"
