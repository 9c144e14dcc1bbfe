"""Fault injection: the switch that the fault-tolerance tests (and users running drills) use.

    OIRL_FAULT=kill:<phase>:<iteration>        SIGKILL the driver in the middle of <phase> of <iteration>
    OIRL_FAULT=kill-actor:<role>:<iteration>   kill one actor in the middle of its phase of <iteration>:
                                               engine -> engine 0 mid-generate, learner -> the last learner rank
                                               mid-update, reward -> the reward actor mid-score
    OIRL_FAULT=stale-engine:<iteration>        at the sync after <iteration>, every engine's worker receives and
                                               hashes the new weights but skips the reload, and reports success:
                                               the silent stale-weights failure; the served-weights digest (the
                                               model's own weights, unchanged while new bytes arrived) must stop
                                               the run at that sync
    OIRL_FAULT=no-loss-mask                    multi-turn episodes: the driver drops the batch's loss_mask, so the
                                               learner takes the environment's tokens for the policy's (what a
                                               trainer without the mask does); the on-policy check must stop it

Phases: generate, reward, prepare, update, sync, checkpoint. "In the middle" means after the phase's remote calls
were submitted (sync: after the learner exported the buckets, before the engines loaded them; checkpoint: after
every rank wrote its files, before the driver committed them). Several faults may be given, comma-separated.
Unset, every call here is a no-op. A fault fires once per output directory (it is recorded in
``<out>/faults_fired.json`` just before it acts), so the same command rerun with --resume runs through.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PHASES = ("generate", "reward", "prepare", "update", "sync", "checkpoint")
ROLE_PHASE = {"engine": "generate", "learner": "update", "reward": "reward"}


@dataclass(frozen=True)
class Fault:
    action: str  # 'kill' (the driver), 'kill-actor' or 'stale-engine'
    target: str  # a phase for 'kill', a role for 'kill-actor', 'engine' for 'stale-engine'
    iteration: int


def parse(spec: str) -> list[Fault]:
    """'kill:sync:1,kill-actor:engine:2' -> [Fault, ...]; a malformed spec is an error, never ignored."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        ok = len(fields) == 3 and fields[2].lstrip("-").isdigit()
        if part == "no-loss-mask":
            faults.append(Fault("no-loss-mask", "driver", -1))
        elif len(fields) == 2 and fields[0] == "stale-engine" and fields[1].isdigit():
            faults.append(Fault("stale-engine", "engine", int(fields[1])))
        elif ok and fields[0] == "kill" and fields[1] in PHASES:
            faults.append(Fault("kill", fields[1], int(fields[2])))
        elif ok and fields[0] == "kill-actor" and fields[1] in ROLE_PHASE:
            faults.append(Fault("kill-actor", fields[1], int(fields[2])))
        else:
            raise ValueError(f"OIRL_FAULT={spec!r}: cannot read {part!r}; use kill:<phase>:<iteration> with phase "
                             f"in {', '.join(PHASES)}, or kill-actor:<role>:<iteration> with role in "
                             f"{', '.join(ROLE_PHASE)}, or stale-engine:<iteration>, or no-loss-mask")
    return faults


_record: Path | None = None


def configure(out_dir: Path) -> None:
    """Validate OIRL_FAULT now (before any actor starts) and remember where fired faults are recorded."""
    global _record
    parse(os.environ.get("OIRL_FAULT", ""))
    _record = Path(out_dir) / "faults_fired.json"


def _fire(f: Fault) -> bool:
    """True (and recorded, durably) the first time ``f`` is reached for this output directory."""
    key = f"{f.action}:{f.target}:{f.iteration}"
    fired = json.loads(_record.read_text()) if _record is not None and _record.is_file() else []
    if key in fired:
        return False
    if _record is not None:
        with _record.open("w") as fh:
            json.dump([*fired, key], fh)
            fh.flush()
            os.fsync(fh.fileno())
    return True


def _matching(action: str, target: str, iteration: int) -> list[Fault]:
    return [f for f in parse(os.environ.get("OIRL_FAULT", ""))
            if f.action == action and f.target == target and f.iteration == iteration]


def point(phase: str, iteration: int) -> None:
    """Called by the driver in the middle of each phase: SIGKILLs this process when a fault names it."""
    for f in _matching("kill", phase, iteration):
        if _fire(f):
            logger.warning("OIRL_FAULT: killing the driver (SIGKILL) during %s of iteration %d", phase, iteration)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def actor_to_kill(role: str, iteration: int) -> bool:
    """True when OIRL_FAULT asks to kill the actor of ``role`` during ``iteration`` (the driver does the killing)."""
    return any(_fire(f) for f in _matching("kill-actor", role, iteration))


def stale_engine(iteration: int) -> bool:
    """True when OIRL_FAULT asks every engine to skip the reload of the sync after ``iteration`` (and report
    success anyway)."""
    fired = any(_fire(f) for f in _matching("stale-engine", "engine", iteration))
    if fired:
        logger.warning("OIRL_FAULT: every engine skips the reload of the sync after iteration %d", iteration)
    return fired


def no_loss_mask() -> bool:
    """True when OIRL_FAULT asks the driver to drop multi-turn batches' loss_mask (every iteration)."""
    return any(f.action == "no-loss-mask" for f in parse(os.environ.get("OIRL_FAULT", "")))
