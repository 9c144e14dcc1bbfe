"""PPO's separate critic (learner.critic=separate): a value model with its own weights, DeepSpeed engine (the
policy's ZeRO stage), optimizer and learning rate (learner.critic_lr), on every learner rank beside the policy.

The value model is a transformer backbone plus a Linear(hidden, 1) head, read at the positions that predict
response tokens, like the policy. learner.critic_init picks its starting point:
- 'policy': the policy's own backbone (a copy, trained apart from it) and a head near zero;
- a reward-model folder from `oirl train-rm` (a sequence classifier with one output): its backbone and its score
  head, so the first values are the reward model's scores (InstructGPT initialises its value function from the RM;
  Ouyang et al. 2022). The backbone must read the policy's token ids: same model type and vocabulary
  (check_critic_init, called by the driver before any actor starts).

It is never exported to the engines (weight sync carries the policy alone), and it is checkpointed with the policy
under ``<checkpoint>/<tag>/critic``. The shared alternative (a head on the policy's backbone, trained with the
policy's loss and learning rate) is learner/models.py's build_policy.

Public surface (used by learner_worker.py): Critic(cfg, ...).values(data) -> [B, R], train_step(...),
save(directory, tag), load(directory, tag), full_state(), num_params.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from learner import algorithms, ppo
from learner.models import checkpoint_layers, chunk_inputs, new_value_head, response_hidden, score_in_chunks
from learner.ranks import deepspeed_config


class ValueModel(torch.nn.Module):
    """backbone (an HF base model returning last_hidden_state) + value_head Linear(hidden, 1)."""

    def __init__(self, backbone: Any, value_head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.value_head = backbone, value_head

    def forward(self, input_ids, attention_mask, resp_index):
        """-> values [B, R] (float32) at the positions that predict response tokens."""
        h = response_hidden(self.backbone, input_ids, attention_mask, resp_index)
        return self.value_head(h).squeeze(-1).float()


def check_critic_init(init: str, policy_path: str) -> None:
    """Raise ValueError (naming learner.critic_init and the fix) unless ``init`` is 'policy' or a reward-model
    folder whose backbone reads the policy's token ids: a sequence classifier with one output, of the policy's
    model type (so it is causal like the policy: a value at token t must not see later tokens) and vocabulary."""
    if init == "policy":
        return
    from oirl.config import resolve_path

    fix = (f"train one on the policy's backbone (`oirl train-rm --data PREFERENCES --backbone {policy_path} --out "
           "DIR`, preferences from `oirl make-preferences`) and set learner.critic_init=DIR, or use "
           "learner.critic_init=policy")
    folder = resolve_path(init)
    if not (folder / "config.json").is_file():
        raise ValueError(f"learner.critic_init={init!r} is not 'policy' nor a reward-model folder (no config.json "
                         f"in {folder}); {fix}")
    rm = json.loads((folder / "config.json").read_text())
    pol = json.loads((Path(policy_path) / "config.json").read_text())
    archs = rm.get("architectures") or []
    n_labels = len(rm.get("id2label") or {0: 0, 1: 1})  # transformers' default is 2 labels
    if not any(a.endswith("ForSequenceClassification") for a in archs) or n_labels != 1:
        raise ValueError(f"learner.critic_init={init!r} holds {archs or 'no architecture'} with {n_labels} "
                         f"labels, not a one-output sequence classifier (a reward model); {fix}")
    if rm.get("model_type") != pol.get("model_type") or rm.get("vocab_size") != pol.get("vocab_size"):
        raise ValueError(
            f"learner.critic_init={init!r} is a {rm.get('model_type')} reward model with a {rm.get('vocab_size')}-"
            f"token vocabulary, but the policy is {pol.get('model_type')} with {pol.get('vocab_size')} tokens: the "
            f"critic reads the policy's token ids, so its backbone must be of the policy's kind; {fix}")
    from transformers import AutoTokenizer

    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer and AutoTokenizer.from_pretrained(folder).get_vocab() != \
            AutoTokenizer.from_pretrained(policy_path).get_vocab():
        raise ValueError(f"learner.critic_init={init!r}: its tokenizer maps tokens to other ids than the policy's "
                         f"({policy_path}); {fix}")


def load_value_model(init: str, policy_path: str, dtype: torch.dtype, seed: int,
                     gradient_checkpointing: bool = False) -> ValueModel:
    """The critic's starting point (see the module docstring); the head from ``seed`` when init='policy'."""
    check_critic_init(init, policy_path)
    if init == "policy":
        from transformers import AutoModelForCausalLM

        backbone = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype).base_model
        head = new_value_head(backbone.config.hidden_size, seed)
    else:
        from transformers import AutoModelForSequenceClassification

        from oirl.config import resolve_path

        rm = AutoModelForSequenceClassification.from_pretrained(resolve_path(init), num_labels=1, dtype=dtype)
        backbone = rm.base_model
        score = [m for name, m in rm.named_children()
                 if m is not backbone and isinstance(m, torch.nn.Linear) and m.out_features == 1]
        if len(score) != 1:
            raise ValueError(f"learner.critic_init={init!r}: no single Linear(hidden, 1) score head beside the "
                             f"backbone in {type(rm).__name__}; use learner.critic_init=policy")
        head = torch.nn.Linear(score[0].in_features, 1)
        with torch.no_grad():
            head.weight.copy_(score[0].weight)
            head.bias.copy_(score[0].bias if score[0].bias is not None else torch.zeros(1))
    backbone.config.use_cache = False
    if gradient_checkpointing:
        checkpoint_layers(backbone)
    return ValueModel(backbone, head.to(dtype))


class Critic:
    """One rank's share of the separate critic. ``cfg`` is the LearnerConfig."""

    def __init__(self, cfg: Any, world: int, model_path: str, dtype: torch.dtype, seed: int, micro_batch: int,
                 bf16: bool):
        import deepspeed

        self.cfg, self.world = cfg, world
        module = load_value_model(cfg.critic_init, model_path, dtype, seed, cfg.gradient_checkpointing)
        ds = deepspeed_config(micro_batch, world, cfg.zero_stage, cfg.critic_lr or cfg.lr, cfg.weight_decay,
                              cfg.max_grad_norm, bf16)
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds)
        self.module = self.engine.module
        self.num_params = sum(p.numel() for p in module.parameters() if p.requires_grad)

    def values(self, data: dict[str, Any]) -> torch.Tensor:
        """Values [B, R] of the rank's rows (no grad), learner.forward_batch_size rows at a time."""
        return score_in_chunks(data, self.cfg.forward_batch_size,
                               lambda rows, t_len: {"v": self.engine(*chunk_inputs(data, rows, t_len))})["v"]

    def train_step(self, data: dict[str, Any], mb: torch.Tensor, t_len: int, denominator: float) -> torch.Tensor:
        """One optimizer step of the clipped value loss on mini-batch rows ``mb``; ``denominator`` is the global
        count (tokens or sequences, as learner.loss_aggregation) divided by the world size, as for the policy.
        Returns the per-token value loss [b, R] (detached) for the statistics."""
        values = self.engine(*chunk_inputs(data, mb, t_len))
        vl = ppo.value_loss(values, data["old_values"][mb], data["returns"][mb], self.cfg.value_clip)
        mask = data["resp_mask"][mb]
        loss = algorithms.aggregate(vl, mask, self.cfg.loss_aggregation, denominator=denominator,
                                    token_norm=float(max(self.cfg.max_new_tokens, 1)))
        self.engine.backward(loss)
        self.engine.step()
        return vl.detach()

    def save(self, directory: str, tag: str) -> None:
        """Weights and optimizer state under <directory>/<tag>/critic (no 'latest' pointer: the driver commits)."""
        self.engine.save_checkpoint(os.path.join(directory, tag), tag="critic", save_latest=False)

    def load(self, directory: str, tag: str) -> None:
        if not os.path.isdir(os.path.join(directory, tag, "critic")):
            raise FileNotFoundError(
                f"checkpoint {tag} under {directory} has no separate critic (it was written with learner.critic="
                "shared or a critic-free algorithm): resume with the learner settings the run was started with")
        path, _ = self.engine.load_checkpoint(os.path.join(directory, tag), tag="critic")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint of the critic in {directory}/{tag}/critic")

    def full_state(self) -> dict[str, Any]:
        """Every critic parameter as numpy (gathered under ZeRO-3; every rank must call it). For tests."""
        import contextlib

        import deepspeed

        params = list(self.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.cfg.zero_stage == 3 \
            else contextlib.nullcontext()
        with gather:
            return {n: p.detach().float().cpu().numpy().copy() for n, p in self.module.named_parameters()}
