"""learner/weight_export.py under ZeRO-3: export_weights and save_hf gather one unit (a decoder layer, or one
embedding / norm tensor) at a time, not the whole policy at once, and still publish and save exactly its weights.

A real rank in-process (DeepSpeed ZeRO-3 over gloo, world size 1: parameters are partitioned and gathered as with
more ranks); DeepSpeed's GatheredParameters is wrapped to record what each gather holds, then called as it is.
The memory this saves is measured with two ranks in benchmarks/zero3_export.py."""

import socket

import numpy as np
import pytest
import torch

from oirl.weights import unpack_bucket


@pytest.mark.slow
def test_zero3_export_and_save_gather_one_layer_at_a_time(tmp_path, tiny_model_path, monkeypatch):
    import deepspeed
    from safetensors.torch import load_file

    from learner.learner_worker import LearnerConfig, LearnerWorker

    # ZeRO-3's zero.Init swaps torch.nn.functional.linear for DeepSpeed's own for the rest of the process (which
    # saves one activation fewer under autocast); monkeypatch puts torch's back when the test ends, so the tests
    # after this one in the same process (tests/oirl/test_memory_plan.py counts what autograd saves) see torch's.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    cfg = LearnerConfig(num_ranks=1, zero_stage=3, kl_coef=0.0, algorithm="ppo", timeout_s=300)
    worker = LearnerWorker(cfg, 0, tiny_model_path, "float32", 0, 1.0, "z3export")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker.setup("127.0.0.1", port, 1)
    try:
        full = worker.full_state()
        params = dict(worker.module.named_parameters())
        assert all(p.numel() == 0 for p in params.values())  # partitioned: nothing whole outside a gather
        gathers: list[int] = []
        real = deepspeed.zero.GatheredParameters

        def recording(ps, *args, **kwargs):
            gathers.append(sum(p.ds_numel for p in ps))
            return real(ps, *args, **kwargs)

        monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
        update = worker.export_weights(1, "collective", 1)
        exported = {n: t.clone() for b, buf in zip(update.buckets, worker.collective_buffers[1])
                    for n, t in unpack_bucket(b, buf)}
        worker.save_hf(str(tmp_path / "hf"))
    finally:
        torch.distributed.destroy_process_group()

    lm = worker.module.lm
    layer = sum(p.ds_numel for p in lm.model.layers[0].parameters())
    largest = max(layer, lm.model.embed_tokens.weight.ds_numel)
    total = sum(p.ds_numel for p in worker.module.parameters())
    assert max(gathers) == largest < total / 2, (gathers, total)
    assert gathers.count(layer) == 2 * len(lm.model.layers)  # every layer once by the export, once by save_hf
    # ... and what they publish and save is the whole policy, exactly
    assert set(exported) == {n[len("lm."):] for n in full if n.startswith("lm.")}
    for name, t in exported.items():
        np.testing.assert_array_equal(t.numpy(), full[f"lm.{name}"])
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in exported:
        np.testing.assert_array_equal(saved[name].numpy(), full[f"lm.{name}"])
    head = torch.load(tmp_path / "hf" / "value_head.pt")
    np.testing.assert_array_equal(head["weight"].numpy(), full["value_head.weight"])
