"""LearnerGroup: spawns the M LearnerWorker ranks as Ray actors and calls them together.

One placement group keeps the ranks' resources reserved together (PACK: on one node when it fits). Every call
fans out to all ranks first and then waits once, with the configured timeout, so a dead or stuck rank surfaces as
an error naming the rank instead of a hang.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.learner_worker import LearnerConfig, LearnerWorker

logger = logging.getLogger(__name__)


def rank_bundles(cfg: LearnerConfig, resources: dict[str, float] | None = None) -> list[dict[str, float]]:
    """One placement-group bundle per rank: CPUs, GPUs and any custom resources (oirl.plan pins node groups)."""
    bundle = {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus else {}), **(resources or {})}
    return [dict(bundle) for _ in range(cfg.num_ranks)]


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, model_path: str, dtype: str, seed: int, temperature: float,
                 run_id: str, micro_batch: int, resources: dict[str, float] | None = None):
        """resources: extra custom resources per rank (e.g. {'oirl_learner': 1} to pin ranks to a node group)."""
        self.cfg = cfg
        bundles = rank_bundles(cfg, resources)
        self.pg = placement_group(bundles, strategy="PACK", name=f"oirl-learner-{run_id}")
        try:
            ray.get(self.pg.ready(), timeout=cfg.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(
                f"learner placement group {bundles} was not placed within {cfg.timeout_s}s: the cluster lacks "
                "the CPUs/GPUs; lower learner.num_ranks or learner.num_cpus, or add nodes"
            ) from e
        remote_cls = ray.remote(LearnerWorker)
        self.workers = [
            remote_cls.options(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=resources or {},
                name=f"oirl-learner-{run_id}-rank{r}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(cfg, r, model_path, dtype, seed, temperature, run_id)
            for r in range(cfg.num_ranks)
        ]
        ip, port = self._get([self.workers[0].master_address.remote()], "master_address")[0]
        self.setup_stats = self.call("setup", ip, port, micro_batch)

    def _get(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        timeout = timeout or self.cfg.timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"learner call '{what}' did not finish within {timeout}s "
                               "(raise learner.timeout_s if the model is large)") from e

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every rank and return the per-rank results (rank order)."""
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.workers]
        return self._get(refs, method)

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on every rank (collectives need all of them) and return rank 0's result."""
        return self.call(method, *args, **kwargs)[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
