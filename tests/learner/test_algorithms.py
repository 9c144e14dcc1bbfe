"""Critic-free advantage estimators and loss pieces: hand-computed cases, plain-loop second implementations on random
ragged batches with interleaved groups, and the whole path on the ``meta`` device (no tensor created off the inputs'
device)."""

import math
import statistics

import numpy as np
import pytest
import torch

from learner import ppo
from learner.algorithms import (
    aggregate,
    correction_weights,
    group_index,
    grpo_advantages,
    gspo_policy_loss,
    kl_loss_k3,
    masked_moments,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    whiten_by_moments,
)

META = torch.device("meta")


def ragged_mask(lengths, r_max=None):
    r_max = r_max or max(lengths)
    mask = torch.zeros(len(lengths), r_max)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return mask


def per_sequence(adv, mask):
    """[B, R] advantages that must be constant over each row's valid tokens and 0 on padding -> [B]."""
    for i in range(adv.shape[0]):
        n = int(mask[i].sum())
        assert torch.all(adv[i, n:] == 0), f"row {i}: non-zero advantage on padding"
        if n:
            assert torch.all(adv[i, :n] == adv[i, 0]), f"row {i}: advantage differs across tokens"
    return adv[:, 0]


# ---- second implementations: scalar Python loops over a dict of groups ----

def groups_of(group_ids):
    out = {}
    for i, g in enumerate(group_ids):
        out.setdefault(g, []).append(i)
    return out


def grpo_plain(rewards, group_ids, scale_by_std, eps):
    adv = [0.0] * len(rewards)
    for members in groups_of(group_ids).values():
        rs = [rewards[i] for i in members]
        if len(set(rs)) == 1:
            continue
        mean, std = statistics.fmean(rs), statistics.pstdev(rs)
        for i in members:
            adv[i] = (rewards[i] - mean) / (std + eps) if scale_by_std else rewards[i] - mean
    return adv


def rloo_plain(rewards, group_ids):
    adv = [0.0] * len(rewards)
    for members in groups_of(group_ids).values():
        if len(members) < 2:
            continue
        for i in members:
            others = [rewards[j] for j in members if j != i]
            adv[i] = rewards[i] - sum(others) / len(others)
    return adv


def returns_plain(score, kl, kl_coef, gamma):
    """One unpadded sequence: per-token reward -kl_coef*kl, score added on the last token, discounted return-to-go."""
    r = [-kl_coef * k for k in kl]
    r[-1] += score
    out, running = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        running = r[t] + gamma * running
        out[t] = running
    return out


# ---- GRPO ----

def test_grpo_group_of_four_hand_computed():
    # rewards 1, 2, 3, 6: mean 3, deviations -2, -1, 0, 3; population variance (4+1+0+9)/4 = 3.5.
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mask = ragged_mask([3, 1, 2, 4])
    adv = per_sequence(grpo_advantages(rewards, torch.tensor([5, 5, 5, 5]), mask, eps=0.0), mask)
    s = math.sqrt(3.5)  # 1.8708
    np.testing.assert_allclose(adv.numpy(), [-2 / s, -1 / s, 0.0, 3 / s], rtol=1e-6)
    np.testing.assert_allclose(adv.numpy(), [-1.069045, -0.534522, 0.0, 1.603567], rtol=1e-5)
    # Dr. GRPO: no division by the std.
    drgrpo = per_sequence(grpo_advantages(rewards, torch.tensor([5, 5, 5, 5]), mask, scale_by_std=False), mask)
    np.testing.assert_allclose(drgrpo.numpy(), [-2.0, -1.0, 0.0, 3.0], rtol=1e-6)
    # eps sits beside the std: 3 / (sqrt(3.5) + 0.5) = 1.265...
    eps_adv = per_sequence(grpo_advantages(rewards, torch.tensor([5, 5, 5, 5]), mask, eps=0.5), mask)
    np.testing.assert_allclose(eps_adv[3].item(), 3 / (s + 0.5), rtol=1e-6)


def test_grpo_interleaved_groups_singleton_and_constant_group():
    # group 7 at rows 0, 2, 5, 6 has rewards 1, 2, 3, 6 (as above); group -3 at rows 1, 3, 4, 7 has 0, 0, 0, 1:
    #   mean 1/4, deviations -1/4 x3 and 3/4, variance (3/16 + 9/16)/4 = 3/16, std sqrt(3)/4
    #   -> -1/sqrt(3) x3 and sqrt(3);
    # group 42 (row 8) is alone -> 0; group 9 (rows 9, 10, 11) has three rewards of 0.1 -> exactly 0, although
    # 0.1 + 0.1 + 0.1 rounds, so r - mean is not exactly 0 in float32.
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 6.0, 1.0, 5.0, 0.1, 0.1, 0.1])
    groups = torch.tensor([7, -3, 7, -3, -3, 7, 7, -3, 42, 9, 9, 9])
    mask = ragged_mask([2, 3, 1, 4, 4, 2, 1, 3, 2, 1, 2, 3])
    adv = per_sequence(grpo_advantages(rewards, groups, mask, eps=0.0), mask)
    s, r3 = math.sqrt(3.5), math.sqrt(3.0)
    expected = [-2 / s, -1 / r3, -1 / s, -1 / r3, -1 / r3, 0.0, 3 / s, r3, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(adv[8:] == 0)


def test_group_index_is_dense_and_order_free():
    idx = group_index(torch.tensor([40, -2, 40, 7, -2, 1000]))
    # sorted distinct ids -2, 7, 40, 1000 -> 0, 1, 2, 3
    assert idx.tolist() == [2, 0, 2, 1, 0, 3]


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_plain_loop_on_random_interleaved_batch(scale_by_std):
    g = torch.Generator().manual_seed(0)
    b = 37
    rewards = torch.randn(b, generator=g, dtype=torch.float64)
    rewards[:6] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # some binary rewards too
    groups = torch.randint(0, 9, (b,), generator=g)  # shuffled, uneven sizes, likely some singletons
    lengths = torch.randint(0, 6, (b,), generator=g).tolist()
    mask = ragged_mask(lengths, 6).double()
    adv = grpo_advantages(rewards, groups, mask, scale_by_std=scale_by_std, eps=1e-6)
    ref = grpo_plain(rewards.tolist(), groups.tolist(), scale_by_std, 1e-6)
    np.testing.assert_allclose(adv.numpy(), (torch.tensor(ref, dtype=torch.float64)[:, None] * mask).numpy(),
                               rtol=1e-10, atol=1e-12)
    assert torch.all(adv[mask == 0] == 0)


# ---- RLOO ----

def test_rloo_group_of_four_hand_computed():
    # rewards 1, 2, 3, 6; baseline = mean of the other three:
    #   1 - (2+3+6)/3 = -8/3;  2 - (1+3+6)/3 = -4/3;  3 - (1+2+6)/3 = 0;  6 - (1+2+3)/3 = 4
    # (= 4/3 * (r - 3), the k/(k-1) scaled mean-centred reward).
    mask = ragged_mask([1, 3, 2, 2])
    adv = per_sequence(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0, 0, 0, 0]), mask), mask)
    np.testing.assert_allclose(adv.numpy(), [-8 / 3, -4 / 3, 0.0, 4.0], rtol=1e-6, atol=1e-6)


def test_rloo_interleaved_groups_and_singleton():
    # group 11 at rows 3, 0, 5, 1 (rewards 6, 1, 3, 2 -> 4, -8/3, 0, -4/3); group 2 at rows 2, 4 with rewards 1, 0
    # -> 1 - 0 = 1 and 0 - 1 = -1; group 8 (row 6) alone -> 0.
    rewards = torch.tensor([1.0, 2.0, 1.0, 6.0, 0.0, 3.0, 9.0])
    groups = torch.tensor([11, 11, 2, 11, 2, 11, 8])
    mask = ragged_mask([2, 1, 3, 2, 1, 2, 2])
    adv = per_sequence(rloo_advantages(rewards, groups, mask), mask)
    np.testing.assert_allclose(adv.numpy(), [-8 / 3, -4 / 3, 1.0, 4.0, -1.0, 0.0, 0.0], rtol=1e-6, atol=1e-6)


def test_rloo_matches_plain_loop_on_random_interleaved_batch():
    g = torch.Generator().manual_seed(1)
    b = 41
    rewards = torch.randn(b, generator=g, dtype=torch.float64)
    groups = torch.randint(-5, 6, (b,), generator=g)
    mask = ragged_mask(torch.randint(0, 5, (b,), generator=g).tolist(), 5).double()
    adv = rloo_advantages(rewards, groups, mask)
    ref = torch.tensor(rloo_plain(rewards.tolist(), groups.tolist()), dtype=torch.float64)
    np.testing.assert_allclose(adv.numpy(), (ref[:, None] * mask).numpy(), rtol=1e-10, atol=1e-12)


# ---- REINFORCE++ ----

def test_reinforce_pp_returns_hand_computed():
    # Row 0: 3 tokens, kl 0.1, 0.2, 0.3, kl_coef 0.5, score 1 -> token rewards -0.05, -0.1, -0.15 + 1 = 0.85.
    #   gamma 1:   returns 0.7, 0.75, 0.85
    #   gamma 0.5: G2 = 0.85, G1 = -0.1 + 0.5*0.85 = 0.325, G0 = -0.05 + 0.5*0.325 = 0.1125
    # Row 1: 1 token, kl 0.2, score -1 -> -1 - 0.1 = -1.1; the garbage kl on its padding must not leak in.
    score = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.2, 50.0, 50.0]])
    mask = ragged_mask([3, 1])
    np.testing.assert_allclose(reinforce_pp_returns(score, kl, mask, 0.5).numpy(),
                               [[0.7, 0.75, 0.85], [-1.1, 0.0, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reinforce_pp_returns(score, kl, mask, 0.5, gamma=0.5).numpy(),
                               [[0.1125, 0.325, 0.85], [-1.1, 0.0, 0.0]], rtol=1e-6, atol=1e-7)


def test_reinforce_pp_group_of_four_hand_computed():
    # Four one-token responses, no KL: returns = rewards 1, 2, 3, 6, normalised over the 4 valid tokens:
    # mean 3, variance 3.5 -> (-2, -1, 0, 3) / sqrt(3.5 + 1e-8). The padding (row 0 has a 2nd, masked slot) is 0.
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.zeros(4, 2), mask, kl_coef=0.1)
    s = math.sqrt(3.5 + 1e-8)
    np.testing.assert_allclose(adv.numpy(), [[-2 / s, 0], [-1 / s, 0], [0, 0], [3 / s, 0]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_plain_loop_and_is_globally_normalised(gamma):
    g = torch.Generator().manual_seed(2)
    lengths = [5, 1, 3, 7, 2, 6]
    mask = ragged_mask(lengths, 8).double()
    score = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    kl = torch.rand(len(lengths), 8, generator=g, dtype=torch.float64)
    kl = kl * mask + (1 - mask) * 1e3  # garbage on padding
    ret = reinforce_pp_returns(score, kl, mask, 0.2, gamma)
    flat = []
    for i, n in enumerate(lengths):
        ref = returns_plain(score[i].item(), kl[i, :n].tolist(), 0.2, gamma)
        np.testing.assert_allclose(ret[i, :n].numpy(), ref, rtol=1e-10, atol=1e-12)
        assert torch.all(ret[i, n:] == 0)
        flat += ref
    adv = reinforce_pp_advantages(score, kl, mask, 0.2, gamma)
    mean, std = statistics.fmean(flat), statistics.pstdev(flat)
    for i, n in enumerate(lengths):
        ref = [(x - mean) / math.sqrt(std**2 + 1e-8) for x in flat[sum(lengths[:i]): sum(lengths[:i]) + n]]
        np.testing.assert_allclose(adv[i, :n].numpy(), ref, rtol=1e-8, atol=1e-10)
        assert torch.all(adv[i, n:] == 0)
    # Two "ranks" holding rows 0::2 and 1::2: summed moments normalise each shard as the whole batch would be.
    moments = masked_moments(ret[0::2], mask[0::2]) + masked_moments(ret[1::2], mask[1::2])
    np.testing.assert_allclose(moments.numpy(), [sum(lengths), sum(flat), sum(x * x for x in flat)], rtol=1e-10)
    np.testing.assert_allclose(whiten_by_moments(ret[1::2], mask[1::2], moments).numpy(), adv[1::2].numpy(),
                               rtol=1e-8, atol=1e-10)
    # ... and agrees with ppo.masked_whiten, the float path the learner already uses for PPO.
    m = moments[1].item() / moments[0].item()
    old = ppo.masked_whiten(ret, mask, m, moments[2].item() / moments[0].item() - m * m)
    np.testing.assert_allclose(old.numpy(), adv.numpy(), rtol=1e-8, atol=1e-10)


# ---- losses ----

def aggregation_case():
    # row 0: tokens 1, 2, 3 (+ a masked 100); row 1: token 4; row 2: empty response (all masked).
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
    return per_token, ragged_mask([3, 1, 0], 4)


def test_aggregate_modes_hand_computed():
    x, mask = aggregation_case()
    # token_mean: (1+2+3+4)/4 valid tokens = 2.5; with a given (e.g. global/world) token count 8: 10/8.
    assert aggregate(x, mask, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(x, mask, "token_mean", denominator=8.0).item() == pytest.approx(1.25)
    # seq_mean_token_mean: per-sequence means 2 and 4 over the 2 non-empty rows -> 3; denominator 4 -> 6/4.
    assert aggregate(x, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(x, mask, "seq_mean_token_mean", denominator=4).item() == pytest.approx(1.5)
    # seq_mean_token_sum with token_norm 4 (Dr. GRPO): (6/4 + 4/4) / 2 = 1.25; denominator 5 -> 2.5/5.
    assert aggregate(x, mask, "seq_mean_token_sum", token_norm=4).item() == pytest.approx(1.25)
    assert aggregate(x, mask, "seq_mean_token_sum", 5.0, token_norm=4).item() == pytest.approx(0.5)


def test_aggregate_weights_tokens_differently():
    # Gradient per token: token_mean gives every token 1/4; seq_mean_token_mean gives row 0's tokens 1/(3*2)
    # and row 1's token 1/(1*2); the Dr. GRPO constant gives every token 1/(4*2). Padding gets nothing.
    _, mask = aggregation_case()
    expected = {
        "token_mean": [[1 / 4] * 3 + [0], [1 / 4, 0, 0, 0], [0] * 4],
        "seq_mean_token_mean": [[1 / 6] * 3 + [0], [1 / 2, 0, 0, 0], [0] * 4],
        "seq_mean_token_sum": [[1 / 8] * 3 + [0], [1 / 8, 0, 0, 0], [0] * 4],
    }
    for mode, grad in expected.items():
        x = aggregation_case()[0].requires_grad_(True)
        aggregate(x, mask, mode, token_norm=4).backward()
        np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-6, err_msg=mode)


def test_aggregate_rejects_missing_token_norm_and_unknown_mode():
    x, mask = aggregation_case()
    with pytest.raises(ValueError, match="token_norm"):
        aggregate(x, mask, "seq_mean_token_sum")
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(x, mask, "sequence_mean")


def test_kl_loss_k3_value_and_gradient():
    # pi = 0.5, ref = 0.25: ref/pi = 0.5 -> k3 = 0.5 - ln 0.5 - 1 = 0.193147; d/dlogp = 1 - ref/pi = 0.5.
    # pi = ref -> 0 with gradient 0; pi = 0.25, ref = 0.5: ref/pi = 2 -> 2 - ln 2 - 1 = 0.306853, grad 1 - 2 = -1.
    logp = torch.log(torch.tensor([0.5, 0.3, 0.25])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.25, 0.3, 0.5])).requires_grad_(True)
    loss = kl_loss_k3(logp, ref)
    np.testing.assert_allclose(loss.detach().numpy(), [0.5 + math.log(2) - 1, 0.0, 1 - math.log(2)],
                               rtol=1e-5, atol=1e-7)
    loss.sum().backward()
    np.testing.assert_allclose(logp.grad.numpy(), [0.5, 0.0, -1.0], rtol=1e-5, atol=1e-6)
    assert ref.grad is None  # the reference is not trained through the KL term


# ---- device discipline ----

def test_every_function_stays_on_the_inputs_device():
    b, r = 6, 5
    rewards = torch.empty(b, device=META)
    groups = torch.empty(b, dtype=torch.long, device=META)
    mask = torch.empty(b, r, device=META)
    logp, ref, beh = (torch.empty(b, r, device=META) for _ in range(3))
    kl = ppo.kl_estimate(logp, ref, "k3") * mask
    outs = [group_index(groups), grpo_advantages(rewards, groups, mask),
            grpo_advantages(rewards, groups, mask, scale_by_std=False), rloo_advantages(rewards, groups, mask),
            reinforce_pp_returns(rewards, kl, mask, 0.05), reinforce_pp_returns(rewards, kl, mask, 0.05, 0.9),
            reinforce_pp_advantages(rewards, kl, mask, 0.05)]
    ret = outs[4]
    outs.append(whiten_by_moments(ret, mask, masked_moments(ret, mask)))
    per_token = ppo.policy_loss(logp, beh, outs[1], 0.2)[0] + 0.04 * kl_loss_k3(logp, ref)
    weights, stats = correction_weights(beh, logp, mask, "tis", cap=2.0)
    gspo, gspo_clipped = gspo_policy_loss(logp, beh, outs[1], mask, 0.2, 0.28)
    outs += [gspo, gspo_clipped, overlong_penalty(groups, 16, 4)]
    outs += [per_token, weights, *stats.values()]
    outs += [aggregate(per_token * weights, mask, m, token_norm=64) for m in
             ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")]
    for i, t in enumerate(outs):
        assert t.device == META, f"output {i} left the inputs' device"
    for t in outs[1:8]:
        assert t.shape == (b, r)


# ---- which estimator each learner.algorithm uses, and the policy's whole per-token loss ----

def test_per_token_advantages_picks_each_algorithms_estimator_by_hand():
    from types import SimpleNamespace

    from learner.algorithms.advantages import per_token_advantages

    def cfg(algorithm, **kw):
        return SimpleNamespace(algorithm=algorithm, kl_coef=0.5, kl_in_loss=False, gamma=1.0, gae_lambda=1.0,
                               grpo_scale_by_std=True, **kw)

    # This rank holds rows 1 and 3 of a batch of 5; groups {0, 1, 2} and {3, 4}; responses of 2 and 1 tokens.
    batch_rewards, groups = torch.tensor([1.0, 0.0, 2.0, 2.0, 2.0]), torch.tensor([7, 7, 7, 9, 9])
    rows, reward = torch.tensor([1, 3]), torch.tensor([0.0, 2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = torch.tensor([[0.2, 0.4], [0.1, 0.0]])
    # GRPO: group {1, 0, 2} has mean 1 and population std sqrt(2/3): row 1 gets -1.2247; {2, 2} is constant: 0.
    adv, ret = per_token_advantages(cfg("grpo"), reward, kl, mask, None, batch_rewards, groups, rows)
    assert ret is None
    a = -1 / math.sqrt(2 / 3)
    torch.testing.assert_close(adv, torch.tensor([[a, a], [0.0, 0.0]]))  # up to GRPO's eps in the std
    # RLOO: row 1's baseline is the mean of the others in its group, (1 + 2) / 2: 0 - 1.5.
    adv, _ = per_token_advantages(cfg("rloo"), reward, kl, mask, None, batch_rewards, groups, rows)
    assert torch.equal(adv, torch.tensor([[-1.5, -1.5], [0.0, 0.0]]))
    # REINFORCE++ (KL in the reward, gamma 1): row 1 earns -0.1, then 0 - 0.2: returns [-0.3, -0.2].
    adv, _ = per_token_advantages(cfg("reinforce_pp"), reward, kl, mask, None, batch_rewards, groups, rows)
    torch.testing.assert_close(adv, torch.tensor([[-0.3, -0.2], [2.0 - 0.05, 0.0]]))
    # PPO, lambda = gamma = 1: advantage = return - value; returns as above.
    values = torch.tensor([[0.5, 0.25], [1.0, 0.0]])
    adv, ret = per_token_advantages(cfg("ppo"), reward, kl, mask, values, batch_rewards, groups, rows)
    torch.testing.assert_close(ret, torch.tensor([[-0.3, -0.2], [1.95, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-0.8, -0.45], [0.95, 0.0]]))
    with pytest.raises(ValueError, match="needs the critic's values"):
        per_token_advantages(cfg("ppo"), reward, kl, mask, None, batch_rewards, groups, rows)
    with pytest.raises(ValueError, match="unknown learner.algorithm 'a2c'"):
        per_token_advantages(cfg("a2c"), reward, kl, mask, None, batch_rewards, groups, rows)


def test_policy_token_loss_by_hand():
    from types import SimpleNamespace

    from learner.algorithms import policy_token_loss

    cfg = SimpleNamespace(algorithm="ppo", clip_ratio=0.2, clip_ratio_high=0.0, value_clip=10.0, vf_coef=0.5,
                          kl_coef=0.1, kl_in_loss=True, entropy_coef=0.01)
    logp = torch.log(torch.tensor([[0.5]]))
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))  # entropy 1.5 ln 2
    mb = {"old_logprobs": logp.clone(), "advantages": torch.tensor([[2.0]]), "old_values": torch.tensor([[0.0]]),
          "returns": torch.tensor([[1.0]]), "ref_logprobs": torch.log(torch.tensor([[0.25]]))}
    values = torch.tensor([[0.5]])
    loss, parts = policy_token_loss(cfg, logp, logits, values, mb)
    k3 = 0.5 + math.log(2) - 1  # exp(ref - logp) - (ref - logp) - 1
    want = -2.0 + 0.5 * 0.5 * 0.25 + 0.1 * k3 - 0.01 * 1.5 * math.log(2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["pg"].item() == -2.0 and parts["vl"].item() == pytest.approx(0.125)
    # No shared critic (values None), importance weight 0.5, no KL in the loss, no entropy bonus: pg * w alone.
    cfg.kl_in_loss, cfg.entropy_coef = False, 0.0
    loss, parts = policy_token_loss(cfg, logp, logits, None, {**mb, "is_weights": torch.tensor([[0.5]])})
    assert loss.item() == -1.0 and parts["vl"].item() == 0.0 and parts["ent"].item() == 0.0


# ---- GSPO and DAPO ----

def test_clip_higher_widens_only_the_upper_side():
    """DAPO's clip-higher: ratio 1.25 with A > 0 is clipped at 1.2 by a symmetric 0.2 but not by 0.2/0.28; the
    lower side (ratio 0.7, A < 0: clipped at 0.8) is the same either way."""
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.25, 0.7]]))
    adv = torch.tensor([[1.0, -1.0]])
    sym, sym_clipped = ppo.policy_loss(logp, old, adv, 0.2)
    high, high_clipped = ppo.policy_loss(logp, old, adv, 0.2, 0.28)
    torch.testing.assert_close(sym, torch.tensor([[-1.2, 0.8]]))
    torch.testing.assert_close(high, torch.tensor([[-1.25, 0.8]]))
    assert sym_clipped.tolist() == [[1.0, 1.0]] and high_clipped.tolist() == [[0.0, 1.0]]


def test_gspo_sequence_ratio_and_clip_by_hand():
    """Sample 0: token ratios 2 and 0.5 -> geometric mean 1 (unclipped), A = 3 -> loss -3 on both tokens.
    Sample 1: one token, ratio 1.5 > 1 + 0.2, A = 2 -> clipped: -1.2 * 2 = -2.4. Sample 2: ratio 0.5 < 0.8 with
    A = -1 -> -min(-0.5, -0.8) = 0.8. Padding stays 0; the gradient reaches every token through the sample's mean."""
    old = torch.zeros(3, 2)
    logp = torch.log(torch.tensor([[2.0, 0.5], [1.5, 1.0], [0.5, 1.0]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    adv = torch.tensor([[3.0, 3.0], [2.0, 0.0], [-1.0, 0.0]])
    loss, clipped = gspo_policy_loss(logp, old, adv, mask, 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-3.0, -3.0], [-2.4, 0.0], [0.8, 0.0]]))
    assert clipped.tolist() == [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    aggregate(loss, mask, "seq_mean_token_mean").backward()
    # d(-s*A)/dlogp_t = -A * s / n on the unclipped sample (s = 1, n = 2): -1.5 per token; clipped samples: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]]))


def test_gspo_per_token_loss_is_used_for_algorithm_gspo():
    from types import SimpleNamespace

    from learner.algorithms import policy_token_loss

    cfg = SimpleNamespace(algorithm="gspo", clip_ratio=0.2, clip_ratio_high=0.0, vf_coef=0.0, kl_coef=0.0,
                          kl_in_loss=False, entropy_coef=0.0)
    logp = torch.log(torch.tensor([[2.0, 0.5]]))
    mb = {"old_logprobs": torch.zeros(1, 2), "advantages": torch.tensor([[3.0, 3.0]]),
          "resp_mask": torch.ones(1, 2)}
    loss, _ = policy_token_loss(cfg, logp, None, None, mb)
    torch.testing.assert_close(loss, torch.tensor([[-3.0, -3.0]]))  # the sample's ratio is 1: no clip
    cfg.algorithm = "grpo"
    token_level, _ = policy_token_loss(cfg, logp, None, None, mb)
    torch.testing.assert_close(token_level, torch.tensor([[-3.6, -1.5]]))  # ratio 2 clipped at 1.2; 0.5 unclipped
    # The rollout correction's weight multiplies the sequence-level surrogate too.
    cfg.algorithm = "gspo"
    weighted, _ = policy_token_loss(cfg, logp, None, None, {**mb, "is_weights": torch.tensor([[0.5, 0.5]])})
    torch.testing.assert_close(weighted, torch.tensor([[-1.5, -1.5]]))


def test_overlong_penalty_by_hand():
    """max_len 16, buffer 4: no penalty up to 12 tokens, then -1/4 per token, -1 (x factor) at 16."""
    lengths = torch.tensor([0, 12, 13, 14, 16])
    torch.testing.assert_close(overlong_penalty(lengths, 16, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 16, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))
    assert overlong_penalty(lengths, 16, 0).abs().sum() == 0
