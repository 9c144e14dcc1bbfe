"""DAPO's dynamic sampling, the batch side (learner.dynamic_sampling): a group (the samples of one prompt) whose
rewards are all equal gives every sample the same group-relative advantage, 0, so it teaches nothing and only
dilutes the loss. Such groups leave the batch, and the driver generates and scores more prompts until the batch holds
data.prompts_per_iteration groups with a signal again (Yu et al. 2025, "DAPO", arXiv:2503.14476, section 3.2).

    keep = informative_rows(batch, rewards)              # [B] bool: rows of groups whose rewards differ
    count_informative(rounds)                             # distinct prompts with a signal over the rounds
    batch, rewards, filled = fill_groups(rounds, target)  # the first `target` groups, informative ones first

Pure functions of Arrow tables and numpy arrays: the driver owns generation and scoring.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def group_keys(batch: pa.Table) -> np.ndarray:
    """The group of each row [B] int64: its prompt id."""
    return batch.column("prompt_id").to_numpy()


def informative_rows(batch: pa.Table, rewards: np.ndarray) -> np.ndarray:
    """[B] bool: True for the rows of groups whose rewards are not all equal (exact comparison: a group of three
    0.1 rewards carries no signal, whatever rounding r - mean leaves)."""
    keys = group_keys(batch)
    keep = np.zeros(len(keys), dtype=bool)
    for k in np.unique(keys):
        rows = keys == k
        keep[rows] = rewards[rows].max() > rewards[rows].min()
    return keep


def count_informative(rounds: list[tuple[pa.Table, np.ndarray]]) -> int:
    """Distinct prompts with an informative group over the scored rounds [(batch, rewards), ...]."""
    return len({int(k) for batch, rewards in rounds for k in group_keys(batch)[informative_rows(batch, rewards)]})


def fill_groups(rounds: list[tuple[pa.Table, np.ndarray]], target: int) -> tuple[pa.Table, np.ndarray, float]:
    """One batch of ``target`` whole groups from the scored rounds [(batch, rewards), ...], in order: every
    informative group first, then, when those are too few (the rounds ran out), groups without signal, so the
    batch keeps its size. Returns (batch, rewards, fraction of the groups that are informative). A prompt drawn again
    in a later round (the data wrapped around) is skipped there: the learner groups rows by prompt id, and two
    draws of one prompt would form one group of twice the size."""
    informative: list[tuple[pa.Table, np.ndarray]] = []
    constant: list[tuple[pa.Table, np.ndarray]] = []
    for batch, rewards in rounds:
        keep = informative_rows(batch, rewards)
        keys = group_keys(batch)
        for k in dict.fromkeys(keys.tolist()):  # first-seen order: reproducible
            rows = np.flatnonzero(keys == k)
            (informative if keep[rows[0]] else constant).append((batch.take(rows), rewards[rows]))
    chosen, seen = [], set()
    for table, rewards in informative + constant:
        pid = int(table.column("prompt_id")[0].as_py())
        if pid not in seen and len(chosen) < target:
            chosen.append((table, rewards))
            seen.add(pid)
    if len(chosen) < target:
        raise ValueError(f"dynamic sampling: {len(chosen)} groups scored, {target} needed")
    table = pa.concat_tables([t for t, _ in chosen])
    n_informative = sum(1 for t, r in chosen if r.max() > r.min())
    return table, np.concatenate([r for _, r in chosen]), n_informative / target
