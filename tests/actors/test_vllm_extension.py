"""The engine worker's side of the collective transport, without vLLM (WeightReceiver is a plain mixin): a group
formed again after an engine was replaced aborts the old one on both sides, and received buckets reach the reload
as views of the received tensors, on their device, hashed over the same bytes (issue 17, section 4)."""

import threading

import numpy as np
import torch
import torch.distributed as dist

from actors.vllm_extension import WeightReceiver
from learner.learner_worker import LearnerConfig, LearnerWorker, free_master_address
from oirl.weights import broadcast_bucket, fingerprint, host_bytes, pack_bucket, unpack_bucket


def test_a_group_formed_again_aborts_the_old_one_on_both_sides(monkeypatch):
    aborted = []
    real_abort = dist.ProcessGroupGloo.abort

    def abort(group):  # the real call, recorded (gloo's abort does nothing observable in torch 2.13; NCCL's does)
        aborted.append(group)
        return real_abort(group)

    monkeypatch.setattr(dist.ProcessGroupGloo, "abort", abort)
    learner = LearnerWorker(LearnerConfig(num_ranks=1), 0, "unused", "float32", 0, 1.0, "test")
    learner.device = torch.device("cpu")
    engine = WeightReceiver()  # as vLLM's CPU worker mixes it in

    def form():
        ip, port = free_master_address()
        host = threading.Thread(target=learner.join_weight_group, args=(ip, port, 2, 60))
        host.start()
        engine.oirl_join_group(ip, port, 1, 2, 60)
        host.join()
        return learner.weight_group[0], engine.oirl_group[0]

    first = form()
    assert aborted == []
    second = form()  # an engine was replaced: learner rank 0 and the surviving engines form the group anew
    assert sorted(map(id, aborted)) == sorted(map(id, first))  # the old group, on both sides, and only it
    sent, got = torch.arange(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    t = threading.Thread(target=broadcast_bucket, args=(second[0], sent, 30))
    t.start()
    broadcast_bucket(second[1], got, 30)
    t.join()
    assert torch.equal(got, sent)  # the new group works


def _bucket():
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.float32)),
             ("c.weight", torch.randn(2, 2).to(torch.bfloat16))]
    bucket, buf = pack_bucket(named, lambda n: np.empty(n, dtype=np.uint8))
    return named, bucket, buf


def test_received_tensors_are_unpacked_where_they_are():
    """The reload reads views of the received buffer on its own device: on `meta` (standing in for a GPU, where
    any host copy would fail) the views stay on `meta`; on the CPU they share the received tensor's memory."""
    named, bucket, buf = _bucket()
    on_meta = dict(unpack_bucket(bucket, torch.empty(bucket.nbytes, dtype=torch.uint8, device="meta")))
    assert {t.device.type for t in on_meta.values()} == {"meta"}
    assert {n: (tuple(t.shape), t.dtype) for n, t in on_meta.items()} == {
        n: (tuple(t.shape), t.dtype) for n, t in named}
    received = torch.from_numpy(buf.copy())
    lo, hi = received.data_ptr(), received.data_ptr() + received.numel()
    for (name, src), (name2, view) in zip(named, unpack_bucket(bucket, received)):
        assert name == name2 and torch.equal(view, src)
        assert lo <= view.data_ptr() < hi  # a view of the received bytes, not a copy


def test_the_fingerprint_of_received_tensors_is_the_learners():
    _, bucket, buf = _bucket()
    received = torch.from_numpy(buf.copy())
    assert fingerprint([bucket], [host_bytes(received)]) == fingerprint([bucket], [buf])
    received[5] ^= 1  # one bit flipped on the way
    assert fingerprint([bucket], [host_bytes(received)]) != fingerprint([bucket], [buf])


def test_the_served_digest_moves_with_any_changed_element_and_only_then():
    """The digest the driver compares before and after a load (oirl/sync.py's stale-engine check): host tensors are
    hashed; device tensors are summarised where they live by device_bit_sums, run here on CPU tensors (the same
    torch ops a GPU runs), chunked or not."""
    from actors.vllm_extension import device_bit_sums, served_digest

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.LayerNorm(48)).to(torch.bfloat16)
    before = served_digest(model)
    assert served_digest(model) == before
    with torch.no_grad():
        model[0].weight.view(-1).view(torch.int16)[100] += 1  # one bf16 element, one unit in the last place
    assert served_digest(model) != before
    for dtype in (torch.bfloat16, torch.float32, torch.uint8, torch.float64):
        t = (torch.arange(3000) % 251).to(dtype)
        whole = device_bit_sums(t)
        assert device_bit_sums(t, chunk=7) == whole  # chunks change nothing
        bits = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        moved = bits.clone()
        moved[10] += 1
        moved[2000] -= 1  # the plain sum of the bits cancels; the position-weighted one does not
        changed = device_bit_sums(moved.view(dtype))
        assert changed.split(":")[0] == whole.split(":")[0] and changed != whole
