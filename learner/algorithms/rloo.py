"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740; after Kool et al. 2019).

Each of the k samples of a prompt is baselined by the mean reward of the other k - 1:
A_i = r_i - (sum_g - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_g), unbiased because the baseline does not depend on
sample i. Ahmadian et al. fold a sequence-level KL penalty into r; pass such rewards if wanted. No normalisation.
As with GRPO, call it on the whole batch so that every group is complete.
"""

from __future__ import annotations

import torch

from learner.algorithms.grpo import _check_mask, group_stats


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantage, the same on every valid token of a sample.

    rewards [B] float, group_ids [B] int64 (need not be contiguous), mask [B, R] float -> advantages [B, R], zero on
    padding. A group of size 1 has no other sample to baseline with and gets 0; so does a group of equal rewards.
    """
    _check_mask(rewards, mask)
    count, mean, _, constant = group_stats(rewards, group_ids)
    loo_mean = (count * mean - rewards) / (count - 1).clamp(min=1)
    adv = torch.where(constant | (count < 2), torch.zeros_like(rewards), rewards - loo_mean)
    return adv[:, None] * mask
