"""The learner's models, except the separate critic (learner/critic.py): the policy (an HF causal LM, with a value
head on its last hidden state when PPO's critic is shared with it) and the frozen reference used for the KL term;
plus ``score_in_chunks``, the no-grad scoring loop they (and the critic) share.

Every model is scored only at the positions that predict response tokens: ``resp_index`` [B, R] picks them out of
the hidden states before any head, so full-vocabulary logits exist for response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def build_policy(lm: Any, seed: int, with_value_head: bool) -> Any:
    """The trainable module: ``lm`` plus (PPO, learner.critic=shared) a value head initialised near zero; otherwise
    none (no value forward, backward or optimizer state)."""
    import torch

    class Policy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm
            self.value_head = new_value_head(lm.config.hidden_size, seed) if with_value_head else None

        def forward(self, input_ids, attention_mask, resp_index, temperature: float = 1.0):
            """-> logits [B, R, V] at the positions that predict response tokens, values [B, R] (None without a
            value head)."""
            h = response_hidden(self.lm.model, input_ids, attention_mask, resp_index)
            values = self.value_head(h).squeeze(-1).float() if self.value_head is not None else None
            return self.lm.lm_head(h) / temperature, values

    return Policy()


def new_value_head(hidden_size: int, seed: int) -> Any:
    """A Linear(hidden, 1) with weights ~1e-3 * N(0, 1) from ``seed`` and zero bias: values start near 0, and the
    shared and separate critics start from the same head."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden_size, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 1e-3)
        head.bias.zero_()
    return head


def response_hidden(backbone: Any, input_ids: Any, attention_mask: Any, resp_index: Any) -> Any:
    """Last hidden states [B, R, H] at the positions that predict response tokens (resp_index [B, R])."""
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.gather(1, resp_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def reference_logits(ref: Any, input_ids: Any, attention_mask: Any, resp_index: Any, temperature: float) -> Any:
    """The frozen reference's logits [B, R, V] at the response positions."""
    return ref.lm_head(response_hidden(ref.model, input_ids, attention_mask, resp_index)) / temperature


def load_policy_lm(model_path: str, dtype: Any, gradient_checkpointing: bool) -> Any:
    """The policy's causal LM from an HF folder, ready to train (no KV cache)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    lm.config.use_cache = False
    if gradient_checkpointing:
        checkpoint_layers(lm)
    return lm


def checkpoint_layers(model: Any) -> None:
    """Recompute each layer's activations in backward (learner.gradient_checkpointing). transformers checkpoints a
    layer only in training mode, and from_pretrained leaves a model in eval mode, where the setting silently does
    nothing; so the model goes to training mode with every dropout at 0, since the learner must score a batch with
    exactly the function the engine sampled it from."""
    import torch

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():  # e.g. LlamaAttention.attention_dropout, read in forward
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    model.train()


def load_reference(model_path: str, dtype: Any, device: Any) -> Any:
    """The frozen reference policy (no gradients), on ``device`` (the host when it is offloaded)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    ref.requires_grad_(False)
    return ref.to(device)


def score_in_chunks(data: dict[str, Any], chunk_rows: int,
                    score: Callable[[slice, int], dict[str, Any]]) -> dict[str, Any]:
    """Run ``score(rows, t_len)`` without gradients over ``chunk_rows`` rows of ``data`` at a time and concatenate
    what it returns ([rows, R] tensors by name). ``t_len`` is the chunk's longest sequence: the padding it does not
    need is dropped. Full-vocabulary logits ([rows, R, V], several GB per model per rank at GPU scale) then never
    exist for more than one chunk."""
    import torch

    parts: dict[str, list[Any]] = {}
    with torch.no_grad():
        for s in range(0, data["input_ids"].shape[0], chunk_rows):
            rows = slice(s, s + chunk_rows)
            t_len = int(data["attention_mask"][rows].sum(1).max())
            for key, value in score(rows, t_len).items():
                parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def chunk_inputs(data: dict[str, Any], rows: Any, t_len: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, resp_index) of ``rows``, cut to ``t_len`` tokens."""
    return (data["input_ids"][rows, :t_len], data["attention_mask"][rows, :t_len],
            data["resp_index"][rows].clamp(max=t_len - 1))
