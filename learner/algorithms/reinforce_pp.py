"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
arXiv:2501.03262): no critic; per-token rewards are the KL penalty plus the sequence reward on the last token, the
advantage of a token is its discounted return-to-go, normalised over all valid tokens of the global batch.

The normalisation is global, so it is split in three steps that a distributed learner interleaves with one
all-reduce:

    ret = reinforce_pp_returns(score, kl, mask, kl_coef, gamma)   # per rank
    m = masked_moments(ret, mask); dist.all_reduce(m)               # [count, sum, sum of squares], float64
    adv = whiten_by_moments(ret, mask, m)

``reinforce_pp_advantages`` does the three on one process (moments of the batch it is given).
"""

from __future__ import annotations

import torch

from learner import ppo


def reinforce_pp_returns(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                         gamma: float = 1.0) -> torch.Tensor:
    """Unnormalised discounted return-to-go per token.

    rewards [B] (sequence scores), kl [B, R] (per-token KL estimate, e.g. ppo.kl_estimate k1/k3), mask [B, R] float,
    right-padded -> returns [B, R], zero on padding:
    G_t = sum_{k >= t} gamma^(k - t) * r_k with r_k = -kl_coef * kl_k, plus the score on the last valid token.
    """
    per_token = ppo.token_rewards(rewards, kl, mask, kl_coef)
    if gamma == 1.0:
        # Reverse cumulative sum; padding rewards are 0 so they add nothing to valid positions.
        return per_token.flip(-1).cumsum(-1).flip(-1) * mask
    returns = torch.zeros_like(per_token)
    running = torch.zeros_like(per_token[:, 0])
    for t in reversed(range(per_token.shape[1])):
        # a masked step (padding, or an environment token between turns) is not a step: it keeps the return after it
        running = torch.where(mask[:, t] > 0, per_token[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return returns


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, R], mask [B, R] -> float64 tensor [3] = (number of valid tokens, sum, sum of squares), on x's device.

    Sum it over ranks (one all_reduce) before ``whiten_by_moments`` to normalise over the global batch.
    """
    xd, md = x.double() * mask.double(), mask.double()
    return torch.stack([md.sum(), xd.sum(), (xd * xd).sum()])


def whiten_by_moments(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) on valid tokens, 0 on padding, from moments [3] (count, sum, sum of squares).

    The same formula and eps as ``ppo.masked_whiten`` (which takes Python floats), but no host sync.
    """
    n = moments[0].clamp(min=1)
    mean = moments[1] / n
    var = (moments[2] / n - mean * mean).clamp(min=0)
    return ((x - mean) * torch.rsqrt(var + 1e-8) * mask).to(x.dtype)


def reinforce_pp_advantages(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages normalised over this batch's valid tokens (single process): [B], [B, R], [B, R] ->
    [B, R]. A distributed learner uses the three steps in the module docstring instead."""
    returns = reinforce_pp_returns(rewards, kl, mask, kl_coef, gamma)
    return whiten_by_moments(returns, mask, masked_moments(returns, mask))
