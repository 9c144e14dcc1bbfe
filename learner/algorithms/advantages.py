"""Which advantage each learner.algorithm uses: one pure function from a rank's rows (and, for the group-based
estimators, the whole batch) to per-token advantages [b, R] and, for PPO, the critic's returns [b, R].

ppo:          GAE over KL-shaped token rewards and the critic's values (learner/ppo.py).
reinforce_pp: the discounted return of the KL-shaped token rewards (whitened over all ranks by the caller).
grpo / rloo:  (and gspo, dapo: grpo's) one advantage per sample from its group (the samples of one prompt), computed on the whole batch that
              every rank holds, so a group split over ranks is still one group; KL then goes in the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from learner import ppo
from learner.algorithms.grpo import grpo_advantages
from learner.algorithms.reinforce_pp import reinforce_pp_returns
from learner.algorithms.rloo import rloo_advantages


def per_token_advantages(cfg: Any, reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         values: torch.Tensor | None, batch_rewards: torch.Tensor, batch_groups: torch.Tensor,
                         rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cfg: a LearnerConfig (algorithm, kl_coef, kl_in_loss, gamma, gae_lambda, grpo_scale_by_std).

    reward [b] (this rank's sequence rewards), kl [b, R] (per-token KL estimate, 0 on padding), mask [b, R] float,
    values [b, R] (PPO's critic; None otherwise), batch_rewards [B] and batch_groups [B] int64 (every rank's rows:
    the group estimators need whole groups), rows [b] int64 (this rank's rows in the batch).
    Returns (advantages [b, R], returns [b, R] for PPO else None), on the inputs' device.
    """
    kl_coef = 0.0 if cfg.kl_in_loss else cfg.kl_coef
    if cfg.algorithm == "ppo":
        if values is None:
            raise ValueError("learner.algorithm=ppo needs the critic's values")
        return ppo.compute_gae(ppo.token_rewards(reward, kl, mask, kl_coef), values, mask, cfg.gamma,
                               cfg.gae_lambda)
    if cfg.algorithm == "reinforce_pp":
        return reinforce_pp_returns(reward, kl, mask, kl_coef, cfg.gamma), None
    one = torch.ones(len(batch_rewards), 1, dtype=batch_rewards.dtype, device=batch_rewards.device)
    if cfg.algorithm in ("grpo", "gspo", "dapo"):  # GSPO and DAPO change the loss and the batch, not the advantage
        per_sample = grpo_advantages(batch_rewards, batch_groups, one, scale_by_std=cfg.grpo_scale_by_std)
    elif cfg.algorithm == "rloo":
        per_sample = rloo_advantages(batch_rewards, batch_groups, one)
    else:
        raise ValueError(f"unknown learner.algorithm {cfg.algorithm!r}; use ppo, grpo, rloo, reinforce_pp, gspo or "
                         "dapo")
    return per_sample[rows, 0].unsqueeze(-1) * mask, None
