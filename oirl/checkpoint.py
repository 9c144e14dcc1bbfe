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
