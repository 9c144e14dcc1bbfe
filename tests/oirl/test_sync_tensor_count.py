"""The published tensors against the checkpoint on disk (oirl/sync.py): only a tied head may stay home, and the
expected byte count comes from the checkpoint's safetensors headers, never from the tensors it checks. Tiny Llama
models built from a config (no download), tied and untied, published as the learner does (named_parameters)."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from oirl.sync import SyncError, check_against_checkpoint, checkpoint_tensors
from oirl.weights import WeightUpdate, fingerprint, pack_bucket, plan_buckets


def _model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tied" if request.param else "untied")
    model = _model(request.param)
    model.save_pretrained(out, safe_serialization=True)
    return out, model, request.param


def _publish(named, version=1):
    """What learner rank 0's export_weights builds (in memory instead of /dev/shm)."""
    packed = [pack_bucket(g, lambda n: np.empty(n, dtype=np.uint8)) for g in plan_buckets(named, 1 << 12)]
    buckets, buffers = [p[0] for p in packed], [p[1] for p in packed]
    return WeightUpdate(version, "object_store", buckets, fingerprint(buckets, buffers), sum(b.nbytes for b in buckets))


def _checkpoint_data_bytes(path) -> int:
    """The data bytes of a safetensors file, read from its JSON header by hand (a second reading of the format)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")


def test_what_the_learner_publishes_passes_and_counts_the_checkpoints_bytes(model_dir):
    out, model, tied = model_dir
    named = list(model.named_parameters())  # a tied head is the embedding: named_parameters yields it once
    assert ("lm_head.weight" in dict(named)) is not tied
    expected = checkpoint_tensors(str(out))
    assert ("lm_head.weight" in expected) is not tied
    assert check_against_checkpoint(_publish(named), expected) == _checkpoint_data_bytes(out / "model.safetensors")
    # Published in bf16: the checkpoint's numel x 2 bytes.
    half = [(n, p.detach().to(torch.bfloat16)) for n, p in named]
    assert check_against_checkpoint(_publish(half), expected) == _checkpoint_data_bytes(out / "model.safetensors") / 2


def test_an_untied_head_left_out_of_the_update_fails_the_sync(model_dir):
    """Before: lm_head.weight was exempt whenever the embedding was published, and the engine loaded the embedding
    as an untied model's head."""
    out, model, tied = model_dir
    named = [(n, p) for n, p in model.named_parameters() if n != "lm_head.weight"]
    if tied:
        check_against_checkpoint(_publish(named), checkpoint_tensors(str(out)))
        return
    with pytest.raises(SyncError, match=r"missing \['lm_head.weight'\]"):
        check_against_checkpoint(_publish(named), checkpoint_tensors(str(out)))


def test_a_tied_checkpoint_that_stores_its_head_too_needs_it_published_once(tmp_path):
    """Some tied checkpoints store lm_head.weight beside the embedding; config.json decides, not the file."""
    model = _model(tied=True)
    model.config.save_pretrained(tmp_path)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              str(tmp_path / "model.safetensors"))
    expected = checkpoint_tensors(str(tmp_path))
    assert "lm_head.weight" not in expected
    nbytes = check_against_checkpoint(_publish(list(model.named_parameters())), expected)
    assert nbytes == sum(t.numel() * 4 for t in state.values())


def test_a_tensor_whose_bytes_disagree_with_the_checkpoints_numel_fails_the_sync(model_dir):
    """Rank 0 packed only part of a tensor (a ZeRO-3 shard, say) under the full shape, in a bucket of the full size:
    names, shapes and the bucket total all look right; the tensor's bytes are half the checkpoint's numel. Before,
    the expected bytes were computed from the published shapes and this passed."""
    out, model, _ = model_dir
    update = _publish(list(model.named_parameters()))
    victim = "model.layers.0.mlp.up_proj.weight"
    bucket = next(b for b in update.buckets if any(m.name == victim for m in b.tensors))
    bucket.tensors = [dataclasses.replace(m, nbytes=m.nbytes // 2) if m.name == victim else m for m in bucket.tensors]
    with pytest.raises(SyncError, match=rf"{victim} is published as 1024 bytes but the checkpoint's \[32, 16\] "
                                        r"torch.float32 needs 2048"):
        check_against_checkpoint(update, checkpoint_tensors(str(out)))
