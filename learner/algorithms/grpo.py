"""GRPO's group-normalised outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) and its Dr. GRPO
variant without the std division (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
arXiv:2503.20783).

Each prompt is sampled G times; the G sequence rewards form a group, and every token of sample i gets
A_i = (r_i - mean(group)) / (std(group) + eps). Dr. GRPO drops the division (it up-weights groups whose rewards barely
differ) and pairs it with ``losses.aggregate(..., "seq_mean_token_sum", token_norm=max_response_len)``.

Groups are identified by an integer id per sample (the prompt id); samples of a group may sit anywhere in the batch.
The statistics need every sample of a group, so call this on the whole batch (or on shards that keep groups whole),
not on a rank's slice of an interleaved batch.
"""

from __future__ import annotations

import torch


def group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """group_ids [B] (any integers, any order) -> dense index [B] in [0, B): equal ids get equal indices.

    Sort-based instead of ``torch.unique`` so that it has static shapes (runs on the ``meta`` device, no host sync).
    """
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts = torch.ones_like(sorted_ids)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(starts.dtype)
    dense_sorted = torch.cumsum(starts, 0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


def group_stats(rewards: torch.Tensor,
                group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of each sample's group, gathered back per sample.

    rewards [B] float, group_ids [B] int -> (count [B], mean [B], population variance [B], constant [B] bool), where
    ``constant`` is exact (max == min): a group whose rewards are all equal carries no signal, and testing that on the
    rewards themselves avoids the rounding residue of r - mean (e.g. three rewards of 0.1).
    """
    _check_rewards(rewards, group_ids)
    idx = group_index(group_ids)
    zeros = torch.zeros_like(rewards)
    count = zeros.index_add(0, idx, torch.ones_like(rewards))
    mean = zeros.index_add(0, idx, rewards) / count.clamp(min=1)
    dev = rewards - mean[idx]
    var = zeros.index_add(0, idx, dev * dev) / count.clamp(min=1)  # two-pass: no cancellation
    hi = zeros.scatter_reduce(0, idx, rewards, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, idx, rewards, "amin", include_self=False)
    return count[idx], mean[idx], var[idx], (hi == lo)[idx]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantage, the same on every valid token of a sample.

    rewards [B] float (sequence rewards), group_ids [B] int64 (e.g. prompt ids; need not be contiguous),
    mask [B, R] float (1 on response tokens) -> advantages [B, R], zero on padding.

    A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g when ``scale_by_std`` is False (Dr. GRPO).
    std_g is the population std (divide by G, not G - 1): the group is the whole population being standardised, it is
    defined for every G (no NaN at G = 1), and a group's advantages then have root-mean-square exactly 1 whatever G
    is. Implementations that use ``torch.std`` (unbiased) give advantages smaller by sqrt((G - 1) / G), e.g. 0.866 at
    G = 4. Groups of size 1 and groups whose rewards are all equal get exactly 0.
    """
    _check_mask(rewards, mask)
    _, mean, var, constant = group_stats(rewards, group_ids)
    adv = rewards - mean
    if scale_by_std:
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv[:, None] * mask


def _check_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be integers (e.g. prompt ids), got {group_ids.dtype}")


def _check_mask(rewards: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be [B, R] with B = len(rewards) = {rewards.shape[0]}; got {tuple(mask.shape)}")
