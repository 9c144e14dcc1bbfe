"""Waiting on remote calls: every wait has a timeout and fails fast, naming the actor.

``ray.get(list)`` waits for the refs in order, so when a later actor dies while an earlier one sits in a
collective with it, the driver would wait for the earlier one's (long) collective timeout. ``get_all`` returns as
soon as any call fails and says which actor, and what the user can do about it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray

# Display name of an actor (as callers name it to get_all: "engine 0", "learner rank 1 (oirl-learner-...)", "the
# reward actor") -> the file its output goes to (oirl/logs.py), so an error about it says where to look.
LOG_FILES: dict[str, str] = {}


def note_log(name: str, path: str) -> None:
    """Errors about the actor called ``name`` will name ``path`` (its log file); "" forgets it."""
    if path:
        LOG_FILES[name] = path
    else:
        LOG_FILES.pop(name, None)


def log_of(name: str) -> str:
    """' (its log: PATH)' for an actor whose output goes to a file, else ''."""
    return f" (its log: {LOG_FILES[name]})" if name in LOG_FILES else ""


class RemoteError(RuntimeError):
    """A remote call failed or its actor died; the message names the actor."""


class ActorDiedError(RemoteError):
    """The actor's process is gone (killed, OOM, node lost)."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def get_all(refs: Sequence[Any], timeout: float, what: str, names: Sequence[str] | None = None,
            hint: str = "") -> list[Any]:
    """Results of ``refs`` in order. Raises TimeoutError (naming the calls still running) after ``timeout``
    seconds, ActorDiedError when an actor died, RemoteError when a call raised; ``hint`` is appended (what to do)."""
    names = list(names) if names is not None else [f"call {i}" for i in range(len(refs))]
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = time.monotonic() + timeout
    suffix = f"; {hint}" if hint else ""
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = ", ".join(names[index[r]] + log_of(names[index[r]]) for r in pending)
            raise TimeoutError(f"{what} did not finish within {timeout}s (still running: {late}){suffix}")
        for ref in ready:
            i = index[ref]
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise ActorDiedError(f"{what}: actor {names[i]} died ({type(e).__name__}){log_of(names[i])}{suffix}",
                                     i) from e
            except ray.exceptions.RayTaskError as e:
                raise RemoteError(f"{what}: {names[i]} failed{log_of(names[i])}: {e}{suffix}") from e
    return ray.get(list(refs))
