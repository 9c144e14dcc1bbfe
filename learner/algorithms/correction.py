"""Rollout correction: the engine that sampled the tokens is not the learner, even at equal weights.

vLLM's kernels and the learner's disagree (bf16 most: on this CPU 11.7% of sampled tokens differ by more than 0.1
nats), and in one-step-off mode the engine also serves the previous version. The policy gradient is then taken on
samples of the behaviour policy mu (the engine) while the ratio's denominator is the learner's pi_old; importance
weights w = pi_old / mu correct for it, per token or per sequence, truncated or masked so that a few extreme
ratios cannot blow up the variance (TIS, Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy
RL training"; MIS/rejection as in veRL's rollout correction; the sequence-level geometric mean as GSPO uses, Zheng
et al. 2025, arXiv:2507.18071).

    mode   weight of token t of sample i                          r_t = pi_old / mu,  s_i = exp(mean_t log r_t)
    none   1
    tis    min(r_t, cap)
    mis    1 if lo <= r_t <= hi else 0        (level=token)      masked tokens add nothing to the loss
           1 if lo <= s_i <= hi else 0        (level=sequence)   the whole sample leaves the loss
    seq    min(s_i, cap)                                          one weight for every token of the sample

The weights multiply the per-token policy loss (``losses.policy_token_loss``); they are detached (a correction,
not a gradient path). The mismatch itself is measured whatever the mode: the k3 estimate of KL(mu || pi_old) on the
sampled tokens, E_mu[r - 1 - log r] (unbiased, >= 0 per token), and the ratio of the learner's perplexity on the
samples to the engine's, exp(mean_t (log mu - log pi_old)).
"""

from __future__ import annotations

import torch

MODES = ("none", "tis", "mis", "seq")
LEVELS = ("token", "sequence")


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log ratio of each sample's valid tokens [B, R] -> [B] (0 for an empty sample): log of the geometric
    mean of its token ratios, which does not grow with the length as the product would."""
    return (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def correction_weights(logp_old: torch.Tensor, logp_engine: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float = 2.0, lo: float = 0.5, hi: float = 2.0,
                       level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weights [B, R] (detached, 0 on padding) and their statistics.

    logp_old [B, R]: the learner's logprobs of the sampled tokens before the update (pi_old); logp_engine [B, R]:
    the engine's (mu); mask [B, R] float. stats are 0-d tensors on the inputs' device, sums to all-reduce over
    ranks: ``num_tokens``, ``weight_sum``, ``num_truncated`` (tis/seq: ratio above cap), ``num_masked`` (mis:
    tokens whose weight is 0), ``k3_sum`` and ``log_ratio_sum`` (the mismatch), and ``ratio_max``/``weight_max``
    (reduce with max).
    """
    if mode not in MODES:
        raise ValueError(f"unknown rollout correction {mode!r}; use one of {', '.join(MODES)}")
    if mode in ("tis", "seq") and not cap > 0:
        raise ValueError(f"the importance weight cap must be > 0, got {cap}; a usual value is 2 to 5")
    if mode == "mis" and not 0 <= lo < 1 < hi:
        raise ValueError(f"the mis bounds must satisfy 0 <= lo < 1 < hi, got lo={lo}, hi={hi}")
    if level not in LEVELS:
        raise ValueError(f"unknown mis level {level!r}; use 'token' or 'sequence'")
    valid = mask > 0
    log_ratio = torch.where(valid, (logp_old - logp_engine).detach(), torch.zeros_like(logp_old))
    ratio = torch.exp(log_ratio)
    seq_ratio = torch.exp(sequence_log_ratio(log_ratio, mask))[:, None].expand_as(ratio)
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    truncated = masked = torch.zeros_like(valid)
    if mode == "none":
        weights = torch.ones_like(ratio)
    elif mode == "tis":
        weights, truncated = ratio.clamp(max=cap), ratio > cap
    elif mode == "seq":
        weights, truncated = seq_ratio.clamp(max=cap), seq_ratio > cap
    else:
        judged = ratio if level == "token" else seq_ratio
        keep = (judged >= lo) & (judged <= hi)
        weights, masked = keep.to(ratio.dtype), ~keep
    weights = weights * mask
    truncated, masked = truncated & valid, masked & valid
    k3 = (ratio - 1 - log_ratio) * mask  # per token >= 0; 0 where the two agree
    stats = {
        "num_tokens": mask.sum(),
        "weight_sum": weights.sum(),
        "num_truncated": truncated.sum().to(mask.dtype),
        "num_masked": masked.sum().to(mask.dtype),
        "k3_sum": k3.sum(),
        "log_ratio_sum": log_ratio.sum(),
        "ratio_max": torch.where(valid, ratio, zero).amax() if ratio.numel() else zero,
        "weight_max": weights.amax() if weights.numel() else zero,
    }
    return weights, stats
