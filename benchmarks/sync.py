"""Weight-sync benchmark: every transport against its floor and a per-parameter baseline, for several model sizes.

    deploy/loopback.sh python -m benchmarks.sync --out DIR [--quick] [--rounds 5]

For each model (the tests' tiny Llama, SmolLM2-135M, and a random ~411M-parameter Llama with SmolLM2's tokenizer;
`--quick`: tiny only) one learner rank (DeepSpeed ZeRO-2) and one vLLM engine start, then, in the same run:

- each transport (shm, object_store, collective): `rounds` real syncs (oirl.sync.sync_weights: pack, fingerprint,
  transfer, the worker's own fingerprint, in-place reload, the served check and the canary); the median;
- the floor: one memcpy of the same bytes (into a pre-faulted buffer) plus the fastest of the worker's in-place
  reloads of the same tensors already resident in its memory (RolloutWorker.reload_floor, once per shm and
  object_store round): what no transport can avoid;
- the per-parameter baseline: one RPC per tensor (driver -> engine actor -> its worker, each call waited for), then
  one reload, as one-call-per-tensor syncs do (the worker's reload needs the full set at once).

DIR/sync.json: `sizes`, one entry per (model, transport): params, bytes, transport, seconds (median), floor_seconds,
per_param_seconds, ratio_vs_floor, speedup_vs_per_param and the sync's own breakdown (pack, fetch, verify, reload).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu_check import LlamaShape, _build_random

LLAMA_411M = LlamaShape(hidden=1024, intermediate=2816, layers=32, heads=16, kv_heads=4, head_dim=64, vocab=49152,
                        tied=True)
TRANSPORTS = ("shm", "object_store", "collective")


def model_folder(name: str) -> str:
    import torch

    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    if name != "llama-411m":
        return str(resolve_model(ModelConfig(path=name)))
    out = Path(os.path.expanduser(ModelConfig().cache_dir)) / "random-llama-411m"
    if not (out / "config.json").is_file():
        _build_random(LLAMA_411M, out, resolve_model(ModelConfig(path="smollm2-135m")), torch.device("cpu"),
                      torch.float32)
    return str(out)


def memcpy_seconds(nbytes: int, repeats: int = 3) -> float:
    """Best of ``repeats`` copies of nbytes between two resident buffers (pages touched first)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def folder_tensors(model_path: str) -> list[tuple[str, Any]]:
    """Every (name, tensor) of an HF folder's safetensors files, in file and key order."""
    from safetensors import safe_open

    tensors = []
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            tensors += [(k, st.get_tensor(k)) for k in st.keys()]
    return tensors


def per_param_seconds(engine: Any, model_path: str, version: int, timeout_s: float) -> tuple[float, int]:
    """One waited RPC per tensor (bytes from the model's safetensors), then one reload."""
    import ray
    import torch

    tensors = folder_tensors(model_path)
    t0 = time.perf_counter()
    for name, t in tensors:
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        ray.get(engine.stage_tensor.remote(name, str(t.dtype), list(t.shape), raw), timeout=timeout_s)
    ray.get(engine.reload_staged.remote(version), timeout=timeout_s)
    return time.perf_counter() - t0, len(tensors)


def bench_model(name: str, rounds: int, bucket_mb: int, timeout_s: float) -> list[dict[str, Any]]:
    import ray

    from actors.rollout_worker import RolloutConfig, RolloutWorker, SyncConfig
    from learner.group import LearnerGroup
    from learner.learner_worker import LearnerConfig
    from oirl.sync import canary_check, checkpoint_tensors, form_weight_group, sync_weights

    path = model_folder(name)
    engine = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        RolloutConfig(samples_per_prompt=1, max_new_tokens=8, kv_cache_gib=1), path, "float32", 0, 0)
    # GRPO: no value head, so the published tensors are exactly the model folder's (the per-param baseline's set).
    learner = LearnerGroup(LearnerConfig(num_ranks=1, zero_stage=2, num_cpus=1, algorithm="grpo", kl_coef=0.0),
                           path, "float32", 0, 1.0, f"syncbench-{name}", micro_batch=1)
    entries = []
    try:
        canary = ray.get(engine.generate.remote([0], [[1, 2, 3, 4, 5]], 0), timeout=timeout_s)
        expected = checkpoint_tensors(path)
        form_weight_group(learner, [engine], timeout_s=timeout_s)
        cfg = SyncConfig(bucket_mb=bucket_mb)
        version = 0
        measured: dict[str, list[dict]] = {}
        floor_reload: list[float] = []
        for transport in TRANSPORTS:
            measured[transport] = []
            for _ in range(rounds):
                version += 1
                ray.get(engine.generate.remote([0], [[1, 2, 3]], version - 1), timeout=timeout_s)  # engine is live
                measured[transport].append(sync_weights(learner, [engine], version, cfg, transport, canary, expected))
                if transport != "collective":  # the floor: the same update's tensors, already in the worker
                    update = learner.call_rank0("export_weights", version, transport, bucket_mb)
                    floor_reload.append(ray.get(engine.reload_floor.remote(update, timeout_s), timeout=timeout_s))
                    learner.call("release_weights", version, cfg.shm_reuse)  # loaded: kept, as sync_weights does
        nbytes = int(measured["shm"][0]["sync/bytes"])
        memcpy = memcpy_seconds(nbytes)
        floor = memcpy + min(floor_reload)  # a floor: the best resident reload seen (the first ones run cold)
        version += 1
        per_param, count = per_param_seconds(engine, path, version, timeout_s)
        # The baseline must load the right weights too: the learner has not trained, so it holds the folder's.
        per_param_canary = canary_check(learner, [engine], canary, cfg)["sync/logprob_max_abs_diff"]
        params = nbytes // 4
        for transport, rows in measured.items():
            seconds = statistics.median(r["sync/seconds"] for r in rows)
            entries.append({
                "model": name, "params": params, "bytes": nbytes, "transport": transport, "seconds": seconds,
                "floor_seconds": floor, "floor_memcpy_seconds": memcpy, "floor_reload_seconds": floor_reload,
                "per_param_seconds": per_param, "per_param_tensors": count,
                "per_param_canary_logprob_max_abs_diff": per_param_canary,
                "ratio_vs_floor": seconds / floor, "speedup_vs_per_param": per_param / seconds,
                "breakdown_median": {k.split("/", 1)[1]: statistics.median(r[k] for r in rows)
                                     for k in rows[0] if k.endswith("_s")},
                "canary_logprob_max_abs_diff": max(r["sync/logprob_max_abs_diff"] for r in rows),
                "rounds_seconds": [r["sync/seconds"] for r in rows],
            })
        ray.get(engine.shutdown.remote(), timeout=60)
    finally:
        learner.shutdown()
        ray.kill(engine)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (a minute)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="tiny,smollm2-135m,llama-411m")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one remote call may take")
    args = parser.parse_args(argv)
    models, rounds = (["tiny"], 1) if args.quick else (args.models.split(","), args.rounds)
    import ray

    from oirl.config import REPO_ROOT

    ray.init(address="local", include_dashboard=False, num_cpus=4, _temp_dir=f"/tmp/oirl-ray-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        sizes = [e for m in models for e in bench_model(m, rounds, args.bucket_mb, args.timeout)]
    finally:
        ray.shutdown()
    result = {"quick": args.quick, "rounds": rounds, "bucket_mb": args.bucket_mb, "machine": {"cpus": os.cpu_count()},
              "seconds_total": time.perf_counter() - t0, "sizes": sizes,
              "note": "learner rank and engine on one node; seconds = one sync_weights call (export: pack + hash; "
                      "engine: fetch, worker hash, in-place reload; served check; canary). floor = memcpy of the "
                      "bytes + the worker's reload of resident tensors. per_param = one waited RPC per tensor "
                      "+ one reload."}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sync.json").write_text(json.dumps(result, indent=1) + "\n")
    for e in sizes:
        print(f"{e['model']:>12} {e['transport']:>12}: {e['seconds']:.3f}s  floor {e['floor_seconds']:.3f}s "
              f"(x{e['ratio_vs_floor']:.2f})  per-param {e['per_param_seconds']:.2f}s (x{e['speedup_vs_per_param']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
