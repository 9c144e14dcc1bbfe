"""Checks and corrections that prepare() computes over every rank's tokens: the on-policy check (learner vs engine
logprobs of the sampled tokens) and, in one-step-off mode, the truncated importance weights with their statistics.

Both read the tensors prepare() keeps for the rank ([B, R]: old_logprobs, engine_logprobs) and reduce with
``learner.ranks.allreduce`` so that every figure covers the whole batch, not rank 0's rows alone.
"""

from __future__ import annotations

from typing import Any

from learner.ranks import allreduce


def on_policy_stats(data: dict[str, Any], mask: Any, tolerance: float, device: Any, engines: Any = None,
                    num_engines: int = 1) -> dict:
    """|learner - engine| logprob of every sampled response token under ``mask`` [B, R], over every rank: the
    primary on-policy check (the engine sampled these tokens; the learner must give them the same probability).

    engines [B] (int): the engine that generated each of this rank's rows, in [0, num_engines) (num_engines from
    the whole batch, so every rank reduces lists of one length), so a failed check names the engine
    (``{key}_engine<i>_frac_over_tol``). A non-finite logprob on either side is counted (``{key}_nonfinite``) and
    kept out of the other statistics: a NaN would otherwise vanish in a MAX all-reduce and compare as "not over
    tolerance". Nothing to compare (no row of this iteration's version: one-step-off) reports only
    ``{key}_tokens_checked = 0``, never a difference of 0."""
    import torch

    key = "rollout/engine_learner_logprob"
    raw = data["old_logprobs"] - data["engine_logprobs"]
    finite = torch.isfinite(data["old_logprobs"]) & torch.isfinite(data["engine_logprobs"])
    diff = torch.where(finite, raw, torch.zeros_like(raw)).abs() * mask
    over_tok = (diff > tolerance) * mask
    if engines is None:
        engines = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    per_engine = [v for e in range(num_engines) for v in (over_tok[engines == e].sum().item(),
                                                          mask[engines == e].sum().item())]
    sums = allreduce([diff.sum().item(), over_tok.sum().item(), mask.sum().item(),
                      ((~finite) * mask).sum().item(), *per_engine], device)
    total, over, n_tok, nonfinite = sums[:4]
    (worst,) = allreduce([diff.max().item() if mask.numel() else 0.0], device, op="max")
    if n_tok == 0:
        return {f"{key}_tokens_checked": 0.0}
    out = {f"{key}_max_abs_diff": worst, f"{key}_mean_abs_diff": total / n_tok, f"{key}_frac_over_tol": over / n_tok,
           f"{key}_tolerance": tolerance, f"{key}_tokens_checked": n_tok, f"{key}_nonfinite": nonfinite}
    for e in range(num_engines):
        e_over, e_tok = sums[4 + 2 * e], sums[5 + 2 * e]
        if e_tok:
            out[f"{key}_engine{e}_frac_over_tol"] = e_over / e_tok
    return out


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
