"""PPO math: hand-computed cases and a second, plain-loop implementation to compare with."""

import math

import numpy as np
import pytest
import torch

from learner import ppo
from oirl.batch import make_rollout_batch


def gae_plain(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded episode, scalar Python loop."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_matches_plain_loop_on_ragged_batch():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    r_max = max(lengths)
    rewards = torch.randn(len(lengths), r_max, generator=g)
    values = torch.randn(len(lengths), r_max, generator=g)
    mask = torch.zeros(len(lengths), r_max)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # Garbage beyond each length must not leak into the valid part.
    rewards = rewards * mask + (1 - mask) * 100.0
    values = values * mask + (1 - mask) * -50.0
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
        for i, n in enumerate(lengths):
            ref_adv, ref_ret = gae_plain(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
            np.testing.assert_allclose(adv[i, :n].numpy(), ref_adv, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ret[i, :n].numpy(), ref_ret, rtol=1e-5, atol=1e-5)
            assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)


def test_gae_hand_computed():
    # Two steps, gamma=1, lam=1: advantage = sum of future rewards - V(s_t).
    adv, ret = ppo.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    np.testing.assert_allclose(adv.numpy(), [[0.5, 0.75]])
    np.testing.assert_allclose(ret.numpy(), [[1.0, 1.0]])


def test_policy_loss_clipping_hand_cases():
    clip = 0.2
    old = torch.zeros(4)
    # ratios 1.5 (A>0: clipped at 1.2), 0.5 (A>0: unclipped 0.5), 1.5 (A<0: unclipped 1.5), 0.5 (A<0: clipped 0.8)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = ppo.policy_loss(logp, old, adv, clip)
    np.testing.assert_allclose(loss.numpy(), [-1.2, -0.5, 1.5, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped.numpy(), [1.0, 0.0, 0.0, 1.0])


def test_value_loss_clipping_hand_cases():
    old = torch.tensor([0.0, 0.0])
    values = torch.tensor([1.0, 0.1])
    returns = torch.tensor([1.0, 1.0])
    loss = ppo.value_loss(values, old, returns, clip=0.2)
    # case 1: unclipped error 0, clipped value 0.2 -> error 0.8 -> max = 0.5*0.64
    # case 2: inside the clip range -> 0.5*0.9^2
    np.testing.assert_allclose(loss.numpy(), [0.5 * 0.64, 0.5 * 0.81], rtol=1e-6)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -0.1])
    k1 = ppo.kl_estimate(logp, ref, "k1")
    k3 = ppo.kl_estimate(logp, ref, "k3")
    np.testing.assert_allclose(k1.numpy(), [0.5, 0.0, -0.4], rtol=1e-6)
    expected_k3 = [math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(0.4) - 1 - 0.4]
    np.testing.assert_allclose(k3.numpy(), expected_k3, rtol=1e-5)
    assert torch.all(k3 >= 0)
    with pytest.raises(ValueError, match="k2"):
        ppo.kl_estimate(logp, ref, "k2")


def test_kl_estimators_are_unbiased_for_true_kl():
    # Sample from p, estimate KL(p||q): both k1 and k3 converge to the exact value.
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        est = ppo.kl_estimate(p.log()[x], q.log()[x], kind).mean().item()
        assert abs(est - exact) < 0.01, (kind, est, exact)


def test_token_rewards_put_score_on_last_valid_token():
    kl = torch.ones(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    np.testing.assert_allclose(r.numpy(), [[-0.1, 1.9, 0.0], [-0.1, -0.1, -1.1]], rtol=1e-6)


def test_pad_batch_aligns_responses_with_predicting_positions():
    table = make_rollout_batch([0, 1], [0, 0], [[10, 11, 12], [20]], [[13, 14], [21, 22, 23]],
                               [[-0.1, -0.2], [-0.3, -0.4, -0.5]], ["stop", "length"], 0)
    d = ppo.pad_batch(table, pad_id=0)
    assert d["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 0]]
    assert d["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Row 0: response token 13 is predicted at position 2 (token 12), 14 at position 3.
    assert d["resp_index"][0, :2].tolist() == [2, 3]
    assert d["resp_index"][1].tolist() == [0, 1, 2]
    assert d["resp_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    np.testing.assert_allclose(d["engine_logprobs"][1].numpy(), [-0.3, -0.4, -0.5], rtol=1e-6)
    # The gather really selects the predicting positions.
    positions = torch.arange(5).expand(2, 5)
    assert positions.gather(1, d["resp_index"]).tolist() == [[2, 3, 4], [0, 1, 2]]


def _full_log_softmax(logits, ids):
    """The function before vocabulary chunking: one fp32 log-softmax over every row at once."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_and_entropy_equal_the_full_log_softmax(dtype, monkeypatch):
    monkeypatch.setattr(ppo, "LOGPROB_CHUNK_ELEMENTS", 3 * 1000)  # 3 rows of 28 per chunk, the last one short
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 7, 1000, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 1000, (4, 7), generator=g)
    w_lp, w_ent = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    # bf16: gradients may differ by one bf16 rounding (the full version rounds each term's gradient to bf16 before
    # adding them, the chunked one adds in fp32 and rounds once)
    grad_tol = dict(rtol=2**-7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for fn in ("logprobs_from_logits", "entropy_from_logits", "logprobs_and_entropy"):
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        lp_ref, ent_ref = _full_log_softmax(b, ids)
        if fn == "logprobs_from_logits":
            lp, ent = ppo.logprobs_from_logits(a, ids), None
        elif fn == "entropy_from_logits":
            lp, ent = None, ppo.entropy_from_logits(a)
        else:
            lp, ent = ppo.logprobs_and_entropy(a, ids)
        loss, loss_ref = 0.0, 0.0
        if lp is not None:
            assert lp.dtype == torch.float32 and lp.shape == (4, 7)
            torch.testing.assert_close(lp, lp_ref, rtol=0, atol=5e-6)
            loss, loss_ref = loss + (lp * w_lp).sum(), loss_ref + (lp_ref * w_lp).sum()
        if ent is not None:
            torch.testing.assert_close(ent, ent_ref, rtol=0, atol=5e-6)
            loss, loss_ref = loss + (ent * w_ent).sum(), loss_ref + (ent_ref * w_ent).sum()
        loss.backward()
        loss_ref.backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **grad_tol)


def test_logprobs_never_upcast_more_than_one_chunk_of_the_vocabulary(monkeypatch):
    """Every fp32 tensor made in forward and backward (kept for backward or not) holds at most one chunk of rows x
    V: the [rows, R, V] fp32 log-softmax of a micro-batch (GBs at a 150k vocabulary) never exists."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel())
            return out

    vocab, rows = 1000, 32
    monkeypatch.setattr(ppo, "LOGPROB_CHUNK_ELEMENTS", 4 * vocab)
    logits = torch.randn(2, rows // 2, vocab, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, vocab, (2, rows // 2))
    with LargestFloat32():
        lp, ent = ppo.logprobs_and_entropy(logits, ids)
        (lp.sum() + ent.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert LargestFloat32.largest == 4 * vocab, LargestFloat32.largest  # one chunk; the whole would be 32 x vocab
