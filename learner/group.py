"""LearnerGroup: spawns the M LearnerWorker ranks as Ray actors and calls them together.

One placement group keeps the ranks' resources reserved together (PACK: on one node when it fits). Every call
fans out to all ranks first and then waits once, with the configured timeout, failing as soon as any rank fails:
a dead or stuck rank surfaces as an error naming the rank (and telling the user to --resume) instead of a hang
while its peers sit in a collective.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.learner_worker import LearnerConfig, LearnerWorker
from oirl.logs import role_log
from oirl.remote import get_all, note_log

logger = logging.getLogger(__name__)


def rank_bundles(cfg: LearnerConfig, resources: dict[str, float] | None = None) -> list[dict[str, float]]:
    """One placement-group bundle per rank: CPUs, GPUs and any custom resources (oirl.plan pins node groups)."""
    bundle = {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus else {}), **(resources or {})}
    return [dict(bundle) for _ in range(cfg.num_ranks)]


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, model_path: str, dtype: str, seed: int, temperature: float,
                 run_id: str, micro_batch: int, resources: dict[str, float] | None = None,
                 storage_probe: tuple[str, str] | None = None, log_dir: str = ""):
        """resources: extra custom resources per rank (e.g. {'oirl_learner': 1} to pin ranks to a node group).
        storage_probe: (path, token) of the file the driver wrote under --out; every rank checks that it sees it
        before anything is loaded (oirl.checkpoint.check_storage_probe). log_dir: rank r's output goes to
        log_dir/learner-<r>.log (oirl/logs.py); "" leaves it to Ray."""
        self.cfg = cfg
        bundles = rank_bundles(cfg, resources)
        self.pg = placement_group(bundles, strategy="PACK", name=f"oirl-learner-{run_id}")
        try:
            ray.get(self.pg.ready(), timeout=cfg.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            ray.util.remove_placement_group(self.pg)  # a pending group would keep claiming what it waits for
            raise RuntimeError(
                f"learner placement group {bundles} was not placed within {cfg.timeout_s}s: the cluster lacks "
                "the CPUs/GPUs; lower learner.num_ranks or learner.num_cpus, or add nodes"
            ) from e
        remote_cls = ray.remote(LearnerWorker)
        self.names = [f"oirl-learner-{run_id}-rank{r}" for r in range(cfg.num_ranks)]
        logs = [role_log(log_dir, f"learner-{r}") for r in range(cfg.num_ranks)]
        for r in range(cfg.num_ranks):
            note_log(f"learner rank {r} ({self.names[r]})", logs[r])
        self.workers = [
            remote_cls.options(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=resources or {},
                name=self.names[r],
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(cfg, r, model_path, dtype, seed, temperature, run_id, logs[r])
            for r in range(cfg.num_ranks)
        ]
        if storage_probe is not None:
            try:
                get_all(self.submit("check_storage", *storage_probe), cfg.timeout_s, "checking --out from every "
                        "learner rank", [f"learner rank {r} ({self.names[r]})" for r in range(cfg.num_ranks)])
            except Exception:
                for w in self.workers:
                    ray.kill(w)
                remove_placement_group(self.pg)
                raise
        ip, port = self._get([self.workers[0].master_address.remote()], "master_address")[0]
        self.setup_stats = self.call("setup", ip, port, micro_batch)

    def _get(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        timeout = timeout or self.cfg.timeout_s
        names = [f"learner rank {r} ({self.names[r]})" for r in range(len(refs))]
        return get_all(refs, timeout, f"learner call '{what}'", names,
                       hint="a learner rank cannot be replaced mid-run (its peers hold the other shards): rerun "
                            "with --resume to continue from the last checkpoint (raise learner.timeout_s if the "
                            "model is just slow)")

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Start ``method`` on every rank; wait() for the results."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def wait(self, refs: list[Any], method: str) -> list[Any]:
        return self._get(refs, method)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every rank and return the per-rank results (rank order)."""
        return self._get(self.submit(method, *args, **kwargs), method)

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on every rank (collectives need all of them) and return rank 0's result."""
        return self.call(method, *args, **kwargs)[0]

    def close_shm(self, timeout: float = 30.0) -> None:
        """Remove this run's /dev/shm files; short timeout: it runs on the way out, maybe after a failure."""
        self._get(self.submit("close_shm"), "close_shm", timeout)

    def shutdown(self) -> None:
        try:
            self.close_shm()
        except Exception:  # a dead rank: its files go at the next start (oirl.weights.clean_stale_shm)
            logger.warning("could not remove the learner's /dev/shm files", exc_info=True)
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
