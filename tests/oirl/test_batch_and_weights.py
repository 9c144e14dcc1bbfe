"""RolloutBatch schema helpers and the weight bucket wire format."""

import dataclasses

import numpy as np
import pytest
import torch

from oirl.batch import ROLLOUT_SCHEMA, add_column, list_column_numpy, make_rollout_batch, validate_versions
from oirl.weights import fingerprint, pack_bucket, plan_buckets, unpack_bucket


def _batch(version=3):
    return make_rollout_batch([7, 7, 9], [0, 1, 0], [[1, 2], [1, 2], [3]], [[4], [5, 6], []],
                              [[-0.5], [-0.1, -0.2], []], ["stop", "length", "stop"], version)


def test_rollout_batch_schema_and_slices():
    t = _batch()
    assert t.schema == ROLLOUT_SCHEMA
    flat, off = list_column_numpy(t.slice(1, 2), "response_token_ids")
    assert off.tolist() == [0, 2, 2] and flat.tolist() == [5, 6]
    assert t.column("policy_version").to_pylist() == [3, 3, 3]


def test_stages_add_but_never_rewrite_columns():
    t = add_column(_batch(), "reward", np.array([1.0, 0.0, 0.5], dtype=np.float32))
    with pytest.raises(ValueError, match="already in the batch"):
        add_column(t, "reward", [0.0, 0.0, 0.0])


def test_off_policy_samples_are_refused():
    validate_versions(_batch(3), 3)
    with pytest.raises(RuntimeError, match="expects 4"):
        validate_versions(_batch(3), 4)
    with pytest.raises(RuntimeError, match=r"policy_version in \[5, 5\] but iteration expects 4"):
        validate_versions(_batch(5), 4)  # from the future: a version the learner has not published


def test_one_step_off_accepts_one_version_behind_and_no_more():
    validate_versions(_batch(2), 3, async_steps=1)
    validate_versions(_batch(3), 3, async_steps=1)
    with pytest.raises(RuntimeError, match=r"expects \[2, 3\] \(rollout.async_steps=1\)"):
        validate_versions(_batch(1), 3, async_steps=1)
    with pytest.raises(RuntimeError, match=r"expects \[2, 3\]"):
        validate_versions(_batch(4), 3, async_steps=1)


def test_buckets_roundtrip_and_fingerprint():
    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(10, 3, generator=g)), ("b", torch.randn(100, generator=g)),
             ("c", torch.randn(4, 4, generator=g).to(torch.bfloat16)), ("d", torch.randn(50, generator=g))]
    groups = plan_buckets(named, bucket_bytes=400)
    assert [len(x) for x in groups] == [1, 1, 2]  # 120 B | 400 B | 32 B + 200 B; no tensor is split
    packed = [pack_bucket(gr, lambda n: np.empty(n, dtype=np.uint8)) for gr in groups]
    buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
    out = dict(kv for b, buf in packed for kv in unpack_bucket(b, buf))
    for name, t in named:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)
    fp = fingerprint(buckets, buffers)
    assert fp == fingerprint(buckets, [b.copy() for b in buffers])
    renamed = [dataclasses.replace(buckets[0], tensors=[dataclasses.replace(buckets[0].tensors[0], name="z")]),
               *buckets[1:]]
    assert fingerprint(renamed, buffers) != fp  # the same bytes under another name are other weights
    buffers[1][17] ^= 1  # one flipped bit anywhere changes the fingerprint
    assert fingerprint(buckets, buffers) != fp
