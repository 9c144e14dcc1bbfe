"""learner.gradient_checkpointing really recomputes activations (transformers only checkpoints in training mode,
and from_pretrained returns a model in eval mode), without dropout: the policy and the critic give exactly the
outputs and gradients of the plain model while keeping far fewer tensors for backward."""

import json
import shutil

import pytest
import torch

from learner.critic import load_value_model
from learner.models import build_policy, load_policy_lm


def saved_tensors_and_grads(module, forward):
    """Tensors autograd keeps for backward during ``forward()``, and the gradients of a scalar loss."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    module.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return count, out.detach(), grads


@pytest.fixture(scope="module")
def model_with_dropout(tiny_model_path, tmp_path_factory):
    """The tiny model with attention dropout 0.5 in its config: dropout left on would change every output."""
    path = tmp_path_factory.mktemp("dropout_model")
    shutil.copytree(tiny_model_path, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def assert_checkpointing_saves_and_changes_nothing(build):
    """build(gc) -> (module, forward(ids, mask, resp_index)); compares the model with and without checkpointing."""
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    resp_index = torch.arange(11, 23).expand(2, -1)
    runs = {}
    for gc in (False, True):
        module, forward = build(gc)
        runs[gc] = saved_tensors_and_grads(module, lambda f=forward: f(ids, mask, resp_index))
    (plain_saved, plain_out, plain_grads), (gc_saved, gc_out, gc_grads) = runs[False], runs[True]
    assert gc_saved < plain_saved / 2, (gc_saved, plain_saved)
    torch.testing.assert_close(gc_out, plain_out, rtol=0, atol=0)
    assert gc_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(gc_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


def test_policy_checkpoints_its_layers_with_the_same_outputs_and_gradients(model_with_dropout):
    def build(gc):
        policy = build_policy(load_policy_lm(model_with_dropout, torch.float32, gc), seed=0, with_value_head=True)
        assert policy.lm.training is gc
        return policy, lambda *inputs: policy(*inputs)[0]

    assert_checkpointing_saves_and_changes_nothing(build)


def test_separate_critic_checkpoints_its_layers(model_with_dropout):
    def build(gc):
        critic = load_value_model("policy", model_with_dropout, torch.float32, seed=0, gradient_checkpointing=gc)
        return critic, critic

    assert_checkpointing_saves_and_changes_nothing(build)
