"""EnginePool: the driver's handle on the N RolloutWorker actors.

Public methods:
    submit(prompts, iteration, version, seeds) -> Generation   # every shard submitted at once
    collect(generation, resync) -> pa.Table                    # one wait; RolloutBatch rows
    node_ids() -> list[str]
    shutdown()

An engine that dies mid-generate (killed, OOM, node lost) is replaced: a fresh actor is started, the learner's
current weights are synced to it and verified (version and worker-computed fingerprint, ``resync``), and its shard
is generated again with the same per-prompt seeds, so the batch is exactly the one the dead engine would have
returned. At most ``rollout.max_restarts`` replacements per run; past that the error names the engine and tells the
user to ``--resume``. Every wait has ``rollout.timeout_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from actors.rollout_worker import RolloutConfig, RolloutWorker
from oirl import faults
from oirl.batch import generate_seconds, with_generate_seconds
from oirl.logs import role_log
from oirl.remote import ActorDiedError, RemoteError, get_all, log_of, note_log

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """One batch being generated: its shards (prompts, seeds) per engine, the engines with a non-empty shard and
    one ref per such engine."""

    iteration: int
    version: int
    shards: list[tuple[list[Any], list[int]]]
    engines: list[int] = field(default_factory=list)
    refs: list[Any] = field(default_factory=list)


class EnginePool:
    def __init__(self, cfg: RolloutConfig, model_path: str, dtype: str, seed: int, run_id: str,
                 options: dict[str, Any], log_dir: str = ""):
        """log_dir: engine i's output goes to log_dir/rollout-<i>.log (oirl/logs.py); "" leaves it to Ray."""
        self.cfg, self.model_path, self.dtype, self.seed, self.run_id = cfg, model_path, dtype, seed, run_id
        self.options, self.log_dir = options, log_dir
        self.restarts = 0
        self.engines = [self._spawn(i) for i in range(cfg.num_engines)]

    def _spawn(self, i: int) -> Any:
        name = f"oirl-engine-{self.run_id}-{i}" + (f"-r{self.restarts}" if self.restarts else "")
        log_file = role_log(self.log_dir, f"rollout-{i}")  # a replacement appends to the same file
        note_log(f"engine {i}", log_file)
        return (ray.remote(RolloutWorker).options(**self.options, name=name)
                .remote(self.cfg, self.model_path, self.dtype, self.seed, i, log_file))

    def node_ids(self) -> list[str]:
        return get_all([e.node_id.remote() for e in self.engines], self.cfg.timeout_s, "engine start-up",
                       [f"engine {i}" for i in range(len(self.engines))])

    def submit(self, prompts: list[Any], iteration: int, version: int, seeds: list[int]) -> Generation:
        """Start generating the batch of ``iteration`` on every engine (they serve ``version``); collect() it.

        prompts: oirl.data.Prompt rows; seeds: one per prompt."""
        n = len(self.engines)
        gen = Generation(iteration, version, [(prompts[i::n], seeds[i::n]) for i in range(n)])
        gen.engines = [i for i in range(n) if gen.shards[i][0]]
        gen.refs = [self._submit(gen, i) for i in gen.engines]
        faults.point("generate", iteration)
        if faults.actor_to_kill("engine", iteration):
            logger.warning("OIRL_FAULT: killing engine 0 during generate of iteration %d", iteration)
            ray.kill(self.engines[0], no_restart=True)
        return gen

    def _submit(self, gen: Generation, i: int) -> Any:
        ps, ss = gen.shards[i]
        rows = ([{"prompt_id": p.prompt_id, "question": p.text, "answer": p.reference} for p in ps]
                if self.cfg.env else None)
        return self.engines[i].generate.remote([p.prompt_id for p in ps], [p.token_ids for p in ps], gen.version, ss,
                                               rows)

    def collect(self, gen: Generation, resync: Callable[[Any], int], settle: bool = False) -> pa.Table:
        """Wait for every shard of ``gen``. resync(engine) loads the learner's current version into a replacement
        engine and returns that version (the shard is then regenerated with it and the same seeds). ``settle``: let
        the other engines finish their shards before resync (the collective transport re-forms its group with every
        engine, and an engine joins only after its generate call; sync.timeout_s would otherwise have to cover the
        rest of their generation)."""
        what = f"generate (iteration {gen.iteration})"
        while True:
            try:
                shards = get_all(gen.refs, self.cfg.timeout_s, what, [f"engine {i}" for i in gen.engines],
                                 hint="rollout.timeout_s bounds each generate call")
                # The engines ran side by side: the batch took as long as its slowest shard.
                return with_generate_seconds(pa.concat_tables(shards),
                                             max(generate_seconds(t) or 0.0 for t in shards))
            except ActorDiedError as e:
                i = gen.engines[e.index]
                if self.restarts >= self.cfg.max_restarts:
                    raise RemoteError(f"engine {i} died during generate of iteration {gen.iteration} and "
                                      f"rollout.max_restarts={self.cfg.max_restarts} replacements are used up; "
                                      f"rerun with --resume to continue from the last checkpoint{log_of(f'engine {i}')}"
                                      ) from e
                self.restarts += 1
                logger.warning("engine %d died during generate of iteration %d (%s); replacing it (%d/%d)", i,
                               gen.iteration, type(e.__cause__).__name__, self.restarts, self.cfg.max_restarts)
                self.engines[i] = self._spawn(i)  # vLLM starts while the others finish
                if settle:
                    others = [r for k, r in enumerate(gen.refs) if k != e.index]
                    ray.wait(others, num_returns=len(others), timeout=self.cfg.timeout_s)  # get_all names a late one
                # Started before the sync: sync.timeout_s bounds the sync, not vLLM's start-up.
                get_all([self.engines[i].node_id.remote()], self.cfg.timeout_s, f"starting replacement engine {i}",
                        [f"engine {i}"], hint="rollout.timeout_s bounds an engine's start-up")
                gen.version = resync(self.engines[i])
                gen.refs[e.index] = self._submit(gen, i)  # the others' finished results are fetched again, cheaply

    def shutdown(self) -> None:
        for i, e in enumerate(self.engines):
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except ray.exceptions.RayActorError:  # already gone (the error that ends the run says why): no traceback
                logger.info("engine %d was gone at shutdown", i)
            except Exception:  # the engine may be the reason we are here; do not hide the original error
                logger.warning("engine %d shutdown failed%s", i, log_of(f"engine {i}"), exc_info=True)
