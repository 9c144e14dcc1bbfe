"""Checks and corrections that prepare() computes over every rank's tokens: the on-policy check (learner vs engine
logprobs of the sampled tokens) and the rollout correction's weights with the mismatch statistics.

Both read the tensors prepare() keeps for the rank ([B, R]: old_logprobs, engine_logprobs) and reduce with
``learner.ranks.allreduce`` so that every figure covers the whole batch, not rank 0's rows alone.
"""

from __future__ import annotations

import math
from typing import Any

from learner.ranks import allreduce


def on_policy_stats(data: dict[str, Any], mask: Any, tolerance: float, device: Any, engines: Any = None,
                    num_engines: int = 1) -> dict:
    """|learner - engine| logprob of every sampled response token under ``mask`` [B, R], over every rank: the
    primary on-policy check (the engine sampled these tokens; the learner must give them the same probability).
    Besides max, mean and the fraction over ``tolerance``, ``{key}_k3_kl`` is the k3 estimate of KL(engine ||
    learner) on these tokens: a statistic of the whole distribution that bf16 noise barely moves (measured:
    benchmarks/results/check_calibration.json).

    engines [B] (int): the engine that generated each of this rank's rows, in [0, num_engines) (num_engines from
    the whole batch, so every rank reduces lists of one length), so a failed check names the engine
    (``{key}_engine<i>_frac_over_tol`` and ``_k3_kl``). A non-finite logprob on either side is counted (``{key}_nonfinite``) and
    kept out of the other statistics: a NaN would otherwise vanish in a MAX all-reduce and compare as "not over
    tolerance". Nothing to compare (no row of this iteration's version: one-step-off) reports only
    ``{key}_tokens_checked = 0``, never a difference of 0."""
    import torch

    key = "rollout/engine_learner_logprob"
    raw = data["old_logprobs"] - data["engine_logprobs"]
    finite = torch.isfinite(data["old_logprobs"]) & torch.isfinite(data["engine_logprobs"])
    log_r = torch.where(finite, raw, torch.zeros_like(raw)) * mask  # log pi_learner / mu_engine
    diff = log_r.abs()
    over_tok = (diff > tolerance) * mask
    k3 = (torch.exp(log_r) - 1 - log_r) * mask  # KL(engine || learner) on the sampled tokens, >= 0 per token
    if engines is None:
        engines = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    per_engine = [v for e in range(num_engines) for v in (over_tok[engines == e].sum().item(),
                                                          mask[engines == e].sum().item(),
                                                          k3[engines == e].sum().item())]
    sums = allreduce([diff.sum().item(), over_tok.sum().item(), mask.sum().item(),
                      ((~finite) * mask).sum().item(), k3.sum().item(), *per_engine], device)
    total, over, n_tok, nonfinite, k3_sum = sums[:5]
    (worst,) = allreduce([diff.max().item() if mask.numel() else 0.0], device, op="max")
    if n_tok == 0:
        return {f"{key}_tokens_checked": 0.0}
    out = {f"{key}_max_abs_diff": worst, f"{key}_mean_abs_diff": total / n_tok, f"{key}_frac_over_tol": over / n_tok,
           f"{key}_tolerance": tolerance, f"{key}_tokens_checked": n_tok, f"{key}_nonfinite": nonfinite,
           f"{key}_k3_kl": k3_sum / n_tok}
    for e in range(num_engines):
        e_over, e_tok, e_k3 = sums[5 + 3 * e: 8 + 3 * e]
        if e_tok:
            out[f"{key}_engine{e}_frac_over_tol"] = e_over / e_tok
            out[f"{key}_engine{e}_k3_kl"] = e_k3 / e_tok
    return out


def rollout_correction(data: dict[str, Any], mask: Any, cfg: Any, device: Any) -> dict:
    """The rollout correction's per-token weights (learner.rollout_correction, learner/algorithms/correction.py),
    stored in data['is_weights'] for update() (absent for 'none'), and, whatever the mode, the engine/learner
    mismatch and the weights' statistics over every rank."""
    from learner.algorithms.correction import correction_weights

    weights, st = correction_weights(data["old_logprobs"], data["engine_logprobs"], mask, cfg.rollout_correction,
                                     cfg.importance_cap, cfg.mis_lo, cfg.mis_hi, cfg.mis_level)
    if cfg.rollout_correction != "none":
        data["is_weights"] = weights
    else:
        data.pop("is_weights", None)
    return correction_stats([{k: v.item() for k, v in st.items()}], device)


def correction_stats(parts: list[dict[str, float]], device: Any) -> dict:
    """Global figures from the raw statistics of one or more calls of correction_weights on this rank (update()
    computes them per micro-batch when it is the pass that gives the old logprobs)."""
    sums = ("num_tokens", "weight_sum", "num_truncated", "num_masked", "k3_sum", "log_ratio_sum")
    n, w_sum, n_trunc, n_mask, k3, log_ratio = allreduce([sum(p[k] for p in parts) for k in sums], device)
    ratio_max, w_max = allreduce([max((p["ratio_max"] for p in parts), default=0.0),
                                  max((p["weight_max"] for p in parts), default=0.0)], device, op="max")
    n = max(n, 1.0)
    return {"rollout/mismatch_k3_kl": k3 / n, "rollout/mismatch_ppl_ratio": math.exp(-log_ratio / n),
            "learner/is_weight_mean": w_sum / n, "learner/is_weight_max": w_max, "learner/is_ratio_max": ratio_max,
            "learner/is_truncated_frac": n_trunc / n, "learner/is_masked_frac": n_mask / n}
