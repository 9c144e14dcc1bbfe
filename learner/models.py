"""The learner's models: the policy (an HF causal LM, with a value head on its last hidden state when the algorithm
has a critic: PPO) and the frozen reference used for the KL term.

Both are scored only at the positions that predict response tokens: ``resp_index`` [B, R] picks them out of the
hidden states before the LM head, so full-vocabulary logits exist for response tokens only.
"""

from __future__ import annotations

from typing import Any


def build_policy(lm: Any, seed: int, with_value_head: bool) -> Any:
    """The trainable module: ``lm`` plus (PPO) a value head initialised near zero; critic-free algorithms get none
    (no value forward, backward or optimizer state)."""
    import torch

    class Policy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm
            self.value_head = None
            if with_value_head:
                g = torch.Generator().manual_seed(seed)
                self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
                with torch.no_grad():
                    self.value_head.weight.copy_(torch.randn(self.value_head.weight.shape, generator=g) * 1e-3)
                    self.value_head.bias.zero_()

        def forward(self, input_ids, attention_mask, resp_index, temperature: float = 1.0):
            """-> logits [B, R, V] at the positions that predict response tokens, values [B, R] (None without a
            value head)."""
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            h = hidden.gather(1, resp_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            values = self.value_head(h).squeeze(-1).float() if self.value_head is not None else None
            return self.lm.lm_head(h) / temperature, values

    return Policy()


def reference_logits(ref: Any, input_ids: Any, attention_mask: Any, resp_index: Any, temperature: float) -> Any:
    """The frozen reference's logits [B, R, V] at the response positions."""
    hidden = ref.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = hidden.gather(1, resp_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return ref.lm_head(h) / temperature
