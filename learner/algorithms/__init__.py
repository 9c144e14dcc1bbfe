"""Critic-free advantage estimators and loss pieces: pure torch functions on response-aligned [B, R] tensors.

grpo.py          GRPO / Dr. GRPO group-normalised outcome advantage
rloo.py          RLOO leave-one-out baseline
reinforce_pp.py  REINFORCE++ returns with per-token KL, normalised over the global batch
losses.py        loss aggregation (token / sequence means, Dr. GRPO constant), k3 KL loss, GSPO's sequence-level
                 surrogate, DAPO's overlong penalty, the policy's whole per-token loss
correction.py    rollout correction: importance weights for the engine sampling instead of the learner (TIS, MIS,
                 sequence-level), and the mismatch statistics
advantages.py    which estimator each learner.algorithm uses (GAE for PPO, the ones above otherwise)

GAE, the clipped surrogate, the value loss and the KL estimators live in learner/ppo.py. Every function keeps its
outputs on its inputs' device.
"""

from learner.algorithms.correction import correction_weights
from learner.algorithms.grpo import group_index, group_stats, grpo_advantages
from learner.algorithms.losses import (
    AGGREGATION_MODES,
    aggregate,
    gspo_policy_loss,
    kl_loss_k3,
    overlong_penalty,
    policy_token_loss,
)
from learner.algorithms.reinforce_pp import (
    masked_moments,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    whiten_by_moments,
)
from learner.algorithms.rloo import rloo_advantages

__all__ = [
    "AGGREGATION_MODES",
    "aggregate",
    "group_index",
    "group_stats",
    "grpo_advantages",
    "kl_loss_k3",
    "masked_moments",
    "policy_token_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_returns",
    "rloo_advantages",
    "gspo_policy_loss",
    "overlong_penalty",
    "correction_weights",
    "whiten_by_moments",
]
