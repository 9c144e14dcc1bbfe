"""RolloutWorker with a real vLLM engine (CPU build) and a real learner rank: generation, in-place weight sync
over both transports, fingerprint and canary verification."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from actors.rollout_worker import RolloutConfig, RolloutWorker, SyncConfig
from learner.group import LearnerGroup
from learner.learner_worker import LearnerConfig
from oirl.batch import ROLLOUT_SCHEMA, add_column
from oirl.sync import OnPolicyError, SyncError, canary_check, check_on_policy, form_weight_group, sync_weights
from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets
from tests.actors.corrupting_worker import CorruptingRolloutWorker

pytestmark = pytest.mark.slow

PROMPTS = [[1, 40, 41, 42], [1, 50, 51], [1, 60]]


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_model_path):
    rcfg = RolloutConfig(samples_per_prompt=3, max_new_tokens=10, num_cpus=0.5)
    # A plain RolloutWorker unless a test asks it to corrupt its next load (see corrupting_worker.py).
    engine = ray.remote(CorruptingRolloutWorker).options(num_cpus=0.5).remote(rcfg, tiny_model_path, "float32", 0, 0)
    lcfg = LearnerConfig(num_ranks=1, zero_stage=2, lr=3e-3, num_cpus=0.5, timeout_s=600)
    learner = LearnerGroup(lcfg, tiny_model_path, "float32", 0, 1.0, "rollout-test", micro_batch=9)
    yield engine, learner
    ray.get(engine.shutdown.remote(), timeout=60)
    learner.shutdown()


def shm_buckets() -> list[str]:
    import glob

    return sorted(glob.glob("/dev/shm/oirl-rollout-test-v*-b*.bin"))


def generate(engine, version, seeds=None):
    return ray.get(engine.generate.remote([0, 1, 2], PROMPTS, version, seeds), timeout=300)


def test_generate_returns_tagged_rollout_rows(setup):
    engine, _ = setup
    batch = generate(engine, 0, seeds=[1, 2, 3])
    assert batch.schema == ROLLOUT_SCHEMA
    assert batch.num_rows == 9
    assert batch.column("prompt_id").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.column("sample_index").to_pylist() == [0, 1, 2] * 3
    assert batch.column("prompt_token_ids").to_pylist()[3] == PROMPTS[1]
    assert set(batch.column("policy_version").to_pylist()) == {0}
    for ids, lps in zip(batch.column("response_token_ids").to_pylist(),
                        batch.column("response_logprobs").to_pylist()):
        assert 1 <= len(ids) <= 10 and len(ids) == len(lps)
        assert all(np.isfinite(lps)) and max(lps) <= 0.0
    # Per-prompt seeds make sampling reproducible (what --resume relies on).
    again = generate(engine, 0, seeds=[1, 2, 3])
    assert again.column("response_token_ids").to_pylist() == batch.column("response_token_ids").to_pylist()
    with pytest.raises(ray.exceptions.RayTaskError, match="serves version 0 but the driver expects 5"):
        generate(engine, 5)


@pytest.mark.parametrize("transport, version", [("shm", 1), ("object_store", 2), ("collective", 3)])
def test_sync_then_engine_matches_learner(setup, transport, version):
    engine, learner = setup
    if transport == "collective":  # learner rank 0 + the engine's worker: one gloo group of their own
        form_weight_group(learner, [engine], timeout_s=120)
    batch = generate(engine, version - 1)
    rewards = np.array([len(x) % 3 for x in batch.column("response_token_ids").to_pylist()], dtype=np.float32)
    learner.call_rank0("prepare", add_column(batch, "reward", rewards), version - 1)
    learner.call_rank0("update")
    cfg = SyncConfig(transport=transport, bucket_mb=1)
    before = ray.get(engine.served.remote(), timeout=60)["workers"][0]
    stats = sync_weights(learner, [engine], version, cfg, transport, canary=batch.slice(0, 3))
    served = ray.get(engine.served.remote(), timeout=60)["workers"][0]
    assert served["version"] == version and served["fingerprint"] != before["fingerprint"]
    param_bytes = sum(v.nbytes for k, v in learner.call_rank0("full_state").items() if k.startswith("lm."))
    assert stats["sync/bytes"] == param_bytes
    assert stats["sync/logprob_max_abs_diff"] < 1e-3
    # The next rollout is tagged with the new version and its logprobs are the learner's.
    nxt = generate(engine, version)
    assert set(nxt.column("policy_version").to_pylist()) == {version}
    prep = learner.call_rank0("prepare", add_column(nxt, "reward", np.zeros(nxt.num_rows, np.float32)), version)
    assert prep["rollout/engine_learner_logprob_max_abs_diff"] < 1e-3
    assert prep["rollout/engine_learner_logprob_frac_over_tol"] == 0.0
    check_on_policy(prep, SyncConfig(), version)  # passes
    # One engine logprob off by 0.01 on one token of one sample: the check counts that token and stops the run.
    lps = nxt.column("response_logprobs").to_pylist()
    lps[-1][0] += 0.01
    tampered = nxt.set_column(nxt.schema.get_field_index("response_logprobs"), "response_logprobs",
                              pa.array(lps, type=nxt.schema.field("response_logprobs").type))
    prep = learner.call_rank0("prepare", add_column(tampered, "reward", np.zeros(nxt.num_rows, np.float32)), version)
    n_tokens = sum(len(x) for x in lps)
    assert prep["rollout/engine_learner_logprob_frac_over_tol"] == pytest.approx(1 / n_tokens)
    assert prep["rollout/engine_learner_logprob_max_abs_diff"] == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(OnPolicyError, match=f"iteration {version}: on-policy check failed"):
        check_on_policy(prep, SyncConfig(), version)
    if transport == "shm":  # loaded everywhere: its files are kept for the next version, one copy, no more
        kept = shm_buckets()
        assert len(kept) == stats["sync/num_buckets"] and all(f"-v{version}-" in f for f in kept), kept


def test_consecutive_shm_syncs_write_into_the_same_files(setup):
    """After a loaded version its files are kept and the next version is written into them: the engine's worker
    must then hash and load the new bytes (an update in between makes the fingerprints differ)."""
    import os

    engine, learner = setup
    version = ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] + 1
    cfg = SyncConfig(bucket_mb=1)
    first = sync_weights(learner, [engine], version, cfg, "shm", canary=None)
    files = {os.stat(f).st_ino: f for f in shm_buckets()}
    assert len(files) == first["sync/num_buckets"]
    batch = generate(engine, version)
    rewards = np.array([len(x) % 3 for x in batch.column("response_token_ids").to_pylist()], dtype=np.float32)
    learner.call_rank0("prepare", add_column(batch, "reward", rewards), version)
    learner.call_rank0("update")
    before = ray.get(engine.served.remote(), timeout=60)["workers"][0]["fingerprint"]
    stats = sync_weights(learner, [engine], version + 1, cfg, "shm", canary=batch.slice(0, 3))
    served = ray.get(engine.served.remote(), timeout=60)["workers"][0]
    kept = shm_buckets()
    assert {os.stat(f).st_ino for f in kept} == set(files), "the next version must go into the kept files"
    assert all(f"-v{version + 1}-" in f for f in kept)
    assert served["version"] == version + 1 and served["fingerprint"] != before
    assert stats["sync/logprob_max_abs_diff"] < 1e-3


def _update_from(model, version):
    named = list(model.named_parameters())
    packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 1 << 20)]
    buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
    for b, buf in zip(buckets, buffers):
        b.location = ray.put(buf)
    return WeightUpdate(version, "object_store", buckets, fingerprint(buckets, buffers),
                        sum(b.nbytes for b in buckets))


def test_corrupted_or_wrong_weights_fail_loudly(setup, tiny_model_path):
    from transformers import AutoModelForCausalLM

    engine, learner = setup
    served = ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bad = dataclasses.replace(_update_from(model, served + 1), fingerprint="0" * 32)
    with pytest.raises(ray.exceptions.RayTaskError, match="engine 0: the weights its worker loaded .* corrupted"):
        ray.get(engine.load_weights.remote(bad), timeout=120)
    # Weights that load fine but are not the learner's: the canary catches them.
    wrong = _update_from(model, served + 1)
    ray.get(engine.load_weights.remote(wrong), timeout=120)
    batch = generate(engine, served + 1)
    with pytest.raises(SyncError, match="canary: engine 0 logprobs differ"):
        canary_check(learner, [engine], batch.slice(0, 2), SyncConfig())


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_bucket_corrupted_after_the_actor_before_the_worker_fails_the_sync(setup, transport):
    """The worker hashes the bytes it loads itself: the served check can no longer echo the learner's fingerprint."""
    engine, learner = setup
    version = ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] + 1
    ray.get(engine.corrupt_next_load.remote(), timeout=60)
    with pytest.raises(SyncError, match="engine 0.*corrupted on the way"):
        sync_weights(learner, [engine], version, SyncConfig(bucket_mb=1), transport, canary=None)
    if transport == "shm":  # a failed load's files are deleted, never rewritten for the next version: an engine
        assert not shm_buckets()  # may still be reading them
    # Nothing sticks: the next sync of the same weights verifies.
    stats = sync_weights(learner, [engine], version + 1, SyncConfig(bucket_mb=1), transport, canary=None)
    assert stats["sync/num_buckets"] >= 1


def test_a_reload_the_worker_never_did_fails_the_served_check(setup):
    """The actor says it loaded the version (even with the learner's fingerprint) but the engine's worker still
    holds the previous one: the driver asks the worker itself and refuses."""
    engine, learner = setup
    version = ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] + 1
    ray.get(engine.lose_next_reload.remote(), timeout=60)
    with pytest.raises(SyncError, match=f"engine 0 serves version {version - 1} fingerprint .*, expected version "
                                        f"{version} fingerprint"):
        sync_weights(learner, [engine], version, SyncConfig(bucket_mb=1), "object_store", canary=None)
    sync_weights(learner, [engine], version, SyncConfig(bucket_mb=1), "object_store", canary=None)  # loads now
    assert ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] == version


def test_a_reload_skipped_inside_the_worker_fails_the_served_check(setup, monkeypatch):
    from oirl import faults

    """OIRL_FAULT=stale-engine's failure one level down: the worker receives and hashes the new bytes (so version and
    fingerprint are right) but its model keeps the old weights. The digest it reads back from the model before and
    after the load is unchanged while the bytes moved: refused at the sync, in any precision. Without an update in
    between (the same bytes again), an unchanged digest is what a correct reload gives, and passes."""
    engine, learner = setup
    version = ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] + 1
    cfg = SyncConfig(bucket_mb=1)
    sync_weights(learner, [engine], version, cfg, "object_store", canary=None)
    sync_weights(learner, [engine], version + 1, cfg, "object_store", canary=None)  # same bytes: passes
    batch = generate(engine, version + 1)
    rewards = np.array([len(x) % 3 for x in batch.column("response_token_ids").to_pylist()], dtype=np.float32)
    learner.call_rank0("prepare", add_column(batch, "reward", rewards), version + 1)
    learner.call_rank0("update")
    with pytest.raises(SyncError, match="engine 0 reports version .* loaded but serves the very weights it served "
                                    "before .*: its reload did not happen"):
        with monkeypatch.context() as m:  # what OIRL_FAULT=stale-engine:<iteration> makes the driver ask for
            m.setattr(faults, "stale_engine", lambda iteration: True)
            sync_weights(learner, [engine], version + 2, cfg, "object_store", canary=None, iteration=version + 2)
    served = ray.get(engine.served.remote(), timeout=60)["workers"][0]
    assert served["served_digest"] == served["previous_digest"] != ""
    sync_weights(learner, [engine], version + 3, cfg, "object_store", canary=None)  # a real reload: passes
    served = ray.get(engine.served.remote(), timeout=60)["workers"][0]
    assert served["served_digest"] != served["previous_digest"]


def test_multiprocess_engine_receives_weights_over_vllm_rpc(setup, tiny_model_path):
    """vLLM's own engine processes (the GPU configs' mode): bucket metadata and bytes cross vLLM's msgpack RPC."""
    _, learner = setup
    rcfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=6, num_cpus=0.5, in_process_engine=False)
    engine = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(rcfg, tiny_model_path, "float32", 0, 1)
    try:
        batch = ray.get(engine.generate.remote([0], [PROMPTS[0]], 0), timeout=300)
        form_weight_group(learner, [engine], timeout_s=120)  # joined from inside vLLM's worker process
        for version, transport in ((1, "shm"), (2, "object_store"), (3, "collective")):
            stats = sync_weights(learner, [engine], version, SyncConfig(bucket_mb=1), transport, batch)
            assert stats["sync/logprob_max_abs_diff"] < 1e-3
            assert ray.get(engine.served.remote(), timeout=60)["workers"][0]["version"] == version
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)
