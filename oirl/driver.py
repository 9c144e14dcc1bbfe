"""The PPO driver: one loop, read top to bottom.

    for iteration k:  generate (version k) -> reward -> prepare (ref logprobs, values, GAE) -> update
                      -> weight sync (version k+1, verified) -> log / checkpoint

Strict on-policy: iteration k generates with weights version k and every sample is checked for it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.rollout_worker import RolloutWorker
from learner.group import LearnerGroup
from oirl.batch import add_column, validate_versions
from oirl.config import RunConfig
from oirl.data import PromptDataset
from oirl.metrics import MetricsLogger, plot_curves
from oirl.models import resolve_model
from oirl.plan import actor_options, placement_plan
from oirl.sync import choose_transport, sync_weights
from reward_server.reward_worker import spawn_reward_actor

logger = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict[str, float], phase: str):
    t0 = time.perf_counter()
    yield
    timings[f"timing_s/{phase}"] = time.perf_counter() - t0


def wait(refs: Any, timeout: float, what: str) -> Any:
    """ray.get with a timeout and an error that says which role was too slow."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(f"{what} did not finish within {timeout}s") from e


def start_ray(address: str, num_cpus: int) -> bool:
    """Join ``address`` (or RAY_ADDRESS) when given, else start an embedded local cluster of ``num_cpus`` logical
    CPUs with its own temp dir. Returns True when it started one."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # A `ray job submit` entrypoint already runs in the job's runtime env (working_dir or image): join as is.
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}},
             _temp_dir=f"/tmp/oirl-ray-{os.getpid()}")
    return True


def seeds_for(seed: int, iteration: int, prompt_ids: list[int]) -> list[int]:
    return [int(np.random.default_rng([seed, iteration, p]).integers(2**31 - 1)) for p in prompt_ids]


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # Everything that can fail on bad input fails here, before any actor starts.
    from transformers import AutoTokenizer

    model_path = str(resolve_model(cfg.model))
    dataset = PromptDataset(cfg.data, AutoTokenizer.from_pretrained(model_path))
    if resume and not (ckpt_dir / "latest").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}; run without --resume first")

    needed = sum(p.count * p.num_cpus for p in placement_plan(cfg))
    started = start_ray(cfg.ray_address, cfg.ray_num_cpus or max(int(np.ceil(needed)), os.cpu_count() or 1))
    run_id = uuid.uuid4().hex[:8]
    r = cfg.rollout
    engine_cls = ray.remote(RolloutWorker)
    engines = [engine_cls.options(**actor_options(cfg, "rollout"), name=f"oirl-engine-{run_id}-{i}")
               .remote(r, model_path, cfg.model.dtype, cfg.seed, i) for i in range(r.num_engines)]
    # A crashed reward actor is restarted by Ray and the lost score call retried on it (then a clear error).
    reward = spawn_reward_actor(cfg.reward, model_path, f"oirl-reward-{run_id}",
                                actor_options(cfg, "reward").get("resources"))
    micro_batch = cfg.batch_size // (cfg.learner.num_ranks * cfg.learner.num_minibatches)
    learner = LearnerGroup(cfg.learner, model_path, cfg.model.dtype, cfg.seed, r.temperature, run_id, micro_batch,
                           resources=actor_options(cfg, "learner").get("resources"))
    engine_nodes = wait([e.node_id.remote() for e in engines], r.timeout_s, "engine start-up")
    transport = choose_transport(cfg.sync.transport, learner.call_rank0("node_id"), engine_nodes)
    logger.info("%d engines, %d learner ranks (ZeRO-%d), weight transport %s", r.num_engines,
                cfg.learner.num_ranks, cfg.learner.zero_stage, transport)

    start = 0
    if resume:
        state = learner.call_rank0("load_checkpoint", str(ckpt_dir))
        start = int(state["iteration"])
        dataset.load_state(state["data"])
        sync_weights(learner, engines, start, cfg.sync, transport, canary=None)  # engines serve version `start`
        logger.info("resumed from %s at iteration %d", ckpt_dir, start)

    metrics_log = MetricsLogger(out, start)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc="PPO", unit="it", dynamic_ncols=True)
    last: dict[str, Any] = {}
    try:
        for it in range(start, cfg.iterations):
            t_iter = time.perf_counter()
            timings: dict[str, float] = {}

            with timed(timings, "generate"):
                prompts = dataset.next_batch()
                shards = [prompts[i:: r.num_engines] for i in range(r.num_engines)]
                refs = [e.generate.remote([p.prompt_id for p in s], [p.token_ids for p in s], it,
                                          seeds_for(cfg.seed, it, [p.prompt_id for p in s]))
                        for e, s in zip(engines, shards) if s]
                batch = pa.concat_tables(wait(refs, r.timeout_s, f"generate (iteration {it})"))
                validate_versions(batch, it)
                refs_by_id = {p.prompt_id: p.reference for p in prompts}
                batch = add_column(batch, "reference", [refs_by_id[i] for i in batch.column("prompt_id").to_pylist()])

            with timed(timings, "reward"):
                rewards = wait(reward.score.remote(batch), cfg.reward.timeout_s, f"reward (iteration {it})")
                batch = add_column(batch, "reward", rewards)

            with timed(timings, "prepare"):  # old + reference logprobs, values, KL-shaped rewards, GAE
                prep = learner.call_rank0("prepare", ray.put(batch), it)

            with timed(timings, "update"):
                upd = learner.call_rank0("update")

            with timed(timings, "sync"):  # publish version it+1 to every engine, verified
                canary = batch.slice(0, cfg.sync.canary_samples)
                sync = sync_weights(learner, engines, it + 1, cfg.sync, transport, canary)

            with timed(timings, "checkpoint"):
                last_it = it + 1 == cfg.iterations
                if last_it or (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0):
                    state = {"iteration": it + 1, "data": dataset.state(), "run_id": run_id}
                    learner.call("save_checkpoint", str(ckpt_dir), f"iter_{it + 1:06d}", state)

            timings["timing_s/iteration"] = time.perf_counter() - t_iter
            versions = batch.column("policy_version").to_numpy()
            resp_tokens = pc.sum(pc.list_value_length(batch.column("response_token_ids"))).as_py()
            last = {
                "iteration": it,
                "rollout/policy_version_min": int(versions.min()),
                "rollout/policy_version_max": int(versions.max()),
                "rollout/samples": batch.num_rows,
                "rollout/response_tokens_mean": resp_tokens / batch.num_rows,
                "reward/mean": float(np.mean(rewards)),
                "reward/std": float(np.std(rewards)),
                "perf/gen_tokens_per_s": resp_tokens / timings["timing_s/generate"],
                "perf/samples_per_s": batch.num_rows / timings["timing_s/iteration"],
                **prep, **upd, **sync, **timings,
            }
            metrics_log.log(last)
            if bar is not None:
                bar.set_postfix(reward=f"{last['reward/mean']:.3f}", kl=f"{last['kl/mean']:.4f}",
                                tok_s=f"{last['perf/gen_tokens_per_s']:.0f}")
                bar.update(1)

        learner.call("save_hf", str(out / "final"))
        metrics_log.close()
        plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"oirl PPO: {cfg.model.path}")
        return last
    finally:
        if bar is not None:
            bar.close()
        for e in engines:
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception:  # the engine may be the reason we are here; do not hide the original error
                logger.warning("engine shutdown failed", exc_info=True)
        if started:
            ray.shutdown()
