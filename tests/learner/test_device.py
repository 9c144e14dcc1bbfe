"""Device discipline: the learner's math runs wherever its inputs live. Tensors on the ``meta`` device fail on any
op that mixes in a tensor created without their device (the CPU default), so this CPU test catches what would
crash the first iteration on a GPU."""

import numpy as np
import torch

from learner import ppo
from learner.models import build_policy
from oirl.batch import add_column, make_rollout_batch

META = torch.device("meta")


def test_ppo_math_path_stays_on_the_inputs_device():
    table = make_rollout_batch([0, 1], [0, 0], [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [[-1.0, -2.0], [-1.0] * 3],
                               ["stop", "length"], 0)
    d = {k: v.to(META) for k, v in ppo.pad_batch(add_column(table, "reward", np.ones(2, np.float32)), 0).items()}
    b, r = d["resp_ids"].shape
    logits = torch.empty(b, r, 11, device=META)
    logp = ppo.logprobs_from_logits(logits, d["resp_ids"])
    ref = ppo.logprobs_from_logits(logits, d["resp_ids"])
    mask = d["resp_mask"]
    for kind in ("k1", "k3"):
        kl = ppo.kl_estimate(logp, ref, kind) * mask
    rewards = ppo.token_rewards(d["reward"], kl, mask, 0.05)
    values = torch.empty(b, r, device=META)
    adv, returns = ppo.compute_gae(rewards, values, mask, 1.0, 0.95)
    adv = ppo.masked_whiten(adv, mask, 0.1, 2.0)
    pg, clipped = ppo.policy_loss(logp, ref, adv, 0.2)
    vl = ppo.value_loss(values, values, returns, 0.2)
    ent = ppo.entropy_from_logits(logits)
    loss = ppo.masked_sum(pg + 0.5 * vl - 0.01 * ent, mask)
    for t in (logp, kl, rewards, adv, returns, pg, clipped, vl, ent, loss):
        assert t.device == META


def test_policy_with_value_forward_on_the_inputs_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with META:
        lm = LlamaForCausalLM(cfg)
    module = build_policy(lm, seed=0, with_value_head=True).to(META)
    ids = torch.zeros(2, 5, dtype=torch.long, device=META)
    # No padding mask: transformers inspects a given mask's values (.item()), which meta tensors do not have.
    logits, values = module(ids, None, torch.zeros(2, 3, dtype=torch.long, device=META), 0.7)
    assert logits.shape == (2, 3, 32) and values.shape == (2, 3)
    assert logits.device == META and values.device == META
