"""RewardWorker: a Ray actor, separate from the learner, that scores RolloutBatches.

Public method (its RPC surface):
    score(batch: pa.Table) -> np.ndarray[float32]  # one scalar reward per row

Reads the RolloutBatch columns response_token_ids and reference; the driver adds the result as the ``reward``
column. Backends here are rule-based (verifiable): GSM8K final-answer match and a synthetic digit task that a tiny
random model learns in a few iterations. Learned reward models and the HTTP front are the reward-server issue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardConfig:
    kind: str = "gsm8k"
    """'gsm8k' (final-answer match against the row's reference) or 'synthetic_digits' (digit fraction)."""
    format_bonus: float = 0.0
    """gsm8k: extra reward for ending with '#### <number>' (shapes a small model towards the format)."""
    num_cpus: float = 0.0
    """Ray CPUs reserved for the reward actor (rule rewards are light)."""
    timeout_s: float = 300.0
    """Longest wait for one score call."""


class RewardWorker:
    def __init__(self, cfg: RewardConfig, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def score(self, batch) -> np.ndarray:
        from reward_server import rules

        responses = batch.column("response_token_ids").to_pylist()
        references = (batch.column("reference").to_pylist() if "reference" in batch.column_names
                      else [""] * len(responses))
        rewards = np.empty(len(responses), dtype=np.float32)
        for i, (ids, ref) in enumerate(zip(responses, references)):
            if self.cfg.kind == "gsm8k":
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                rewards[i] = rules.gsm8k_reward(text, ref, self.cfg.format_bonus)
            else:
                rewards[i] = rules.digit_fraction([self.tokenizer.decode([t]) for t in ids])
        bad = np.flatnonzero(~np.isfinite(rewards))
        if len(bad):
            raise ValueError(f"reward is not finite for batch row {int(bad[0])}: {rewards[bad[0]]}")
        return rewards
