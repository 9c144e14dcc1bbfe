"""Weight sync, driver side: learner publishes version k+1, every engine loads it, then it is verified.

1. export: learner rank 0 packs the policy into buckets (ZeRO-3 gathers first) and computes the fingerprint.
2. load: every engine fetches the buckets (shm file, Ray object, or learner rank 0's broadcast over the collective
   group), its worker hashes and reloads them in place through vLLM's reload path, the prefix cache is reset (all
   engines at once; one wait with a timeout).
3. verify: each engine's worker reports the version it serves and the fingerprint it computed itself from the
   bytes it loaded; the published tensors are checked against the model checkpoint on disk (names and shapes: a
   dropped or renamed tensor fails); a canary compares engine logprobs with learner logprobs on the same tokens
   and fails loudly beyond ``sync.canary_tolerance``.

Every wait has ``sync.timeout_s`` and names the engine that failed or is late.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from oirl import faults
from oirl.remote import RemoteError, get_all

logger = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """An engine does not serve the weights the learner published."""


def choose_transport(requested: str, learner_node: str, engine_nodes: list[str], shm_free: int | None = None,
                     shm_needed: int | None = None) -> str:
    """'auto': shm when every engine shares learner rank 0's node (one memcpy each side) and that node's /dev/shm
    has room for one copy of the policy, else the collective broadcast (the cluster path: NCCL between GPUs, gloo
    between CPU nodes).

    shm_free: free bytes of /dev/shm on learner rank 0's node (oirl.weights.shm_free_bytes, measured there);
    shm_needed: the policy's bytes as published (``policy_bytes``). The shm transport holds one copy there at a
    time (sync.shm_reuse keeps it between syncs); a tmpfs that runs out mid-export fails with SIGBUS in the
    learner, not with an error. Either None: not checked."""
    same_node = all(n == learner_node for n in engine_nodes)
    fits = shm_free is None or shm_needed is None or shm_needed <= shm_free
    if requested == "shm":
        if not same_node:
            raise SyncError("sync.transport=shm needs every engine on learner rank 0's node; "
                            "use sync.transport=collective (or auto) on multi-node clusters")
        if not fits:
            raise SyncError(f"sync.transport=shm needs {_gib(shm_needed)} free in /dev/shm on learner rank 0's node "
                            f"(one copy of the policy) but it has {_gib(shm_free)}; enlarge /dev/shm (KubeRay: the "
                            "dshm emptyDir's sizeLimit and the pod's memory; Docker: --shm-size), or use "
                            "sync.transport=collective (or auto, which then picks it)")
        return requested
    if requested != "auto":
        return requested
    if same_node and not fits:
        logger.warning("sync.transport=auto: /dev/shm on learner rank 0's node has %s free but a copy of the policy "
                       "needs %s; using the collective transport instead of shm", _gib(shm_free), _gib(shm_needed))
        return "collective"
    return "shm" if same_node else "collective"


def _gib(nbytes: int | None) -> str:
    return f"{(nbytes or 0) / 2**30:.2f} GiB ({nbytes} bytes)"


def policy_bytes(expected: dict[str, tuple[int, ...]] | None, dtype: str) -> int | None:
    """Bytes of the policy as the learner publishes it: every tensor of the checkpoint (``checkpoint_tensors``,
    from the safetensors headers) in the training dtype (model.dtype). None when the checkpoint is unknown."""
    if expected is None:
        return None
    import torch

    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return sum(int(np.prod(shape, dtype=np.int64)) for shape in expected.values()) * itemsize


def form_weight_group(learner: Any, engines: list[Any], timeout_s: float) -> None:
    """The collective transport's group: learner rank 0 hosts it as rank 0, engine i's worker joins as rank i+1.
    Formed at start and again whenever an engine is replaced (a broadcast needs every member)."""
    ip, port = learner.call_rank0("master_address")
    world = len(engines) + 1
    refs = learner.submit("join_weight_group", ip, port, world, timeout_s)
    refs += [e.join_weight_group.remote(ip, port, i + 1, world, timeout_s) for i, e in enumerate(engines)]
    names = [f"learner rank {r}" for r in range(len(refs) - len(engines))] + [f"engine {i}" for i in range(len(engines))]
    try:
        get_all(refs, timeout_s, "forming the weight-broadcast group", names)
    except (RemoteError, TimeoutError) as e:
        raise SyncError(f"{e} (sync.timeout_s={timeout_s})") from e


def _wait(refs: list[Any], timeout: float, what: str, names: list[str] | None = None) -> list[Any]:
    names = names or [f"engine {i}" for i in range(len(refs))]
    try:
        return get_all(refs, timeout, what, names)
    except (RemoteError, TimeoutError) as e:
        raise SyncError(f"{e} (sync.timeout_s={timeout})") from e


def checkpoint_tensors(model_path: str) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor the learner must publish, from the model folder's safetensors files (headers
    only, no data read): the independent count the published weights are checked against. A tied head
    (``tie_word_embeddings`` in the folder's config) is left out whether or not the files hold it: it travels once,
    as the embedding. None when the folder has no safetensors."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "np") as h:
            for name in h.keys():
                shapes[name] = tuple(h.get_slice(name).get_shape())
    if _tied_head(model_path):
        shapes.pop("lm_head.weight", None)
    return shapes


def _tied_head(model_path: str) -> bool:
    """Whether the model's lm_head is its input embedding: the config's ``tie_word_embeddings`` as transformers
    resolves it (the model class's default when config.json does not say). No config.json: not tied."""
    from pathlib import Path

    if not (Path(model_path) / "config.json").is_file():
        return False
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False))


def check_against_checkpoint(update: Any, expected: dict[str, tuple[int, ...]] | None) -> float | None:
    """Every tensor of the model checkpoint (``checkpoint_tensors``: a tied head left out) is published exactly once
    with its shape and its bytes, and nothing else is.

    Returns the expected byte count, from the checkpoint: each tensor's numel from the safetensors header x the size
    of the dtype it was published in. Raises SyncError naming the first missing, extra or mis-shaped tensor, a
    tensor whose bytes are not that many, or buckets that hold another total."""
    if expected is None:
        return None
    from oirl.weights import _DTYPES

    metas = {m.name: m for b in update.buckets for m in b.tensors}
    missing = sorted(set(expected) - set(metas))
    extra = sorted(set(metas) - set(expected))
    wrong = sorted(n for n in set(metas) & set(expected) if tuple(metas[n].shape) != tuple(expected[n]))
    if missing or extra or wrong:
        raise SyncError(f"version {update.version} does not match the model checkpoint's tensors: missing "
                        f"{missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}; the learner publishes "
                        "names the engines cannot load")
    sizes = {n: int(np.prod(shape, dtype=np.int64)) * _DTYPES[metas[n].dtype].itemsize
             for n, shape in expected.items()}
    short = sorted(n for n in sizes if metas[n].nbytes != sizes[n])
    if short:
        n = short[0]
        raise SyncError(f"version {update.version}: {n} is published as {metas[n].nbytes} bytes but the checkpoint's "
                        f"{list(expected[n])} {metas[n].dtype} needs {sizes[n]} ({len(short)} tensors differ)")
    total = sum(sizes.values())
    if total != update.nbytes:
        raise SyncError(f"version {update.version}: buckets hold {update.nbytes} bytes but their tensors need {total}")
    return float(total)


def sync_weights(learner: Any, engines: list[Any], version: int, cfg: Any, transport: str,
                 canary: pa.Table | None, expected: dict[str, tuple[int, ...]] | None = None,
                 iteration: int | None = None) -> dict[str, float]:
    """Publish ``version`` to ``engines`` and verify it; ``iteration``: the loop iteration (fault injection)."""
    t0 = time.perf_counter()
    loaded = False
    try:  # the export too: a failed one leaves files of this version that the release below removes
        update = learner.call_rank0("export_weights", version, transport, cfg.bucket_mb)
        t_export = time.perf_counter()
        expected_bytes = check_against_checkpoint(update, expected)
        if iteration is not None:
            faults.point("sync", iteration)
        stale = iteration is not None and faults.stale_engine(iteration)  # OIRL_FAULT=stale-engine: a drill
        refs = [e.load_weights.remote(update, cfg.timeout_s, stale) for e in engines]
        names = [f"engine {i}" for i in range(len(engines))]
        if transport == "collective":  # the engines wait in the broadcast that learner rank 0 now starts
            bcast = learner.submit("broadcast_weights", version, cfg.timeout_s)
            refs, names = refs + bcast, names + [f"learner rank {r}" for r in range(len(bcast))]
        loads = _wait(refs, cfg.timeout_s, f"loading version {version}", names)[: len(engines)]
        t_load = time.perf_counter()
        loaded = True
        served = _wait([e.served.remote() for e in engines], cfg.timeout_s, "served-version check")
    finally:
        if transport == "shm":  # loaded or failed, the files of this version are not needed any more; once every
            try:                # engine has loaded them, the next version is written into them (see weight_export)
                learner.call("release_weights", version, loaded and cfg.shm_reuse)
            except Exception:  # a dead learner is the error to report, not this
                logger.warning("could not release the /dev/shm files of version %d", version, exc_info=True)
    for report in served:
        for w in report["workers"]:
            if w["version"] != version or w["fingerprint"] != update.fingerprint:
                raise SyncError(f"engine {report['engine']} serves version {w['version']} fingerprint "
                                f"{w['fingerprint']}, expected version {version} fingerprint {update.fingerprint}")
            # New bytes arrived (the fingerprint moved) but the weights the model holds did not: the reload did not
            # happen. Exact in any precision, where the logprob checks see one small update only above bf16 noise.
            if w["previous_fingerprint"] not in ("", w["fingerprint"]) and w["served_digest"] == w["previous_digest"]:
                raise SyncError(f"engine {report['engine']} reports version {version} loaded but serves the very "
                                f"weights it served before (digest {w['served_digest']}): its reload did not happen "
                                "(a stale engine); replace it or rerun with --resume")
    seconds = t_load - t0
    stats = {"sync/bytes": float(update.nbytes), "sync/seconds": seconds,
             "sync/gbps": update.nbytes / max(seconds, 1e-9) / 1e9, "sync/export_s": t_export - t0,
             "sync/pack_s": update.pack_seconds, "sync/engine_reload_s": max(x["reload_s"] for x in loads),
             "sync/engine_verify_s": max(x["verify_s"] for x in loads), "sync/num_buckets": len(update.buckets),
             "sync/engine_digest_s": max(x["digest_s"] for x in loads)}
    if expected_bytes is not None:
        stats["sync/expected_bytes"] = expected_bytes
    stats["sync/served_check_s"] = time.perf_counter() - t_load
    if canary is not None and canary.num_rows:
        t_canary = time.perf_counter()
        stats.update(canary_check(learner, engines, canary, cfg))
        stats["sync/canary_s"] = time.perf_counter() - t_canary
        stats["sync/canary_tokens"] = float(sum(len(r) for r in canary.column("response_token_ids").to_pylist()))
    return stats


def canary_due(version: int, every: int) -> bool:
    """Whether the sync that publishes ``version`` (1 = the first after version 0) runs the canary (sync.canary_every)."""
    return every > 0 and (version - 1) % every == 0


def canary_check(learner: Any, engines: list[Any], rows: pa.Table, cfg: Any) -> dict[str, float]:
    """Every engine and the learner score the tokens of ``rows``; an engine fails (SyncError naming it) when more
    than sync.canary_max_frac of the tokens differ by more than sync.canary_tolerance, or when the k3 estimate of
    KL(engine || learner) on them exceeds sync.max_mismatch_kl (> 0): statistics of the whole set, not a max, so
    bf16 kernel noise on a few low-probability tokens does not stop a run that one stale update would
    (benchmarks/results/check_calibration.json). Returns the worst engine's statistics."""
    prompts = rows.column("prompt_token_ids").to_pylist()
    responses = rows.column("response_token_ids").to_pylist()
    keep = [i for i, r in enumerate(responses) if r]
    seqs = [prompts[i] + responses[i] for i in keep]
    plens = [len(prompts[i]) for i in keep]
    if not seqs:
        return {}
    engine_refs = [e.prompt_logprobs.remote(seqs, plens) for e in engines]
    learner_lp = learner.call_rank0("logprobs", seqs, plens)
    worst: dict[str, float] = {}
    for k, engine_lp in enumerate(_wait(engine_refs, cfg.timeout_s, "canary")):
        st = canary_verdict(k, canary_diff(k, engine_lp, learner_lp), cfg)
        worst = max(worst, st, key=lambda x: x.get("sync/canary_k3_kl", -1.0))
    return worst


def canary_verdict(engine: int, log_r: np.ndarray, cfg: Any) -> dict[str, float]:
    """The canary's statistics of one engine from log(learner / engine) of every token [T]; SyncError naming the
    engine when they are beyond sync.canary_tolerance / canary_max_frac or sync.max_mismatch_kl."""
    diff = np.abs(log_r)
    st = {"sync/logprob_max_abs_diff": float(diff.max(initial=0.0)),
          "sync/canary_frac_over_tol": float((diff > cfg.canary_tolerance).mean()) if diff.size else 0.0,
          "sync/canary_k3_kl": float(np.mean(np.exp(log_r) - 1 - log_r)) if diff.size else 0.0}
    bad_kl = cfg.max_mismatch_kl > 0 and st["sync/canary_k3_kl"] > cfg.max_mismatch_kl
    if st["sync/canary_frac_over_tol"] > cfg.canary_max_frac or bad_kl:
        raise SyncError(f"canary: engine {engine} logprobs differ from the learner's by "
                        f"{st['sync/logprob_max_abs_diff']:.3g} at most: {st['sync/canary_frac_over_tol']:.2%} of "
                        f"{diff.size} tokens over sync.canary_tolerance={cfg.canary_tolerance} (allowed: "
                        f"sync.canary_max_frac={cfg.canary_max_frac}), mismatch KL {st['sync/canary_k3_kl']:.3g} "
                        f"(sync.max_mismatch_kl={cfg.max_mismatch_kl}); the engine does not serve the published weights")
    return st


def canary_diff(engine: int, engine_lp: list[Any], learner_lp: list[Any]) -> np.ndarray:
    """log(learner / engine) of every canary token, concatenated [T] float64. A NaN or inf, or sequences of another
    length, is an error: either would otherwise compare as no difference at all."""
    if len(engine_lp) != len(learner_lp):
        raise SyncError(f"canary: engine {engine} scored {len(engine_lp)} sequences, the learner {len(learner_lp)}")
    out = []
    for i, (a, b) in enumerate(zip(engine_lp, learner_lp)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise SyncError(f"canary: sequence {i}: engine {engine} gave {a.shape[0]} logprobs, the learner "
                            f"{b.shape[0]}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise SyncError(f"canary: sequence {i}: a non-finite logprob (engine {engine}: {int((~np.isfinite(a)).sum())}"
                            f" of {a.size}, learner: {int((~np.isfinite(b)).sum())} of {b.size}); the weights are "
                            "broken on one side")
        out.append(b - a)
    return np.concatenate(out) if out else np.zeros(0)


class OnPolicyError(SyncError):
    """The learner's logprobs of the sampled tokens differ from the engine's beyond sync.on_policy_tolerance."""


def check_on_policy(stats: dict[str, float], cfg: Any, iteration: int, required: bool = False) -> str:
    """Enforce the primary on-policy check on the learner's all-rank statistics (LearnerWorker.prepare, or update
    with learner.old_logprobs=update). Returns 'passed'; 'deferred' when ``stats`` hold no check (the update's
    forward will: learner.old_logprobs=update); or 'not_checked' when there was nothing to compare (no response
    token of this iteration's version: one-step-off), so the caller must compare the engines another way (the
    canary). ``required``: the last phase that could have checked, so no check at all is an error.

    Fails (or warns, sync.on_policy_action=warn) when more than sync.on_policy_max_frac of the response tokens
    differ by more than sync.on_policy_tolerance, or the k3 estimate of KL(engine || learner) on them exceeds
    sync.max_mismatch_kl (> 0): the engines then sample from another policy than the one trained;
    the message names the engines whose rows fail. A non-finite logprob on any rank fails whatever the action."""
    key = "rollout/engine_learner_logprob"
    if f"{key}_tokens_checked" not in stats:
        if required:
            raise OnPolicyError(f"iteration {iteration}: the learner reported no on-policy check in prepare or "
                                "update, so nothing compared the engines' logprobs with the learner's")
        return "deferred"
    if stats[f"{key}_tokens_checked"] == 0:
        return "not_checked"
    kl = stats.get(f"{key}_k3_kl", 0.0)
    nonfinite = stats[f"{key}_nonfinite"]
    if nonfinite:
        raise OnPolicyError(f"iteration {iteration}: on-policy check failed: {int(nonfinite)} response tokens have "
                            "a non-finite (NaN or inf) engine or learner logprob; the weights are broken on one side")
    frac, worst, mean = stats[f"{key}_frac_over_tol"], stats[f"{key}_max_abs_diff"], stats[f"{key}_mean_abs_diff"]
    if frac <= cfg.on_policy_max_frac and not (cfg.max_mismatch_kl > 0 and kl > cfg.max_mismatch_kl):
        return "passed"
    engines = sorted(int(k[len(key) + 7: -len("_frac_over_tol")]) for k in stats
                     if k.startswith(f"{key}_engine") and k.endswith("_frac_over_tol"))
    bad = []
    for e in engines:
        e_frac, e_kl = stats[f"{key}_engine{e}_frac_over_tol"], stats.get(f"{key}_engine{e}_k3_kl", 0.0)
        if e_frac > cfg.on_policy_max_frac or (cfg.max_mismatch_kl > 0 and e_kl > cfg.max_mismatch_kl):
            bad.append(f"engine {e} ({e_frac:.2%} over, KL {e_kl:.3g})")
    msg = (f"iteration {iteration}: on-policy check failed on {', '.join(bad) or 'the batch'}: {frac:.2%} of the "
           f"response tokens have |engine logprob - learner logprob| > sync.on_policy_tolerance="
           f"{cfg.on_policy_tolerance} (allowed: sync.on_policy_max_frac={cfg.on_policy_max_frac}); max {worst:.3g}, "
           f"mean {mean:.3g}, mismatch KL {kl:.3g} (sync.max_mismatch_kl={cfg.max_mismatch_kl}). The engines do not sample from the policy the learner trains (stale or wrong weights, "
           "dtype, temperature or sampling settings differ); for bf16 raise the tolerance or max_frac, or set "
           "sync.on_policy_action=warn to continue anyway")
    if cfg.on_policy_action == "warn":
        logger.warning("%s", msg)
        return "passed"
    raise OnPolicyError(msg)
