"""PPO math for RLHF, on response-aligned tensors of shape [B, R] (B samples, R = longest response).

Token t of a response is an action; its state is the prompt plus tokens < t (the dynamics are known: append the
token). The sequence reward arrives on the last response token; a KL penalty against the frozen reference policy is
paid on every token (Ziegler et al. 2019; Ouyang et al. 2022). GAE (Schulman et al. 2016) turns the per-token
rewards and critic values into advantages; the clipped surrogate (Schulman et al. 2017) and a clipped value loss
train policy and critic.

``pad_batch`` is the one place where RolloutBatch rows become padded tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from oirl.batch import list_column_numpy


def pad_batch(table: pa.Table, pad_id: int) -> dict[str, torch.Tensor]:
    """RolloutBatch rows -> right-padded tensors.

    Returns input_ids [B, T] (prompt + response), attention_mask [B, T], resp_index [B, R] (position whose
    next-token prediction is response token t; clamped where masked), resp_mask [B, R] (float: 1 on the policy's
    tokens; 0 on padding and, in multi-turn episodes, on the environment's tokens, loss_mask), resp_ids [B, R],
    engine_logprobs [B, R], and reward [B] when the batch has a reward column.
    """
    p_flat, p_off = list_column_numpy(table, "prompt_token_ids")
    r_flat, r_off = list_column_numpy(table, "response_token_ids")
    lp_flat, _ = list_column_numpy(table, "response_logprobs")
    # multi-turn episodes: the environment's tokens are context, not actions (0 in loss_mask)
    m_flat = list_column_numpy(table, "loss_mask")[0] if "loss_mask" in table.column_names else None
    p_len, r_len = np.diff(p_off), np.diff(r_off)
    b = len(p_len)
    t_max = int((p_len + r_len).max()) if b else 0
    r_max = max(int(r_len.max()) if b else 0, 1)
    input_ids = np.full((b, t_max), pad_id, dtype=np.int64)
    attention = np.zeros((b, t_max), dtype=np.int64)
    resp_ids = np.full((b, r_max), pad_id, dtype=np.int64)
    engine_lp = np.zeros((b, r_max), dtype=np.float32)
    resp_mask = np.zeros((b, r_max), dtype=np.float32)
    for i in range(b):
        pl, rl = int(p_len[i]), int(r_len[i])
        input_ids[i, :pl] = p_flat[p_off[i]: p_off[i + 1]]
        input_ids[i, pl: pl + rl] = r_flat[r_off[i]: r_off[i + 1]]
        attention[i, : pl + rl] = 1
        resp_ids[i, :rl] = r_flat[r_off[i]: r_off[i + 1]]
        engine_lp[i, :rl] = lp_flat[r_off[i]: r_off[i + 1]]
        resp_mask[i, :rl] = 1.0 if m_flat is None else m_flat[r_off[i]: r_off[i + 1]]
    resp_index = np.clip((p_len[:, None] - 1) + np.arange(r_max)[None, :], 0, max(t_max - 1, 0))
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "resp_index": torch.from_numpy(resp_index.astype(np.int64)),
        "resp_ids": torch.from_numpy(resp_ids),
        "resp_mask": torch.from_numpy(resp_mask),
        "engine_logprobs": torch.from_numpy(engine_lp),
    }
    if "reward" in table.column_names:
        out["reward"] = torch.from_numpy(table.column("reward").to_numpy().astype(np.float32))
    return out


LOGPROB_CHUNK_ELEMENTS = 1 << 24
"""Logits upcast to fp32 at a time by the functions below (64 MiB): rows of [.., V] are taken this many elements'
worth at a time (at least one row), so a full-vocabulary fp32 copy of a micro-batch's logits never exists."""


def _rows_per_chunk(vocab: int) -> int:
    return max(1, LOGPROB_CHUNK_ELEMENTS // max(vocab, 1))


class _VocabStats(torch.autograd.Function):
    """log p(ids) and the entropy from logits [N, V], a chunk of rows at a time in fp32.

    log p(t) = logit[t] - logsumexp(logits). Forward keeps only [N] vectors (logsumexp, entropy) besides the logits
    themselves, which autograd saves in their own dtype (bf16: half of one fp32 copy); backward recomputes the
    softmax chunk by chunk: d log p(t) / d logits = onehot(t) - p, d H / d logits = -p (log p + H)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, with_logp: bool,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.zeros(n, dtype=torch.float32, device=logits.device)
        step = _rows_per_chunk(logits.shape[-1])
        for s in range(0, n, step):
            lse[s: s + step] = torch.logsumexp(logits[s: s + step].float(), dim=-1)
            if with_entropy:
                logp = logits[s: s + step] - lse[s: s + step, None]  # fp32 by type promotion: one pass
                ent[s: s + step] = -(logp.exp().mul_(logp)).sum(-1)
        lp = torch.zeros(n, dtype=torch.float32, device=logits.device)
        if with_logp:
            lp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float() - lse
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.flags = (with_logp, with_entropy)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_lp: torch.Tensor, grad_ent: torch.Tensor) -> tuple[Any, ...]:
        logits, ids, lse, ent = ctx.saved_tensors
        with_logp, with_entropy = ctx.flags
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[-1])
        for s in range(0, logits.shape[0], step):
            e = s + step
            logp = logits[s:e] - lse[s:e, None]  # fp32 (type promotion), a new tensor: modified in place below
            p = logp.exp()
            # d/dlogits (g_lp log p(t) + g_ent H) = -p (g_lp + g_ent (log p + H)) + g_lp onehot(t)
            coef = logp.add_(ent[s:e, None]).mul_(grad_ent[s:e, None]) if with_entropy else logp.zero_()
            if with_logp:
                coef.add_(grad_lp[s:e, None])
            g = p.mul_(coef).neg_()
            if with_logp:
                g.scatter_add_(-1, ids[s:e, None], grad_lp[s:e, None].float())
            grad[s:e] = g
        return grad, None, None, None


def _vocab_stats(logits: torch.Tensor, ids: torch.Tensor | None, with_logp: bool,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_ids = (ids if ids is not None else torch.zeros(lead, dtype=torch.long, device=logits.device)).reshape(-1)
    lp, ent = _VocabStats.apply(flat, flat_ids, with_logp, with_entropy)
    return lp.view(lead), ent.view(lead)


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, R, V], ids [B, R] -> log p(ids) [B, R] in fp32, a chunk of rows at a time (no full-vocabulary fp32
    log-softmax: LOGPROB_CHUNK_ELEMENTS); differentiable."""
    return _vocab_stats(logits, ids, True, False)[0]


def logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, R, V], ids [B, R] -> (log p(ids) [B, R], entropy [B, R]) in fp32, from one chunked pass."""
    return _vocab_stats(logits, ids, True, True)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, R, V] -> entropy [B, R] in fp32, a chunk of rows at a time; differentiable."""
    return _vocab_stats(logits, None, False, True)[1]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, 'Approximating KL divergence').

    k1 = log pi - log ref (unbiased, can be negative); k3 = r - 1 - log r with r = ref/pi (unbiased, >= 0).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """score [B], kl [B, R], mask [B, R] -> per-token reward [B, R]: -kl_coef*kl, plus score on the last token."""
    rewards = -kl_coef * kl * mask
    # the last action (multi-turn: the environment's tokens are holes in the mask, so not mask.sum() - 1)
    last = (mask * torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)).argmax(-1)
    rewards[torch.arange(len(score), device=score.device), last] += score * (mask.sum(-1) > 0)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over [B, R] right-padded responses; the value after the last token is 0 (episode ends).

    Masked positions are not steps: padding carries nothing back, and in multi-turn episodes an environment token
    (0 in the mask between two policy turns) passes the next action's value and advantage through unchanged, so the
    end's reward reaches the first turn as if the environment's tokens were not there.
    Returns (advantages [B, R], returns [B, R]) with zeros at masked positions.
    """
    b, r = rewards.shape
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(r)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = torch.where(m > 0, delta + gamma * lam * last_gae, last_gae)  # a hole keeps what comes after it
        adv[:, t] = last_gae * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean: float, var: float) -> torch.Tensor:
    """(x - mean)/std on valid tokens; mean and var (floats) are passed in so they can be global across ranks."""
    return (x - mean) * (1.0 / float(np.sqrt(var + 1e-8))) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                clip: float, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate: -min(ratio*A, clip(ratio, 1-c, 1+c_high)*A), c_high = clip_high or c (DAPO's
    clip-higher raises it so that low-probability tokens can grow). Returns (loss [B,R], clipped [B,R])."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + (clip_high or clip)) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Per-token clipped value loss: 0.5*max((v-R)^2, (old + clip(v-old, -c, c) - R)^2)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def to_float(stats: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items()}
