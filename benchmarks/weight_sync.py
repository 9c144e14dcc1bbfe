"""Weight-sync benchmark: publish the learner's SmolLM2-135M weights to a vLLM engine with each transport (shm,
object_store, collective), several rounds each in the same run, and record bytes, seconds, GB/s and the canary
difference.
Writes benchmarks/results/weight_sync.json.

    deploy/loopback.sh python benchmarks/weight_sync.py [--rounds 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import ray

    from actors.rollout_worker import RolloutConfig, RolloutWorker, SyncConfig
    from learner.group import LearnerGroup
    from learner.learner_worker import LearnerConfig
    from oirl.config import ModelConfig
    from oirl.models import resolve_model
    from oirl.sync import checkpoint_tensors, form_weight_group, sync_weights

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bucket-mb", type=int, default=256)
    args = ap.parse_args()
    path = str(resolve_model(ModelConfig(path=args.model)))
    ray.init(address="local", include_dashboard=False, num_cpus=4, _temp_dir=f"/tmp/oirl-ray-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    results = {}
    try:
        engine = ray.remote(RolloutWorker).options(num_cpus=1).remote(
            RolloutConfig(samples_per_prompt=1, max_new_tokens=16, kv_cache_gib=1), path, "float32", 0, 0)
        learner = LearnerGroup(LearnerConfig(num_ranks=1, zero_stage=2, num_cpus=1), path, "float32", 0, 1.0,
                               "syncbench", micro_batch=1)
        canary = ray.get(engine.generate.remote([0], [[1, 2, 3, 4, 5]], 0), timeout=600)
        version = 0
        expected = checkpoint_tensors(path)
        form_weight_group(learner, [engine], timeout_s=300)
        for transport in ("shm", "object_store", "collective"):
            rounds = []
            for _ in range(args.rounds):
                version += 1
                ray.get(engine.generate.remote([0], [[1, 2, 3]], version - 1), timeout=600)  # engine is live
                rounds.append(sync_weights(learner, [engine], version, SyncConfig(bucket_mb=args.bucket_mb),
                                           transport, canary, expected))
            results[transport] = {
                "bytes": rounds[0]["sync/bytes"],
                "seconds_median": statistics.median(r["sync/seconds"] for r in rounds),
                "gbps_median": statistics.median(r["sync/gbps"] for r in rounds),
                "pack_seconds_median": statistics.median(r["sync/pack_s"] for r in rounds),
                "engine_reload_seconds_median": statistics.median(r["sync/engine_reload_s"] for r in rounds),
                "engine_verify_seconds_median": statistics.median(r["sync/engine_verify_s"] for r in rounds),
                "canary_logprob_max_abs_diff": max(r["sync/logprob_max_abs_diff"] for r in rounds),
                "rounds": rounds,
            }
        ray.get(engine.shutdown.remote(), timeout=60)
        learner.shutdown()
    finally:
        ray.shutdown()
    out = {"model": args.model, "bucket_mb": args.bucket_mb, "machine": {"cpus": os.cpu_count()},
           "note": "learner rank and engine on one node; sync/seconds = export (pack + hash) + engine fetch "
                   "(collective: gloo broadcast over loopback TCP), verify (worker-side hash) and in-place reload",
           **results}
    (REPO / "benchmarks" / "results" / "weight_sync.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
