"""Checks and corrections that prepare() computes over every rank's tokens: the on-policy check (learner vs engine
logprobs of the sampled tokens) and, in one-step-off mode, the truncated importance weights with their statistics.

Both read the tensors prepare() keeps for the rank ([B, R]: old_logprobs, engine_logprobs) and reduce with
``learner.ranks.allreduce`` so that every figure covers the whole batch, not rank 0's rows alone.
"""

from __future__ import annotations

from typing import Any

from learner.ranks import allreduce


def on_policy_stats(data: dict[str, Any], mask: Any, tolerance: float, device: Any) -> dict:
    """|learner - engine| logprob of every sampled response token under ``mask`` [B, R], over every rank: the
    primary on-policy check (the engine sampled these tokens; the learner must give them the same probability)."""
    diff = (data["old_logprobs"] - data["engine_logprobs"]).abs() * mask
    (worst,) = allreduce([diff.max().item() if mask.numel() else 0.0], device, op="max")
    total, over, n_tok = allreduce([diff.sum().item(), ((diff > tolerance) * mask).sum().item(), mask.sum().item()],
                                   device)
    key = "rollout/engine_learner_logprob"
    return {f"{key}_max_abs_diff": worst, f"{key}_mean_abs_diff": total / max(n_tok, 1.0),
            f"{key}_frac_over_tol": over / max(n_tok, 1.0), f"{key}_tolerance": tolerance,
            f"{key}_tokens_checked": n_tok}


def importance_weights(data: dict[str, Any], mask: Any, cap: float, device: Any) -> dict:
    """Truncated importance weights min(pi_learner / pi_engine, cap) of every response token, stored in
    data['is_weights'] for update(), and their statistics over every rank."""
    from learner import algorithms

    data["is_weights"], st = algorithms.truncated_importance_weights(data["old_logprobs"], data["engine_logprobs"],
                                                                     mask, cap)
    n, w_sum, n_trunc = allreduce([st["num_tokens"].item(), st["weight_sum"].item(), st["num_truncated"].item()],
                                  device)
    (ratio_max,) = allreduce([st["ratio_max"].item()], device, op="max")
    return {"learner/is_weight_mean": w_sum / max(n, 1.0), "learner/is_ratio_max": ratio_max,
            "learner/is_truncated_frac": n_trunc / max(n, 1.0)}
