"""Weight sync, driver side: learner publishes version k+1, every engine loads it, then it is verified.

1. export: learner rank 0 packs the policy into buckets (ZeRO-3 gathers first) and computes the fingerprint.
2. load: every engine fetches the buckets, recomputes the fingerprint, reloads in place through vLLM's reload
   path, resets its prefix cache (all engines at once; one wait with a timeout).
3. verify: each engine's worker reports the version and fingerprint it now serves; a canary compares engine
   logprobs with learner logprobs on the same tokens and fails loudly beyond ``sync.canary_tolerance``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray

logger = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """An engine does not serve the weights the learner published."""


def choose_transport(requested: str, learner_node: str, engine_nodes: list[str]) -> str:
    if requested != "auto":
        if requested == "shm" and any(n != learner_node for n in engine_nodes):
            raise SyncError("sync.transport=shm needs every engine on learner rank 0's node; "
                            "use sync.transport=object_store (or auto) on multi-node clusters")
        return requested
    return "shm" if all(n == learner_node for n in engine_nodes) else "object_store"


def _wait(refs: list[Any], timeout: float, what: str) -> list[Any]:
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise SyncError(f"{what} did not finish within {timeout}s (sync.timeout_s)") from e


def sync_weights(learner: Any, engines: list[Any], version: int, cfg: Any, transport: str,
                 canary: pa.Table | None) -> dict[str, float]:
    t0 = time.perf_counter()
    update = learner.call_rank0("export_weights", version, transport, cfg.bucket_mb)
    t_export = time.perf_counter()
    loads = _wait([e.load_weights.remote(update, cfg.timeout_s) for e in engines], cfg.timeout_s, f"loading version {version}")
    t_load = time.perf_counter()
    served = _wait([e.served.remote() for e in engines], cfg.timeout_s, "served-version check")
    for report in served:
        for w in report["workers"]:
            if w["version"] != version or w["fingerprint"] != update.fingerprint:
                raise SyncError(f"engine {report['engine']} serves version {w['version']} fingerprint "
                                f"{w['fingerprint']}, expected version {version} fingerprint {update.fingerprint}")
    if transport == "shm":
        learner.call("release_weights", version)
    seconds = t_load - t0
    stats = {"sync/bytes": float(update.nbytes), "sync/seconds": seconds,
             "sync/gbps": update.nbytes / max(seconds, 1e-9) / 1e9, "sync/export_s": t_export - t0,
             "sync/pack_s": update.pack_seconds, "sync/engine_reload_s": max(x["reload_s"] for x in loads),
             "sync/engine_verify_s": max(x["verify_s"] for x in loads), "sync/num_buckets": len(update.buckets)}
    if canary is not None and canary.num_rows:
        stats["sync/logprob_max_abs_diff"] = canary_check(learner, engines, canary, cfg)
    return stats


def canary_check(learner: Any, engines: list[Any], rows: pa.Table, cfg: Any) -> float:
    prompts = rows.column("prompt_token_ids").to_pylist()
    responses = rows.column("response_token_ids").to_pylist()
    keep = [i for i, r in enumerate(responses) if r]
    seqs = [prompts[i] + responses[i] for i in keep]
    plens = [len(prompts[i]) for i in keep]
    if not seqs:
        return 0.0
    engine_refs = [e.prompt_logprobs.remote(seqs, plens) for e in engines]
    learner_lp = learner.call_rank0("logprobs", seqs, plens)
    worst = 0.0
    for k, engine_lp in enumerate(_wait(engine_refs, cfg.timeout_s, "canary")):
        for a, b in zip(engine_lp, learner_lp):
            diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if len(a) else 0.0
            worst = max(worst, diff)
        if worst > cfg.canary_tolerance:
            raise SyncError(f"canary: engine {k} logprobs differ from the learner's by {worst:.3g} > "
                            f"sync.canary_tolerance={cfg.canary_tolerance}; the engine does not serve the "
                            "published weights")
    return worst
