"""Loss pieces shared by the policy-gradient algorithms, on response-aligned [B, R] tensors with a float mask.

- ``aggregate``: how per-token losses become one scalar. "token_mean" weighs every token alike (DAPO, Yu et al. 2025,
  arXiv:2503.14476; our PPO); "seq_mean_token_mean" averages within each sequence first (GRPO as written in Shao et
  al. 2024), which gives tokens of long responses less weight; "seq_mean_token_sum" divides each sequence's token sum
  by a constant such as the maximum response length (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783), removing that
  length bias.
- ``kl_loss_k3``: KL to the reference model as a loss term (GRPO), Schulman's k3 estimator.
- ``gspo_policy_loss``: GSPO's sequence-level ratio and clip; ``overlong_penalty``: DAPO's soft length penalty.
- the rollout correction's importance weights (the engine, not the learner, sampled the tokens) are in
  correction.py; ``policy_token_loss`` multiplies the surrogate by them.
- ``policy_token_loss``: everything the policy's engine minimises per token (surrogate, shared value loss, KL,
  entropy), assembled from the pieces above and learner/ppo.py.
"""

from __future__ import annotations

from typing import Any

import torch

from learner import ppo

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              denominator: float | torch.Tensor | None = None,
              token_norm: float | None = None) -> torch.Tensor:
    """per_token [B, R], mask [B, R] float -> scalar loss.

    token_mean:          sum_{i,t} m*x / denominator; default denominator = number of valid tokens here.
    seq_mean_token_mean: sum_i (sum_t m*x / n_i) / denominator, n_i = valid tokens of row i; default denominator =
                         number of rows with at least one valid token.
    seq_mean_token_sum:  sum_i (sum_t m*x / token_norm) / denominator, same default denominator; ``token_norm`` is
                         required (Dr. GRPO uses the generation max length, a constant across batches).

    ``denominator`` is the outer count (tokens for token_mean, sequences otherwise). Pass the count over the whole
    mini-batch when accumulating micro-batches, and the global count divided by the data-parallel world size when
    the gradient is averaged over ranks (DeepSpeed does), so that M ranks take the step one rank would.
    """
    masked = per_token * mask
    if mode == "token_mean":
        return masked.sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)
    seq_len = mask.sum(-1)
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / seq_len.clamp(min=1)
    elif mode == "seq_mean_token_sum":
        if token_norm is None:
            raise ValueError("aggregate mode 'seq_mean_token_sum' needs token_norm, a constant such as the maximum "
                             "response length (Dr. GRPO); pass token_norm=max_response_len")
        per_seq = masked.sum(-1) / token_norm
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {', '.join(AGGREGATION_MODES)}")
    if denominator is None:
        denominator = (seq_len > 0).sum().clamp(min=1)
    return per_seq.sum() / denominator


def kl_loss_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) as a loss: exp(ref - logp) - (ref - logp) - 1 >= 0, [B, R] -> [B, R].

    The gradient flows through ``logp`` only (d/dlogp = 1 - ref/pi); ``ref_logp`` is detached. Mask and aggregate
    it like the policy loss (DeepSeekMath GRPO adds beta * this to the clipped surrogate).
    """
    return ppo.kl_estimate(logp, ref_logp.detach(), "k3")


def gspo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                     clip: float, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO's sequence-level clipped surrogate (Zheng et al. 2025, arXiv:2507.18071).

    s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|) = exp(mean_t (logp - old_logp)), the length-normalised sequence
    ratio; loss_i = -min(s_i A_i, clip(s_i, 1 - c, 1 + c_high) A_i), A_i the sample's advantage (the mean of
    ``adv`` over its tokens: GRPO's is the same on every token). Every valid token of sample i carries loss_i, so
    ``aggregate(..., 'seq_mean_token_mean')`` gives GSPO's mean over samples; the gradient reaches every token
    through s_i. logp, old_logp, adv, mask [B, R] -> (loss [B, R], clipped [B, R]), 0 on padding.
    """
    n = mask.sum(-1).clamp(min=1)
    s = torch.exp(((logp - old_logp) * mask).sum(-1) / n)
    a = (adv * mask).sum(-1) / n
    unclipped = s * a
    clipped = torch.clamp(s, 1.0 - clip, 1.0 + (clip_high or clip)) * a
    loss = -torch.min(unclipped, clipped)
    return loss[:, None] * mask, (clipped < unclipped).to(mask.dtype)[:, None] * mask


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476), added to the sequence reward.

    lengths [B] (response tokens) -> [B]: 0 up to max_len - buffer, then falling linearly to -factor at max_len
    (and -factor beyond): a response that runs into the length limit is penalised in proportion to how far into the
    last ``buffer`` tokens it got, instead of abruptly. buffer 0: no penalty."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.to(torch.float32) - (max_len - buffer)).clamp(min=0, max=buffer)
    return -factor * over / buffer


def policy_token_loss(cfg: Any, logp: torch.Tensor, logits: torch.Tensor, values: torch.Tensor | None,
                      mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss [b, R] the policy's engine minimises on one mini-batch, before ``aggregate``.

    cfg: a LearnerConfig (algorithm, clip_ratio, clip_ratio_high, value_clip, vf_coef, kl_coef, kl_in_loss,
    entropy_coef). logp [b, R]: the
    current log-probs of the sampled tokens (with grad); logits [b, R, V] (for the entropy bonus); values [b, R]:
    the shared critic's values, None without one. mb: the mini-batch's old_logprobs, advantages, old_values,
    returns, ref_logprobs, resp_mask ([b, R]) and the rollout correction's is_weights (absent: no correction).

    loss = clipped surrogate, per token or (gspo) per sequence, x the rollout correction's weight
           + vf_coef * clipped value loss (shared critic)
           + kl_coef * k3 KL (learner.kl_in_loss) - entropy_coef * entropy.
    Returns (loss, parts): parts are the detached per-token pg, vl, clipped, ent for the statistics (zeros when
    absent).
    """
    if cfg.algorithm == "gspo":
        pg, clipped = gspo_policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["resp_mask"], cfg.clip_ratio,
                                       cfg.clip_ratio_high)
    else:
        pg, clipped = ppo.policy_loss(logp, mb["old_logprobs"], mb["advantages"], cfg.clip_ratio, cfg.clip_ratio_high)
    if "is_weights" in mb:  # rollout correction: the engine (behaviour policy) sampled the tokens, not pi_old
        pg = pg * mb["is_weights"]
    loss, zeros = pg, torch.zeros_like(logp).detach()
    vl = ent = zeros
    if values is not None:
        vl = ppo.value_loss(values, mb["old_values"], mb["returns"], cfg.value_clip)
        loss = loss + cfg.vf_coef * vl
    if cfg.kl_in_loss and cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * kl_loss_k3(logp, mb["ref_logprobs"])
    if cfg.entropy_coef:
        ent = ppo.entropy_from_logits(logits)
        loss = loss - cfg.entropy_coef * ent
    return loss, {"pg": pg.detach(), "vl": vl.detach(), "clipped": clipped, "ent": ent.detach()}
