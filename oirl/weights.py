"""The weight-sync wire format: named tensors packed into a few large flat byte buckets.

The learner packs HF-named tensors into buckets of at most ``bucket_bytes`` (one tensor never splits; a tensor
larger than the limit gets a bucket of its own). Each bucket is one uint8 buffer plus a list of TensorMeta, so a
sync is a handful of large transfers, never one RPC per parameter. The fingerprint is an XXH3-128 hash of every
bucket's metadata and bytes in order; the learner computes it when packing, each engine recomputes it on what it
received before loading, and reports it with the version it serves.

Transports (chosen by ``sync.transport``):
- ``shm``: each bucket is a file in /dev/shm written in place by the learner and memory-mapped by the engine
  (engines on the learner's node; one copy on each side).
- ``object_store``: each bucket is a Ray object (zero-copy numpy on the same node, Ray's transfer across nodes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

logger = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # str(torch.dtype), e.g. 'torch.float32'
    shape: tuple[int, ...]
    offset: int  # byte offset inside the bucket
    nbytes: int


@dataclass
class Bucket:
    """One flat buffer of packed tensors; ``location`` is a /dev/shm path or a Ray ObjectRef."""

    tensors: list[TensorMeta]
    nbytes: int
    location: Any = None


@dataclass
class WeightUpdate:
    """What the learner publishes for one version: buckets + version + fingerprint."""

    version: int
    transport: str
    buckets: list[Bucket] = field(default_factory=list)
    fingerprint: str = ""
    nbytes: int = 0
    pack_seconds: float = 0.0


def bucket_to_wire(bucket: Bucket) -> dict[str, Any]:
    """Plain data for vLLM's msgpack RPC (dataclasses arrive as dicts there; ObjectRefs cannot cross at all)."""
    return {"nbytes": bucket.nbytes,
            "tensors": [[m.name, m.dtype, list(m.shape), m.offset, m.nbytes] for m in bucket.tensors]}


def bucket_from_wire(data: dict[str, Any] | Bucket) -> Bucket:
    if isinstance(data, Bucket):
        return data
    return Bucket([TensorMeta(n, d, tuple(s), o, b) for n, d, s, o, b in data["tensors"]], data["nbytes"])


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    return [g for g in groups if g]


def bucket_layout(group: list[tuple[str, torch.Tensor]]) -> Bucket:
    """Where each tensor of a group goes in its bucket (only shapes and dtypes are read: ``meta`` tensors do)."""
    metas, offset = [], 0
    for name, t in group:
        n = t.numel() * t.element_size()
        metas.append(TensorMeta(name, str(t.dtype), tuple(t.shape), offset, n))
        offset += n
    return Bucket(metas, offset)


def write_tensor(buf: np.ndarray, meta: TensorMeta, t: torch.Tensor) -> None:
    """Copy ``t``'s bytes (from any device) into its place ``meta`` in the bucket buffer ``buf``."""
    assert buf.flags.writeable, "bucket buffer must be writable"
    view = torch.from_numpy(buf)
    view[meta.offset: meta.offset + meta.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))


def pack_bucket(group: list[tuple[str, torch.Tensor]], alloc: Callable[[int], np.ndarray]) -> tuple[Bucket, np.ndarray]:
    """Copy a group of tensors into one buffer from ``alloc(nbytes)`` (a memmap or a plain array)."""
    bucket = bucket_layout(group)
    buf = alloc(bucket.nbytes)
    for meta, (_, t) in zip(bucket.tensors, group):
        write_tensor(buf, meta, t)
    return bucket, buf


def unpack_bucket(bucket: Bucket, buf: np.ndarray | torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into ``buf`` (no copy): the engine's reload copies them into its own parameters. ``buf`` is a host
    buffer, or a flat uint8 tensor on any device (the collective transport's receive buffer on the engine's GPU:
    the views stay there, so the reload copies device to device)."""
    if isinstance(buf, torch.Tensor):
        raw = buf.view(torch.uint8).reshape(-1)
    elif not buf.nbytes:
        raw = torch.empty(0, dtype=torch.uint8)
    else:
        raw = torch.frombuffer(memoryview(buf), dtype=torch.uint8)  # type: ignore[arg-type]
    for m in bucket.tensors:
        yield m.name, raw[m.offset: m.offset + m.nbytes].view(_DTYPES[m.dtype]).view(m.shape)


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 tensor's bytes as a host array for ``fingerprint``: a view on the CPU, a device-to-host copy of
    an accelerator's tensor (XXH3 runs on the CPU; the reload still reads the tensor where it is)."""
    return tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy()


def fingerprint(buckets: list[Bucket], buffers: list[np.ndarray]) -> str:
    """XXH3-128 over every tensor's metadata (name, dtype, shape, offset, size), then every bucket's bytes, in order.

    XXH3 runs at memory speed (20 GB/s measured on this 2-core box, BLAKE2b 1 GB/s), so hashing 0.5 GB on both sides
    costs tens of milliseconds instead of ~1 s. A non-cryptographic hash is the right tool here: the check catches
    corrupt, truncated, stale or mislabelled weights; whoever could forge bytes in the learner's buffers could forge
    the fingerprint beside them too."""
    h = xxhash.xxh3_128()
    for bucket in buckets:
        for m in bucket.tensors:
            h.update(f"{m.name}|{m.dtype}|{m.shape}|{m.offset}|{m.nbytes};".encode())
    for buf in buffers:
        h.update(memoryview(buf).cast("B"))  # type: ignore[arg-type]
    return h.hexdigest()


# ---- /dev/shm hygiene ---------------------------------------------------------------------------------------------
# A run's bucket files are /dev/shm/oirl-<run_id>-v<version>-b<i>.bin. While the run lives, its learner rank 0 holds
# an flock on /dev/shm/oirl-<run_id>.lock; the kernel drops the lock when that process dies in any way (kill -9
# included), so a later start can tell a dead run's leftovers (a full model copy per version, which on KubeRay fills
# the in-memory volume) from a live run's files and remove only the former.
#
# /dev/shm may be shared by several users of the node: every file oirl creates there is created 0600 (the policy's
# weights are not for other users to read; a chmod after creation would leave a window), and the cleaner looks only
# at files its own user owns (another user's run is theirs to clean, and its 0600 lock cannot even be opened).


def shm_free_bytes(shm_dir: str) -> int:
    """Bytes an unprivileged writer may still allocate in ``shm_dir`` (statvfs: available blocks x block size)."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def shm_bucket_path(shm_dir: str, run_id: str, version: int, index: int) -> str:
    return os.path.join(shm_dir, f"oirl-{run_id}-v{version}-b{index}.bin")


def shm_lock_path(shm_dir: str, run_id: str) -> str:
    return os.path.join(shm_dir, f"oirl-{run_id}.lock")


def claim_shm(shm_dir: str, run_id: str) -> int:
    """Hold this run's lock for the life of the calling process; returns the file descriptor (keep it open).

    The lock file is created and locked under a temporary name, then renamed into place, so a cleaner never sees
    an unlocked lock file of a live run."""
    import fcntl

    tmp = os.path.join(shm_dir, f"oirl-{run_id}.lock.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, shm_lock_path(shm_dir, run_id))
    return fd


def create_shm_file(path: str, nbytes: int) -> np.memmap:
    """A new file of ``nbytes`` (at least 1) at ``path``, private to its owner from its creation (0600), mapped
    writable. A leftover of ours at that path is removed first: an engine that still maps it keeps its pages."""
    remove_if_present(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "r+b") as f:  # the mapping outlives the file object
        return np.memmap(f, dtype=np.uint8, mode="r+", shape=(max(nbytes, 1),))


def _ours(path: str) -> bool:
    """Whether this process's user owns ``path`` (False when it is gone); other users' files are left alone."""
    try:
        uid = os.lstat(path).st_uid
    except FileNotFoundError:
        return False
    if uid != os.geteuid():
        logger.debug("leaving %s alone: owned by uid %d, not by this process's uid %d", path, uid, os.geteuid())
        return False
    return True


def clean_stale_shm(shm_dir: str, own_run_id: str = "") -> list[str]:
    """Remove the bucket files (and lock) of every run of this user whose lock nobody holds; returns the removed
    paths. Files another user owns are skipped, whatever their state."""
    import fcntl
    import glob

    removed: list[str] = []
    live: set[str] = {own_run_id}
    dead: set[str] = set()
    for lock in glob.glob(os.path.join(shm_dir, "oirl-*.lock")):
        run = os.path.basename(lock)[len("oirl-"): -len(".lock")]
        if run in live or not _ours(lock):
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError as e:  # gone meanwhile, or not ours to open after all (replaced under us)
            logger.debug("skipping %s: %s", lock, e)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(run)
        else:
            dead.add(run)
            _unlink(lock, removed)
        finally:
            os.close(fd)
    for path in glob.glob(os.path.join(shm_dir, "oirl-*-v*-b*.bin")):
        run = os.path.basename(path)[len("oirl-"):].rsplit("-v", 1)[0]
        if run not in live and _ours(path):  # dead, or no lock at all (never buckets before the lock)
            _unlink(path, removed)
    return removed


def remove_if_present(path: str) -> bool:
    """Delete ``path``; False when it was already gone (another rank, or a cleaner, removed it first)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _unlink(path: str, removed: list[str]) -> None:
    if remove_if_present(path):
        removed.append(path)


# ---- collective transport -----------------------------------------------------------------------------------------
# Learner rank 0 (rank 0 of this group, hosting its TCPStore) and every engine's worker (ranks 1..N) form one
# torch.distributed process group of their own, separate from DeepSpeed's group on the learner and vLLM's inside the
# engine: gloo on CPU, NCCL on GPU. Buckets are broadcast from rank 0, one collective per bucket, each with a timeout.


def join_weight_group(master_ip: str, master_port: int, rank: int, world: int, device: torch.device,
                      timeout_s: float) -> tuple[Any, Any]:
    """Join (rank 0: host) the weight-broadcast group; returns (process group, store) — keep both alive."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_ip, master_port, world, rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("oirl-weights", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world, opts), store
    return dist.ProcessGroupGloo(prefixed, rank, world, timeout), store


def leave_weight_group(handle: tuple[Any, Any] | None) -> None:
    """Abort the group ``join_weight_group`` returned, before a new one is formed (an engine was replaced).

    The old group still counts the dead engine as a member. Merely dropped, an NCCL group lives as long as anything
    references it (the broadcast that failed when the engine died keeps its work item, and the group, alive), and
    NCCL's watchdog then times that work out and, by default (TORCH_NCCL_ASYNC_ERROR_HANDLING), tears the whole
    process down; ``abort()`` ends the group's communicators now without waiting on any peer. The group was built
    directly, not through ``init_process_group``, so ``torch.distributed.destroy_process_group`` does not know it:
    ``abort`` is the group's own call for this. Gloo's is a no-op in torch 2.13 (its sockets close when the object
    goes, right after)."""
    if handle is None:
        return
    group, _store = handle
    try:
        group.abort()
    except Exception:  # a broken group is what is being discarded; the new one is what matters
        logger.warning("aborting the previous weight-broadcast group failed", exc_info=True)


def broadcast_bucket(group: Any, tensor: torch.Tensor, timeout_s: float) -> None:
    """One bucket from rank 0 to every member, in place; raises when it does not complete within timeout_s."""
    import datetime

    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait(datetime.timedelta(seconds=timeout_s))
