"""The shm transport's file reuse (learner/weight_export.py): a version's bucket files, once released as loaded, are
written again for the next version (same inode, pages already there), hold exactly that version's bytes, and are
deleted when released as failed or at close. A real torch model and real files; no Ray (export_weights with
transport='shm' needs none)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner.weight_export import WeightPublisher
from oirl.weights import fingerprint, unpack_bucket


class Publisher(WeightPublisher):
    """The publishing mixin over a small real model, with the attributes LearnerWorker gives it."""

    def __init__(self, shm_dir: str):
        torch.manual_seed(0)
        # four 384x384 layers of 591,360 bytes each: four equal-size 1 MiB buckets, the case where a kept file
        # could be handed to the wrong bucket
        lm = torch.nn.Sequential(*(torch.nn.Linear(384, 384) for _ in range(4)))
        self.module = SimpleNamespace(lm=lm)
        self.rank, self.cfg, self.run_id, self.shm_dir = 0, SimpleNamespace(zero_stage=2), "reuse-test", shm_dir
        self.shm_files, self.shm_maps, self.shm_free, self.shm_lock = {}, {}, {}, None

    def step(self) -> None:
        with torch.no_grad():
            for p in self.module.lm.parameters():
                p.add_(torch.randn_like(p))

    def export(self, version: int):
        return self.export_weights(version, "shm", 1, self.shm_dir)  # 1 MiB buckets: one layer each


def read_back(update) -> dict[str, torch.Tensor]:
    """What an engine would load: every tensor read from the files by path."""
    out = {}
    buffers = [np.memmap(b.location, dtype=np.uint8, mode="r") for b in update.buckets]
    assert fingerprint(update.buckets, buffers) == update.fingerprint
    for b, buf in zip(update.buckets, buffers):
        out.update({n: t.clone() for n, t in unpack_bucket(b, buf)})
    return out


def inodes(update) -> list[int]:
    return [os.stat(b.location).st_ino for b in update.buckets]


@pytest.fixture()
def pub(tmp_path):
    p = Publisher(str(tmp_path))
    yield p
    p.close_shm()


def kept_mappings(pub) -> set[int]:
    return {id(m) for kept in pub.shm_free.values() for _, m in kept}


def test_loaded_versions_files_are_reused_with_the_new_bytes(pub, tmp_path):
    v1 = pub.export(1)
    assert [b.nbytes for b in v1.buckets] == [591_360] * 4
    first = inodes(v1)
    pub.release_weights(1, reuse=True)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(b.location) for b in v1.buckets)
    kept = kept_mappings(pub)
    assert len(kept) == 4
    pub.step()
    v2 = pub.export(2)
    # The same files and the same mappings (a new file, or the kept one opened again with mode w+, would have
    # cost the page faults this exists to save; inode numbers alone can be recycled by the filesystem).
    assert {id(m) for m in pub.shm_maps.values()} == kept and pub.shm_free[(str(tmp_path), 591_360)] == []
    assert sorted(inodes(v2)) == sorted(first), "the loaded version's files must be written again, not new ones"
    assert all("-v2-" in name for name in os.listdir(tmp_path)), "renamed to the new version: no stale names"
    state = {n: p.detach() for n, p in pub.module.lm.named_parameters()}
    got = read_back(v2)
    assert got.keys() == state.keys() and all(torch.equal(got[n], state[n]) for n in state)
    assert v2.fingerprint != v1.fingerprint
    # The same version exported again (a retried sync, benchmarks/sync.py's floor): its own files, intact.
    pub.release_weights(2, reuse=True)
    again = pub.export(2)
    assert inodes(again) == inodes(v2) and again.fingerprint == v2.fingerprint
    assert all(torch.equal(read_back(again)[n], state[n]) for n in state)


def test_failed_versions_files_are_deleted_never_reused(pub, tmp_path):
    v1 = pub.export(1)
    pub.release_weights(1, reuse=False)  # a sync whose load failed: an engine may still be reading
    assert os.listdir(tmp_path) == [] and pub.shm_free == {}
    pub.export(2)
    assert len(os.listdir(tmp_path)) == len(v1.buckets)


def test_kept_files_removed_under_the_run_or_resized_are_replaced(pub, tmp_path):
    pub.export(1)
    pub.release_weights(1, reuse=True)
    for name in os.listdir(tmp_path):  # someone cleaned /dev/shm between two syncs
        os.unlink(tmp_path / name)
    pub.step()
    v2 = pub.export(2)
    state = {n: p.detach() for n, p in pub.module.lm.named_parameters()}
    assert all(torch.equal(read_back(v2)[n], state[n]) for n in state)
    # The same version's paths kept at one size and exported again at another (a different model under the same
    # run id): the kept files are dropped, not handed out at the wrong size.
    pub.release_weights(2, reuse=True)
    pub.module.lm = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))
    again = pub.export(2)
    assert [b.nbytes for b in again.buckets] != [b.nbytes for b in v2.buckets]
    state = {n: p.detach() for n, p in pub.module.lm.named_parameters()}
    assert all(torch.equal(read_back(again)[n], state[n]) for n in state)


def test_close_deletes_the_kept_files(pub, tmp_path):
    pub.export(1)
    pub.release_weights(1, reuse=True)
    assert os.listdir(tmp_path)
    pub.close_shm()
    assert os.listdir(tmp_path) == [] and pub.shm_free == {} and pub.shm_maps == {}
