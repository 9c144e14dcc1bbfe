"""/dev/shm on a node several users share (oirl/weights.py, learner/weight_export.py): every file oirl creates there
is private to its owner from its creation, and the cleaner leaves other users' files alone instead of failing on
them. The other user is real: files chowned to uid 65534, and a forked child that setuid()s to it (needs root)."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import stat
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from learner.weight_export import WeightPublisher
from oirl.weights import claim_shm, clean_stale_shm, shm_bucket_path, shm_lock_path

OTHER = 65534  # nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: chown and setuid need root")


@pytest.fixture
def shm_dir():
    """A directory like /dev/shm itself (world-writable, sticky), so another uid can reach the files in it: a
    PermissionError then comes from a file's own mode, not from the directory on the way."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="shm-owners-test-", dir=base)
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_uid(uid: int, fn, *args):
    """Run fn(*args) in a forked child that has become ``uid`` (no groups); returns its result, or the exception it
    raised, as a value."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = ("ok", fn(*args))
            except Exception as e:  # reported to the parent as a value
                out = ("raised", e)
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)[1]


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _chown(path: str, uid: int) -> None:
    os.chown(path, uid, uid)


def test_a_bucket_file_is_readable_by_its_owner_only(shm_dir, monkeypatch):
    """Before: bucket files were np.memmap(mode='w+'): 0644, the policy's weights readable by every user."""
    control = os.path.join(shm_dir, "world-readable.bin")
    with open(control, "wb") as f:  # the directory lets the other user read a 0644 file: the check below is real
        f.write(b"ok")
    os.chmod(control, 0o644)
    assert as_uid(OTHER, read_file, control) == b"ok"

    # created 0600, not chmod'ed after: between the two another user could open it, and keep the descriptor
    for name in ("chmod", "fchmod"):
        monkeypatch.setattr(os, name, lambda *a, **k: pytest.fail("a bucket file was chmod'ed after creation"))
    publisher = SimpleNamespace(shm_free={}, shm_maps={})
    path = shm_bucket_path(shm_dir, "privrun1", 1, 0)
    buf = WeightPublisher._shm_buffer(publisher, path, 4096)  # what export_weights writes a bucket into
    buf[:] = np.arange(4096) % 251
    buf.flush()
    monkeypatch.undo()

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert np.array_equal(np.memmap(path, dtype=np.uint8, mode="c"), np.arange(4096) % 251)  # the engine's read
    err = as_uid(OTHER, read_file, path)
    assert isinstance(err, PermissionError), err


def test_another_users_dead_run_is_left_in_place(shm_dir, caplog):
    """Before: root (or any user the sticky bit lets through) removed another user's unlocked lock and buckets."""
    os.close(claim_shm(shm_dir, "theirs01"))  # a dead run: nobody holds its lock
    theirs = [shm_lock_path(shm_dir, "theirs01"), shm_bucket_path(shm_dir, "theirs01", 2, 0),
              shm_bucket_path(shm_dir, "theirorp", 5, 1)]  # the last: buckets with no lock at all
    for p in theirs[1:]:
        with open(p, "wb") as f:
            f.write(b"w")
    for p in theirs:
        _chown(p, OTHER)
    os.close(claim_shm(shm_dir, "minedead"))  # one of ours, dead: still cleaned
    ours = [shm_lock_path(shm_dir, "minedead"), shm_bucket_path(shm_dir, "minedead", 1, 0)]
    with open(ours[1], "wb") as f:
        f.write(b"m")

    with caplog.at_level(logging.DEBUG, logger="oirl.weights"):
        removed = clean_stale_shm(shm_dir, own_run_id="mylive01")
    assert sorted(removed) == sorted(ours)
    assert sorted(os.listdir(shm_dir)) == sorted(os.path.basename(p) for p in theirs)
    assert all(os.stat(p).st_uid == OTHER for p in theirs)
    assert f"owned by uid {OTHER}" in caplog.text


def test_learner_setup_as_another_user_passes_a_private_lock(shm_dir):
    """Learner set-up (claim_shm_dir) as uid 65534 on a node where root's run left its 0600 lock and buckets.
    Before: os.open of that lock raised PermissionError and set-up failed."""
    root_fd = claim_shm(shm_dir, "rootrun1")  # a live run of another user (root), lock held
    root_files = [shm_lock_path(shm_dir, "rootrun1"), shm_bucket_path(shm_dir, "rootrun1", 1, 0)]
    with open(root_files[1], "wb") as f:
        f.write(b"r")
    os.chmod(root_files[1], 0o600)
    os.close(claim_shm(shm_dir, "rootdead"))  # and a dead one: not nobody's to remove either
    root_files.append(shm_lock_path(shm_dir, "rootdead"))

    def setup_as_learner() -> tuple[int, int]:
        worker = SimpleNamespace(shm_dir=shm_dir, rank=0, run_id="nobody01", shm_lock=None)
        WeightPublisher.claim_shm_dir(worker)
        st = os.stat(shm_lock_path(shm_dir, "nobody01"))
        return st.st_uid, stat.S_IMODE(st.st_mode)

    try:
        got = as_uid(OTHER, setup_as_learner)
    finally:
        os.close(root_fd)
    assert got == (OTHER, 0o600), got  # set up, its own lock in place, private
    assert all(os.path.exists(p) and os.stat(p).st_uid == 0 for p in root_files)
