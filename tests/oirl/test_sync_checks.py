"""The sync's checks that need no engine: the published tensors against the checkpoint on disk, and the
enforcement of the on-policy statistics."""

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.rollout_worker import SyncConfig
from oirl.sync import (
    OnPolicyError,
    SyncError,
    canary_diff,
    canary_due,
    canary_verdict,
    check_against_checkpoint,
    check_on_policy,
    checkpoint_tensors,
    choose_transport,
)
from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets


def _update(named):
    packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 1 << 16)]
    buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
    return WeightUpdate(1, "object_store", buckets, fingerprint(buckets, buffers), sum(b.nbytes for b in buckets))


@pytest.fixture(scope="module")
def weights(tiny_model_path):
    return list(load_file(f"{tiny_model_path}/model.safetensors").items())


def test_the_learners_tensors_match_the_checkpoint(tiny_model_path, weights):
    expected = checkpoint_tensors(tiny_model_path)
    assert set(expected) == {n for n, _ in weights}
    nbytes = check_against_checkpoint(_update(weights), expected)
    assert nbytes == sum(t.numel() * t.element_size() for _, t in weights)


@pytest.mark.parametrize("damage", ["drop", "rename", "reshape", "extra"])
def test_a_dropped_renamed_or_reshaped_tensor_fails_the_sync(tiny_model_path, weights, damage):
    named = list(weights)
    victim = named[3][0]
    if damage == "drop":
        named.pop(3)
    elif damage == "rename":
        named[3] = (victim.replace("layers.0", "layer.0"), named[3][1])
    elif damage == "reshape":
        named[3] = (victim, named[3][1].reshape(-1))
    else:
        named.append(("value_head.weight", torch.zeros(1, 64)))
    with pytest.raises(SyncError, match="does not match the model checkpoint's tensors"):
        check_against_checkpoint(_update(named), checkpoint_tensors(tiny_model_path))


def test_buckets_that_hold_more_bytes_than_their_tensors_fail_the_sync(tiny_model_path, weights):
    import dataclasses

    update = _update(weights)
    padded = dataclasses.replace(update, nbytes=update.nbytes + 1)
    with pytest.raises(SyncError, match=f"buckets hold {update.nbytes + 1} bytes but their tensors need "
                                        f"{update.nbytes}"):
        check_against_checkpoint(padded, checkpoint_tensors(tiny_model_path))


def test_shm_is_refused_across_nodes_and_auto_picks_by_node():
    assert choose_transport("auto", "a", ["a", "a"]) == "shm"
    assert choose_transport("auto", "a", ["a", "b"]) == "collective"
    assert choose_transport("shm", "a", ["a"]) == "shm"
    with pytest.raises(SyncError, match="sync.transport=shm needs every engine on learner rank 0's node"):
        choose_transport("shm", "a", ["a", "b"])


def test_canary_diff_fails_on_nan_inf_or_missing_logprobs():
    engine = [np.array([-1.0, -2.0]), np.array([], dtype=np.float32), np.array([-0.5])]
    learner = [np.array([-1.0, -2.25]), np.array([], dtype=np.float32), np.array([-0.5])]
    np.testing.assert_allclose(canary_diff(0, engine, learner), [0.0, -0.25, 0.0])
    for bad in (np.nan, np.inf, -np.inf):  # max(0, nan) is 0 and nan > tol is False: it would pass as "no diff"
        broken = [engine[0], engine[1], np.array([bad])]
        with pytest.raises(SyncError, match="canary: sequence 2: a non-finite logprob"):
            canary_diff(1, broken, learner)
        with pytest.raises(SyncError, match="canary: sequence 2: a non-finite logprob"):
            canary_diff(1, learner, broken)
    with pytest.raises(SyncError, match="canary: sequence 0: engine 1 gave 1 logprobs, the learner 2"):
        canary_diff(1, [np.array([-1.0]), *engine[1:]], learner)
    with pytest.raises(SyncError, match="engine 1 scored 2 sequences, the learner 3"):
        canary_diff(1, engine[:2], learner)


def _stats(frac, worst=0.5, mean=0.01, tokens=1000.0, nonfinite=0.0, **engines):
    key = "rollout/engine_learner_logprob"
    return {f"{key}_frac_over_tol": frac, f"{key}_max_abs_diff": worst, f"{key}_mean_abs_diff": mean,
            f"{key}_tokens_checked": tokens, f"{key}_nonfinite": nonfinite,
            **{f"{key}_{e}": v for e, v in engines.items()}}


def test_on_policy_check_enforces_tolerance_and_fraction(caplog):
    assert check_on_policy(_stats(0.0, worst=1e-5), SyncConfig(), 0) == "passed"
    # No check in these stats (learner.old_logprobs=update): the caller must look on, in update()'s stats
    assert check_on_policy({"kl/mean": 0.0}, SyncConfig(), 0) == "deferred"
    with pytest.raises(OnPolicyError, match="no on-policy check in prepare or update"):  # and the last place it looks
        check_on_policy({"kl/mean": 0.0}, SyncConfig(), 3, required=True)
    assert check_on_policy(_stats(0.0, worst=1e-5), SyncConfig(), 3, required=True) == "passed"
    with pytest.raises(OnPolicyError, match=r"iteration 4: on-policy check failed on the batch: 0.10% of the "):
        check_on_policy(_stats(0.001), SyncConfig(), 4)
    assert check_on_policy(_stats(0.001), SyncConfig(on_policy_max_frac=0.01), 4) == "passed"  # bf16 allowance
    with caplog.at_level(logging.WARNING):
        assert check_on_policy(_stats(0.5), SyncConfig(on_policy_action="warn"), 2) == "passed"
    assert "on-policy check failed" in caplog.text


def test_on_policy_check_that_compared_nothing_says_so():
    """One-step-off rows of the previous version: nothing compared is 'not_checked' (the driver then runs the
    canary), never a pass with differences of 0."""
    key = "rollout/engine_learner_logprob"
    assert check_on_policy({f"{key}_tokens_checked": 0.0}, SyncConfig(), 5) == "not_checked"
    assert check_on_policy({f"{key}_tokens_checked": 0.0}, SyncConfig(), 5, required=True) == "not_checked"


def test_a_non_finite_logprob_fails_whatever_the_action():
    with pytest.raises(OnPolicyError, match="2 response tokens have a non-finite"):
        check_on_policy(_stats(0.0, worst=0.0, nonfinite=2.0), SyncConfig(), 4)
    with pytest.raises(OnPolicyError, match="non-finite"):
        check_on_policy(_stats(0.0, nonfinite=1.0), SyncConfig(on_policy_action="warn", on_policy_max_frac=0.5), 4)


def test_a_failed_on_policy_check_names_the_engines_whose_rows_fail():
    with pytest.raises(OnPolicyError, match=r"failed on engine 1 \(40.00% over, KL 0\), engine 3 \(2.00% over, "):
        check_on_policy(_stats(0.1, engine0_frac_over_tol=0.0, engine1_frac_over_tol=0.4,
                               engine2_frac_over_tol=0.01, engine3_frac_over_tol=0.02),
                        SyncConfig(on_policy_max_frac=0.015), 7)


def test_the_mismatch_kl_stops_what_the_fraction_lets_through():
    """bf16-style settings allow a fraction of tokens over tolerance; a mismatch KL beyond sync.max_mismatch_kl
    (here engine 1's) still fails, naming the engine. Off (0) by default."""
    key = "rollout/engine_learner_logprob"
    stats = {**_stats(0.01, engine0_frac_over_tol=0.01, engine1_frac_over_tol=0.01, engine0_k3_kl=1e-4,
                      engine1_k3_kl=5e-2), f"{key}_k3_kl": 2.5e-2}
    assert check_on_policy(stats, SyncConfig(on_policy_max_frac=0.05), 3) == "passed"
    with pytest.raises(OnPolicyError, match=r"failed on engine 1 \(1.00% over, KL 0.05\): .* mismatch KL 0.025"):
        check_on_policy(stats, SyncConfig(on_policy_max_frac=0.05, max_mismatch_kl=1e-2), 3)


def test_canary_schedule():
    assert [v for v in range(1, 25) if canary_due(v, 10)] == [1, 11, 21]
    assert all(canary_due(v, 1) for v in range(1, 5))
    assert not any(canary_due(v, 0) for v in range(1, 5))


def test_canary_judges_the_whole_set_of_tokens_not_the_worst_one():
    """1 of 8 canary tokens differs by 0.3. fp32 settings (no fraction allowed) stop the run naming the engine;
    bf16-style settings (a fraction allowed) pass it, and a mismatch KL above sync.max_mismatch_kl stops it again."""
    log_r = canary_diff(1, [np.array([-1.0, -1.0, -1.3, -1.0]), np.full(4, -2.0)], [np.full(4, -1.0), np.full(4, -2.0)])
    with pytest.raises(SyncError, match=r"canary: engine 1 .* 0.3 at most: 12.50% of 8 tokens over"):
        canary_verdict(1, log_r, SyncConfig())
    st = canary_verdict(1, log_r, SyncConfig(canary_tolerance=0.1, canary_max_frac=0.2))
    assert st["sync/logprob_max_abs_diff"] == pytest.approx(0.3) and st["sync/canary_frac_over_tol"] == 0.125
    assert st["sync/canary_k3_kl"] == pytest.approx((math.exp(0.3) - 1 - 0.3) / 8)
    with pytest.raises(SyncError, match=r"engine 1 .* mismatch KL 0.0062"):
        canary_verdict(1, log_r, SyncConfig(canary_tolerance=0.1, canary_max_frac=0.2, max_mismatch_kl=1e-3))
