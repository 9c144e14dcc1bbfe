"""Checkpoints, driver side: a checkpoint exists once the driver has committed it.

Every learner rank writes its DeepSpeed files under ``checkpoints/<tag>/`` (DeepSpeed's own ``latest`` pointer is
not written). Only when every rank has returned does the driver write ``checkpoints/committed.json``, atomically
(temporary file, fsync, rename): the tag, the iteration to continue from, and every piece of driver-held state that
changes the run — the prompt sampler's position, the reward normalisation moments, and the metrics row of the
iteration just finished (so a driver killed between the commit and the log line loses no row). ``--resume`` reads
only this file, so a checkpoint that some rank did not finish is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMMIT = "committed.json"
STORAGE_PROBE = ".oirl-storage-probe"  # under --out: written by the driver, read by every learner rank at start


def write_storage_probe(out_dir: Path, token: str) -> Path:
    """The file every learner rank must see before training starts (``check_storage_probe``): ``token`` (the run's
    id), written atomically under ``out_dir``, which ranks on other nodes see only if it is on shared storage."""
    path = out_dir / STORAGE_PROBE
    tmp = out_dir / f"{STORAGE_PROBE}.tmp-{os.getpid()}"
    with tmp.open("w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def check_storage_probe(path: str, token: str, rank: int) -> None:
    """A learner rank's check, at start, that it sees ``path`` as the driver wrote it for this run: the rank's
    checkpoint files and the driver's commit record must land in one place, or --resume finds a checkpoint some
    ranks cannot load (multi-node: --out on a node's local disk). Raises naming the rank and its node."""
    import socket

    try:
        seen: str | None = Path(path).read_text()
    except FileNotFoundError:
        seen = None
    if seen == token:
        return
    node = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            node += f" (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except ImportError:  # benchmarks.gpu_check runs a rank without Ray
        pass
    found = "does not exist there" if seen is None else f"holds another run's id ({seen[:32]!r}, not {token!r})"
    raise RuntimeError(
        f"learner rank {rank} on node {node} does not see the file the driver wrote under --out: {path} {found}. "
        "Every learner rank writes its checkpoint files under --out and the driver commits them there, so --out "
        "must be on storage that the driver's node and every learner node mount at the same path (KubeRay: the "
        "ReadWriteMany claim oirl-checkpoints mounted at /checkpoints, as deploy/kuberay/*.yaml do; an absolute "
        "--out under it)")


def commit(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> None:
    """Make checkpoint ``tag`` (already written by every rank) the one --resume continues from."""
    record = {"tag": tag, **state}
    tmp = ckpt_dir / f".{COMMIT}.tmp-{os.getpid()}"
    with tmp.open("w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / COMMIT)
    fd = os.open(ckpt_dir, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_failure(directory: str | Path, tag: str, error: BaseException) -> str:
    """What a failed checkpoint write says: where, what was raised, and the space left there (a full disk is the
    usual cause, and DeepSpeed reports it only as a stream or zip-container error)."""
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
        space = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.0f} GiB on the filesystem of {where}"
        if usage.free < 2**30:
            space += ": it is full; free space there, lower checkpoint_keep, or point --out at a larger volume"
    except OSError as e:
        space = f"free space unknown ({e})"
    return f"writing checkpoint {tag} under {directory} failed ({type(error).__name__}: {error}); {space}"


def read_commit(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / COMMIT
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not (ckpt_dir / record["tag"]).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {record['tag']} but {ckpt_dir / record['tag']} is missing")
    return record


def prune(ckpt_dir: Path, keep: int, committed_tag: str) -> list[str]:
    """Delete all but the newest ``keep`` committed checkpoints (tags sort by iteration); never the committed one
    or anything newer than it (an uncommitted one is overwritten by the next save of the same tag)."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    done = [t for t in tags if t <= committed_tag]
    removed = done[: max(0, len(done) - keep)]
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return removed
