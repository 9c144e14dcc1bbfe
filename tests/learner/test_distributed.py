"""The DeepSpeed learner group, for real: gloo ranks in Ray actors on a tiny Llama.

- 2 ZeRO-2 ranks end in the same state as 1 rank on the same batch;
- after an update every trainable parameter changed;
- ZeRO-3 exports exactly the bytes ZeRO-2 exports for the same weights, and trains to the same state;
- the engine/learner logprob statistics (the on-policy check) cover every rank's rows: 2 ranks report what 1 does;
- update() accumulates gradients over micro-batches (learner.forward_batch_size) into one step: 2 ranks of 2
  micro-batches each end where 1 rank of one micro-batch does;
- learner.old_logprobs=update (critic-free, one step per batch) trains exactly as a separate forward does, and its
  on-policy check covers every token of every rank.
"""

import numpy as np
import pyarrow as pa
import pytest

from actors.rollout_worker import SyncConfig
from learner.group import LearnerGroup
from learner.learner_worker import LearnerConfig
from oirl.batch import add_column, make_rollout_batch
from oirl.sync import OnPolicyError, check_on_policy

pytestmark = pytest.mark.slow

N = 8


def make_batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(3, 9)).tolist() for _ in range(N)]
    responses = [rng.integers(3, vocab, rng.integers(1, 12)).tolist() for _ in range(N)]
    # "Engine" logprobs: 0 everywhere, except row 1 (rank 1's first row with 2 ranks) that is off by ~50.
    engine_lp = [[50.0 if i == 1 else 0.0] * len(r) for i, r in enumerate(responses)]
    table = make_rollout_batch(list(range(N)), [0] * N, prompts, responses, engine_lp, ["length"] * N, 0)
    return add_column(table, "reward", rng.normal(size=N).astype(np.float32))


def train_once(path, run_id, ranks, stage, batch, lr=1e-3, forward_batch_size=8):
    cfg = LearnerConfig(num_ranks=ranks, zero_stage=stage, lr=lr, ppo_epochs=2, num_minibatches=1,
                        num_cpus=0.5, kl_coef=0.1, entropy_coef=0.01, timeout_s=600,
                        forward_batch_size=forward_batch_size)
    group = LearnerGroup(cfg, path, "float32", seed=0, temperature=1.0, run_id=f"{run_id}-{ranks}-{stage}",
                         micro_batch=N // ranks)
    try:
        before = group.call_rank0("full_state")
        export0 = group.call_rank0("export_weights", 0, "object_store", 1)
        prep = group.call_rank0("prepare", batch, 0)
        stats = group.call_rank0("update")
        after = group.call_rank0("full_state")
        # The same rows scored again by the updated policy, with one engine logprob NaN on row 3 (rank 1's with 2
        # ranks): the KL to the reference is no longer 0, and the NaN is counted wherever it lives.
        lps = batch.column("response_logprobs").to_pylist()
        lps[3][0] = float("nan")
        nan_batch = batch.set_column(batch.schema.get_field_index("response_logprobs"), "response_logprobs",
                                     pa.array(lps, type=batch.schema.field("response_logprobs").type))
        after_prep = group.call_rank0("prepare", nan_batch, 0)
        return before, after, export0, prep, stats, after_prep
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_path):
    from transformers import AutoConfig

    batch = make_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    # One rank takes its 8 rows in one forward; the 2-rank groups take their 4 rows as 2 micro-batches of 2.
    return {key: train_once(tiny_model_path, "dist", ranks, stage, batch, forward_batch_size=fbs)
            for key, (ranks, stage, fbs) in {"1r_z2": (1, 2, 8), "2r_z2": (2, 2, 2), "2r_z3": (2, 3, 2)}.items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_policy_starts_equal_to_reference(runs):
    _, _, _, prep, *_ = runs["2r_z2"]
    assert prep["kl/mean"] == 0.0
    assert prep["learner/tokens"] > 0


def test_two_ranks_match_one_rank(runs):
    b1, a1, _, _, s1, _ = runs["1r_z2"]
    b2, a2, _, _, s2, _ = runs["2r_z2"]
    assert max_diff(b1, b2) == 0.0
    moved = max_diff(b1, a1)
    assert moved > 1e-4  # the update really moved the weights
    assert max_diff(a1, a2) < 1e-5 * max(1.0, moved * 100)
    assert s1["learner/policy_loss"] == pytest.approx(s2["learner/policy_loss"], rel=1e-4, abs=1e-6)


def test_every_trainable_parameter_changed(runs):
    before, after, *_ = runs["2r_z2"]
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def test_zero3_export_equals_zero2_export(runs):
    _, _, e2, *_ = runs["2r_z2"]
    _, _, e3, *_ = runs["2r_z3"]
    assert e2.nbytes == e3.nbytes > 0
    assert [m.name for b in e2.buckets for m in b.tensors] == [m.name for b in e3.buckets for m in b.tensors]
    assert e2.fingerprint == e3.fingerprint


def test_zero3_trains_like_zero2(runs):
    _, a2, *_ = runs["2r_z2"]
    _, a3, *_ = runs["2r_z3"]
    assert max_diff(a2, a3) < 1e-4


def test_on_policy_statistics_cover_every_rank(runs):
    key = "rollout/engine_learner_logprob"
    one, two = runs["1r_z2"][3], runs["2r_z2"][3]
    # Row 1 lives on rank 1: a max taken on rank 0 alone would miss it.
    assert two[f"{key}_max_abs_diff"] > 50
    for stat in ("max_abs_diff", "mean_abs_diff", "frac_over_tol"):
        assert two[f"{key}_{stat}"] == pytest.approx(one[f"{key}_{stat}"], rel=1e-5), stat
    # Every token's engine logprob (0 or 50) is far from the learner's (< 0): all of them are over tolerance.
    assert one[f"{key}_frac_over_tol"] == 1.0
    assert one[f"{key}_nonfinite"] == two[f"{key}_nonfinite"] == 0


def test_a_nan_logprob_on_rank_1_fails_the_check(runs):
    """gloo's MAX all-reduce may drop a NaN and NaN > tol counts nothing: the NaN is counted instead, on any rank."""
    key = "rollout/engine_learner_logprob"
    for name in ("1r_z2", "2r_z2", "2r_z3"):
        stats = runs[name][5]
        assert stats[f"{key}_nonfinite"] == 1, name
        assert np.isfinite(stats[f"{key}_max_abs_diff"]) and stats[f"{key}_max_abs_diff"] > 50, name
        with pytest.raises(OnPolicyError, match="1 response tokens have a non-finite"):
            check_on_policy(stats, SyncConfig(on_policy_max_frac=0.99), 0)


def test_kl_to_the_reference_is_measured_after_an_update(runs):
    """kl/mean is 0 before any step (policy == reference) and not after: the reference really is scored."""
    for name in ("1r_z2", "2r_z2"):
        before, after = runs[name][3], runs[name][5]
        assert before["kl/mean"] == 0.0
        assert abs(after["kl/mean"]) > 1e-4, (name, after["kl/mean"])
        assert after["kl/mean"] == pytest.approx(runs["1r_z2"][5]["kl/mean"], rel=1e-3)


def test_critic_free_without_kl_builds_no_critic_and_no_reference(ray_cluster, tiny_model_path):
    """grpo with kl_coef=0: no reference model is loaded and no value head exists; it still trains."""
    import pyarrow as pa
    from transformers import AutoConfig

    batch = make_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    # Two prompts of 4 samples each: GRPO's groups (one sample per prompt would give every advantage 0).
    batch = batch.set_column(0, "prompt_id", pa.array([i // 4 for i in range(N)], type=pa.int64()))
    built = {}
    for algorithm, kl_coef in (("ppo", 0.1), ("grpo", 0.0)):
        cfg = LearnerConfig(num_ranks=1, algorithm=algorithm, kl_coef=kl_coef, lr=1e-3, num_minibatches=1,
                            num_cpus=0.5, timeout_s=600, max_new_tokens=12)
        group = LearnerGroup(cfg, tiny_model_path, "float32", 0, 1.0, f"built-{algorithm}", micro_batch=N)
        try:
            built[algorithm] = group.call_rank0("built")
            before = group.call_rank0("full_state")
            prep = group.call_rank0("prepare", batch, 0)
            group.call_rank0("update")
            after = group.call_rank0("full_state")
        finally:
            group.shutdown()
        assert max_diff(before, after) > 1e-5, f"{algorithm} did not train"
        assert prep["learner/tokens"] > 0
    assert built["ppo"]["reference"] and built["ppo"]["value_head"]
    assert not built["grpo"]["reference"] and not built["grpo"]["value_head"]
    assert built["ppo"]["trainable_params"] - built["grpo"]["trainable_params"] == 64 + 1  # the value head


def test_old_logprobs_from_the_update_pass(ray_cluster, tiny_model_path):
    """GRPO, one step per batch: taking the old logprobs from update()'s own forward (no prepare forward) ends in
    the same weights as a separate forward, and its on-policy check still sees every rank's tokens (row 1, on rank
    1, is off by ~50)."""
    import pyarrow as pa
    from transformers import AutoConfig

    batch = make_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    batch = batch.set_column(0, "prompt_id", pa.array([i // 4 for i in range(N)], type=pa.int64()))
    out = {}
    for mode in ("forward", "update", "autocast"):
        cfg = LearnerConfig(num_ranks=2, algorithm="grpo", kl_in_loss=True, kl_coef=0.1, lr=1e-3,
                            num_minibatches=1, num_cpus=0.5, timeout_s=600, max_new_tokens=12,
                            forward_batch_size=2, old_logprobs="forward" if mode == "autocast" else mode,
                            update_autocast="bfloat16" if mode == "autocast" else "")
        group = LearnerGroup(cfg, tiny_model_path, "float32", 0, 1.0, f"oldlp-{mode}", micro_batch=N // 2)
        try:
            before = group.call_rank0("full_state")
            prep = group.call_rank0("prepare", batch, 0)
            upd = group.call_rank0("update")
            out[mode] = (before, group.call_rank0("full_state"), prep, upd)
        finally:
            group.shutdown()
    key = "rollout/engine_learner_logprob"
    (b_f, a_f, prep_f, upd_f), (b_u, a_u, prep_u, upd_u) = out["forward"], out["update"]
    assert f"{key}_max_abs_diff" in prep_f and f"{key}_max_abs_diff" not in upd_f
    assert f"{key}_max_abs_diff" in upd_u and f"{key}_max_abs_diff" not in prep_u  # checked in update, not skipped
    for stat in ("max_abs_diff", "mean_abs_diff", "frac_over_tol", "tokens_checked"):
        assert upd_u[f"{key}_{stat}"] == pytest.approx(prep_f[f"{key}_{stat}"], rel=1e-5), stat
    assert upd_u[f"{key}_max_abs_diff"] > 50
    assert upd_u["rollout/entropy"] == pytest.approx(prep_f["rollout/entropy"], rel=1e-5)
    moved = max_diff(b_f, a_f)
    assert max_diff(b_f, b_u) == 0.0 and moved > 1e-4
    assert max_diff(a_f, a_u) < 1e-5 * max(1.0, moved * 100)
    # learner.update_autocast=bfloat16: the update computes in bf16 (a different step, but near the fp32 one), while
    # prepare's scoring and its check stay in fp32.
    b_a, a_a, prep_a, upd_a = out["autocast"]
    assert prep_a[f"{key}_max_abs_diff"] == pytest.approx(prep_f[f"{key}_max_abs_diff"], rel=1e-6)
    step_f = np.concatenate([(a_f[k] - b_f[k]).ravel() for k in sorted(a_f)])
    step_a = np.concatenate([(a_a[k] - b_a[k]).ravel() for k in sorted(a_a)])
    assert max_diff(a_f, a_a) > 0  # it did compute in bf16
    assert step_f @ step_a / (np.linalg.norm(step_f) * np.linalg.norm(step_a)) > 0.9  # nearly the same step
    assert upd_a["learner/approx_kl"] != 0.0 and upd_f["learner/approx_kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode,cap", [("token_mean", 0.0), ("seq_mean_token_sum", 0.0), ("token_mean", 2.0)])
def test_policy_loss_is_aggregated_as_the_loss_is(ray_cluster, tiny_model_path, mode, cap):
    """learner/policy_loss follows learner.loss_aggregation (it was a token mean whatever the setting). GRPO without
    KL, one step: before the step the ratio is 1, so the clipped surrogate of token t of row i is -A_i, and the
    loss is -sum_i n_i A_i over the tokens (token_mean) or over token_norm x the rows (seq_mean_token_sum).

    cap > 0: learner.rollout_correction=tis on rows whose engine logprob is -50, so every truncated importance
    weight min(pi / mu, cap) is the cap: the weights reach the loss only if it doubles. Otherwise no correction
    (the engine logprobs of 0 here are no engine's)."""
    import torch
    from transformers import AutoConfig

    from learner.algorithms.grpo import grpo_advantages

    vocab = AutoConfig.from_pretrained(tiny_model_path).vocab_size
    rng = np.random.default_rng(3)
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    lengths = [1, 9, 4, 2, 7, 3, 5, 11]
    rewards = np.array([0.0, 1.0, 0.2, 0.9, 1.0, 0.1, 0.5, 0.4], dtype=np.float32)
    table = make_rollout_batch(groups, [0, 1] * 4, [rng.integers(3, vocab, 5).tolist() for _ in groups],
                               [rng.integers(3, vocab, n).tolist() for n in lengths],
                               [[-50.0 if cap else 0.0] * n for n in lengths],
                               ["length"] * N, 0)
    cfg = LearnerConfig(num_ranks=1, algorithm="grpo", kl_coef=0.0, loss_aggregation=mode, max_new_tokens=16,
                        ppo_epochs=1, num_minibatches=1, num_cpus=0.5, timeout_s=600, old_logprobs="forward",
                        rollout_correction="tis" if cap else "none", importance_cap=cap or 2.0)
    group = LearnerGroup(cfg, tiny_model_path, "float32", seed=0, temperature=1.0, run_id=f"agg-{mode}-{cap}",
                         micro_batch=N)
    try:
        prep = group.call_rank0("prepare", add_column(table, "reward", rewards), 0)
        stats = group.call_rank0("update")
    finally:
        group.shutdown()
    n = torch.tensor(lengths, dtype=torch.float64)
    mask = (torch.arange(16)[None, :] < n[:, None]).double()
    adv = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), mask)[:, 0]
    want = float(-(n * adv).sum() / (n.sum() if mode == "token_mean" else 16 * len(groups))) * (cap or 1.0)
    assert abs(want) > 0.01
    if cap:
        assert prep["learner/is_truncated_frac"] == 1.0 and prep["learner/is_weight_mean"] == cap
        assert prep["rollout/mismatch_k3_kl"] > 40  # r - 1 - log r with log r ~ 50 - |lp|: a huge mismatch
    assert stats["learner/policy_loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
