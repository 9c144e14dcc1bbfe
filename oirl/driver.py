"""The PPO driver: one loop, read top to bottom.

    for iteration k:  generate (version k) -> reward -> prepare (ref logprobs, values, GAE) -> update
                      -> weight sync (version k+1, verified) -> checkpoint (committed) -> peak memory -> log

Strict on-policy (the default): iteration k generates with weights version k, every sample is checked for it, and
the learner's logprobs of the sampled tokens must match the engine's (sync.on_policy_tolerance). One-step-off
(rollout.async_steps=1): the batch of k+1 is generated with version k while the learner trains on batch k; samples
keep their version, the learner accepts versions >= k - 1 and corrects with truncated importance weights. Everything that changes the run
(weights, optimizer, sampler position, reward normalisation, the metrics row) is in the committed checkpoint, so
kill -9 at any point + --resume reproduces the uninterrupted run (OIRL_FAULT, oirl/faults.py, drills exactly that).
"""

from __future__ import annotations

import dataclasses
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
import pyarrow.parquet as pq
import ray

from actors.engine_pool import EnginePool
from learner.critic import check_critic_init
from learner.group import LearnerGroup
from oirl import checkpoint, faults
from oirl.batch import add_column, generate_seconds, validate_versions
from oirl.config import (
    GROUP_ALGORITHMS,
    OFFLINE_ENV,
    ConfigError,
    RunConfig,
    check_resume,
    fused_old_logprobs_blockers,
)
from oirl.data import PromptDataset
from oirl.groups import count_informative, fill_groups
from oirl.logs import log_dir, role_log
from oirl.metrics import MetricsLogger, plot_curves
from oirl.models import resolve_model
from oirl.plan import (
    NODE_GROUPS_WAIT_S,
    actor_options,
    check_node_groups,
    engine_config,
    model_context_window,
    placement_plan,
)
from oirl.remote import LOG_FILES, get_all, note_log
from oirl.sync import (
    canary_due,
    check_on_policy,
    checkpoint_tensors,
    choose_transport,
    form_weight_group,
    policy_bytes,
    sync_weights,
)
from reward_server.failures import drop_failed
from reward_server.reward_worker import spawn_reward_actor

logger = logging.getLogger(__name__)

PREFETCHED = "prefetched.parquet"  # async: the next iteration's batch, stored inside the checkpoint's folder


@contextmanager
def timed(timings: dict[str, float], phase: str):
    t0 = time.perf_counter()
    yield
    timings[f"timing_s/{phase}"] = time.perf_counter() - t0


def start_ray(address: str, num_cpus: int) -> bool:
    """Join ``address`` (or RAY_ADDRESS) when given, else start an embedded local cluster of ``num_cpus`` logical
    CPUs with its own temp dir. Returns True when it started one."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # A `ray job submit` entrypoint already runs in the job's runtime env (working_dir or image): join as is.
        ray.init(address=address, log_to_driver=True)
        return False
    # The caller's PYTHONPATH too: user code named in the config (reward.function, rollout.env) imports in actors.
    path = [str(Path(__file__).resolve().parent.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(path)), **OFFLINE_ENV}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
             _temp_dir=f"/tmp/oirl-ray-{os.getpid()}")
    return True


def seeds_for(seed: int, iteration: int, prompt_ids: list[int], round_: int = 0) -> list[int]:
    """One sampling seed per prompt of iteration ``iteration``, the same on --resume. A prompt drawn twice in one
    batch (the batch crosses an epoch boundary) gets a different seed each time, so its copies do not repeat each
    other's samples; ``round_`` > 0: the prompts of a dynamic-sampling refill (learner.dynamic_sampling)."""
    seen: dict[int, int] = {}
    seeds = []
    for p in prompt_ids:
        k = seen[p] = seen.get(p, -1) + 1
        key = [seed, iteration, p] + ([k] if k or round_ else []) + ([round_] if round_ else [])
        seeds.append(int(np.random.default_rng(key).integers(2**31 - 1)))
    return seeds


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          actor_logs: bool = False) -> dict[str, Any]:
    """actor_logs: each actor's output goes to its role's file under out/logs (oirl/logs.py: the CLI's default,
    off with --verbose); off, Ray forwards it to this process's terminal."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    committed = checkpoint.read_commit(ckpt_dir) if resume else None
    if resume and committed is None:
        raise FileNotFoundError(f"--resume: no committed checkpoint under {ckpt_dir}; run without --resume first")
    if committed is not None:  # a run continues with its own config: only oirl.config.RESUMABLE fields may change
        allowed = check_resume(out / "config.json", cfg)
        if cfg.iterations < committed["iteration"]:
            raise ConfigError(f"--resume: iterations={cfg.iterations} but the run has committed iteration "
                              f"{committed['iteration']}; set iterations >= {committed['iteration']}")
        if allowed:
            logger.info("resuming with changed settings: %s", "; ".join(allowed))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # Everything that can fail on bad input fails here, before any actor starts.
    from transformers import AutoTokenizer

    model_path = str(resolve_model(cfg.model))
    dataset = PromptDataset(cfg.data, AutoTokenizer.from_pretrained(model_path))
    expected_tensors = checkpoint_tensors(model_path)  # the independent count every sync is checked against
    engines_cfg = engine_config(cfg, model_context_window(model_path))  # vLLM sized to the run's sequences
    check_critic_init(cfg.learner.critic_init, model_path)  # a reward model the critic can start from
    faults.configure(out)  # a malformed OIRL_FAULT fails now; a fault fires once per output directory

    needed = sum(p.count * p.num_cpus for p in placement_plan(cfg))
    started = start_ray(cfg.ray_address, cfg.ray_num_cpus or max(int(np.ceil(needed)), os.cpu_count() or 1))
    run_id = uuid.uuid4().hex[:8]
    r = cfg.rollout
    pool = learner = None
    bar = None
    metrics_log: MetricsLogger | None = None
    try:
        check_node_groups(cfg, 0.0 if started else NODE_GROUPS_WAIT_S)  # pinned groups exist, before any actor
        logs = str(log_dir(out)) if actor_logs else ""
        LOG_FILES.clear()  # names from an earlier run in this process ("engine 0") would point at its files
        pool = EnginePool(engines_cfg, model_path, cfg.model.dtype, cfg.seed, run_id, actor_options(cfg, "rollout"),
                          logs)
        # A crashed reward actor is restarted by Ray and the lost score call retried on it (then a clear error);
        # it keeps no state of the run: the driver owns the normalisation moments and checkpoints them.
        note_log("the reward actor", role_log(logs, "reward"))
        reward = spawn_reward_actor(cfg.reward, model_path, f"oirl-reward-{run_id}",
                                    actor_options(cfg, "reward").get("resources"), role_log(logs, "reward"))
        micro_batch = cfg.batch_size // (cfg.learner.num_ranks * cfg.learner.num_minibatches)
        old_lp = cfg.learner.old_logprobs
        if old_lp == "auto":
            old_lp = "forward" if fused_old_logprobs_blockers(cfg) else "update"
        learner_cfg = dataclasses.replace(cfg.learner, max_new_tokens=cfg.learner.max_new_tokens or r.max_new_tokens,
                                          old_logprobs=old_lp)
        probe = checkpoint.write_storage_probe(out, run_id)  # every rank must see it: --out is shared storage
        learner = LearnerGroup(learner_cfg, model_path, cfg.model.dtype, cfg.seed, r.temperature, run_id,
                               micro_batch, resources=actor_options(cfg, "learner").get("resources"),
                               storage_probe=(str(probe), run_id), log_dir=logs)
        transport = choose_transport(cfg.sync.transport, learner.call_rank0("node_id"), pool.node_ids(),
                                     learner.call_rank0("shm_free_bytes"),
                                     policy_bytes(expected_tensors, cfg.model.dtype))
        logger.info("run %s: %d engines, %d learner ranks (ZeRO-%d), weight transport %s", run_id, r.num_engines,
                    cfg.learner.num_ranks, cfg.learner.zero_stage, transport)

        if transport == "collective":
            form_weight_group(learner, pool.engines, cfg.sync.timeout_s)

        def sync(engines: list[Any], version: int, canary: pa.Table | None = None,
                 iteration: int | None = None) -> dict[str, float]:
            return sync_weights(learner, engines, version, cfg.sync, transport, canary, expected_tensors, iteration)

        start = int(committed["iteration"]) if committed is not None else 0
        # Replacements before the resume still count in the metric; rollout.max_restarts is a budget per process.
        restarts_before = int(committed.get("engine_restarts", 0)) if committed is not None else 0
        served = start  # the version every engine serves
        newest = start  # the learner's weights: `served`, or served + 1 between an update and the sync after it

        def resync(engine: Any) -> int:
            """A replacement engine loads the learner's weights as they are now, under their own version (collective:
            the group is formed anew with it, and a broadcast reaches every member); returns that version. In
            one-step-off mode an engine lost while the next batch is in flight is replaced after the update, so its
            shard is sampled from version it + 1 and labelled so: those rows are then on-policy, and checked as such."""
            if transport == "collective":
                form_weight_group(learner, pool.engines, cfg.sync.timeout_s)
                sync(pool.engines, newest)
            else:
                sync([engine], newest)
            return newest

        def draw(k: int) -> tuple[Any, dict[int, str]]:
            """Iteration k's prompts, generation started on every engine with the version they serve."""
            prompts = dataset.next_batch()
            gen = pool.submit(prompts, k, served, seeds_for(cfg.seed, k, [p.prompt_id for p in prompts]))
            return gen, {p.prompt_id: p.reference for p in prompts}

        def finish(drawn: tuple[Any, dict[int, str]]) -> pa.Table:
            batch = pool.collect(drawn[0], resync, settle=transport == "collective")
            return add_column(batch, "reference", [drawn[1][i] for i in batch.column("prompt_id").to_pylist()])

        def take_rewards(batch: pa.Table, ref: Any, what: str, whole_groups: bool,
                         split: int) -> tuple[pa.Table, np.ndarray, Any, dict]:
            """The reward actor's answer to ``ref`` (its score of ``batch``), the environment's rewards added, the
            raw reward (before normalisation and clipping: what curves show) as a column, and failed samples
            dropped under reward.on_failure=drop (``whole_groups``: with their prompt group): (batch, rewards,
            moments, failed)."""
            rewards, state, failed, raw = get_all([ref], cfg.reward.timeout_s + 60.0, what, ["the reward actor"])[0]
            rewards, raw = with_env_reward(batch, rewards, raw)
            batch, rewards = drop_failed(add_column(batch, "reward_raw", raw), rewards, failed, whole_groups, split)
            return batch, rewards, state, failed

        def refill(k: int, batch: pa.Table, rewards: np.ndarray, state: Any) -> tuple[Any, ...]:
            """DAPO's dynamic sampling (learner.dynamic_sampling): while fewer than data.prompts_per_iteration groups
            of ``batch`` have rewards that differ, generate (with the version the engines serve) and score more
            prompts, up to learner.dynamic_sampling_max_rounds rounds in all; then keep that many whole groups,
            informative ones first (oirl/groups.py)."""
            rounds = [(batch, rewards)]
            target = cfg.data.prompts_per_iteration
            while len(rounds) < cfg.learner.dynamic_sampling_max_rounds and count_informative(rounds) < target:
                prompts = dataset.next_batch()
                seeds = seeds_for(cfg.seed, k, [p.prompt_id for p in prompts], round_=len(rounds))
                extra = finish((pool.submit(prompts, k, served, seeds), {p.prompt_id: p.reference for p in prompts}))
                extra, x_rewards, state, _ = take_rewards(extra, reward.score_batch.remote(extra, state),
                                                          f"reward (iteration {k}, refill)", True, 1)
                rounds.append((add_column(extra, "reward", x_rewards), x_rewards))
            batch, rewards, frac = fill_groups(rounds, target)
            return batch, rewards, state, {"rollout/dynamic_rounds": float(len(rounds)),
                                           "rollout/dynamic_informative_frac": frac}

        reward_state, restored_row, ahead = None, None, None  # ahead: the next iteration's batch, already generated
        if committed is not None:
            learner.call("load_checkpoint", str(ckpt_dir), committed["tag"])
            reward_state, restored_row = committed["reward_state"], committed["metrics_row"]
            dataset.load_state(committed["data"])
            if committed.get("prefetched"):  # async: the batch that was in flight, stored with the checkpoint
                ahead = pq.read_table(ckpt_dir / committed["tag"] / PREFETCHED)
            # Engines serve version `start`; one-step-off compares it now (see the canary at the sync below).
            sync(pool.engines, start, ahead.slice(0, cfg.sync.canary_samples) if r.async_steps and ahead is not None else None)
            logger.info("resumed from %s (%s) at iteration %d", ckpt_dir, committed["tag"], start)

        metrics_log = MetricsLogger(out, start, restored_row, cfg.logging, cfg.to_dict())
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=start, desc="PPO", unit="it", dynamic_ncols=True)
        last: dict[str, Any] = {}
        for it in range(start, cfg.iterations):
            t_iter = time.perf_counter()
            timings: dict[str, float] = {}

            with timed(timings, "generate"):
                batch = ahead if ahead is not None else finish(draw(it))
                ahead = None
                validate_versions(batch, it, r.async_steps)
                if "loss_mask" in batch.column_names and faults.no_loss_mask():
                    batch = batch.drop_columns(["loss_mask"])  # OIRL_FAULT=no-loss-mask: a trainer without it
                # One-step-off: the next batch is generated with this version while the learner trains on this one.
                nxt = draw(it + 1) if r.async_steps and it + 1 < cfg.iterations else None

            with timed(timings, "reward"):
                ref = reward.score_batch.remote(batch, reward_state)
                faults.point("reward", it)
                if faults.actor_to_kill("reward", it):
                    ray.kill(reward, no_restart=False)  # Ray restarts it and retries the call
                # The actor retries transient backend failures within reward.timeout_s, then raises naming the
                # sample; the extra minute lets that answer (and the scoring after the last retry) arrive.
                scored = batch.num_rows
                batch, rewards, reward_state, failed = take_rewards(
                    batch, ref, f"reward (iteration {it})", cfg.learner.algorithm in GROUP_ALGORITHMS,
                    cfg.learner.num_ranks * cfg.learner.num_minibatches)
                reward_stats = {"reward/failed": float(len(failed)), "reward/dropped": float(scored - batch.num_rows)}
                if failed:
                    logger.warning("iteration %d: %d rewards failed, %d of %d samples left the batch (first: %s)",
                                   it, len(failed), scored - batch.num_rows, scored, failed[min(failed)])
                batch = add_column(batch, "reward", rewards)
            if cfg.learner.dynamic_sampling:  # DAPO: groups without a signal leave, more prompts fill the batch
                with timed(timings, "dynamic_sampling"):
                    batch, rewards, reward_state, dynamic = refill(it, batch, rewards, reward_state)
                    reward_stats.update(dynamic)

            with timed(timings, "prepare"):  # old + reference logprobs, values, KL-shaped rewards, GAE
                prep = learner_phase(learner, "prepare", it, ray.put(batch), it, cfg.sync.on_policy_tolerance)
                verdict = check_on_policy(prep, cfg.sync, it)

            with timed(timings, "update"):
                upd = learner_phase(learner, "update", it)
                newest = it + 1
            if verdict == "deferred":  # learner.old_logprobs=update: the update's forward scored the batch first
                verdict = check_on_policy(upd, cfg.sync, it, required=True)

            if nxt is not None:
                with timed(timings, "generate_wait"):  # engines load new weights between generations, never during
                    ahead = finish(nxt)

            with timed(timings, "sync"):  # publish version it+1 to every engine, verified
                # One-step-off: the next batch is sampled by the version published now, and no on-policy check can
                # compare it later (the learner will have moved on), so this version is compared now, at every sync.
                # Likewise after an iteration with nothing to compare.
                must = bool(r.async_steps) or verdict == "not_checked"
                canary = (batch.slice(0, cfg.sync.canary_samples)
                          if must or canary_due(it + 1, cfg.sync.canary_every) else None)
                sync_stats = sync(pool.engines, it + 1, canary, it)
                served = it + 1

            with timed(timings, "checkpoint"):  # every rank writes; committed below, after the row is complete
                tag = f"iter_{it + 1:06d}"
                save = it + 1 == cfg.iterations or (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0)
                if save:
                    learner.call("save_checkpoint", str(ckpt_dir), tag)
                    if ahead is not None:  # the in-flight samples go with the checkpoint: a resume loses none
                        pq.write_table(ahead, ckpt_dir / tag / PREFETCHED)
                    faults.point("checkpoint", it)

            with timed(timings, "memory"):  # every process's peak RSS so far: one small call per actor, all idle now
                memory = peak_memory(pool.engines, learner, reward)

            timings["timing_s/iteration"] = time.perf_counter() - t_iter
            last = iteration_metrics(it, batch, rewards, timings, prep, upd, sync_stats, memory, reward_stats,
                                     {"rollout/on_policy_checked": float(verdict == "passed")},
                                     engine_restarts=restarts_before + pool.restarts)
            if save:
                checkpoint.commit(ckpt_dir, tag, {"iteration": it + 1, "data": dataset.state(), "run_id": run_id,
                                                  "reward_state": reward_state, "metrics_row": last,
                                                  "prefetched": ahead is not None,
                                                  "engine_restarts": restarts_before + pool.restarts})
                checkpoint.prune(ckpt_dir, cfg.checkpoint_keep, tag)
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
        if metrics_log is not None:  # after a clean close() this does nothing; else the trackers mark the run failed
            metrics_log.close(failed=True)
        if pool is not None:
            pool.shutdown()
        if learner is not None:
            try:  # neither the copy kept for the next sync nor a failed sync's files may outlive the run
                learner.close_shm()
            except Exception:
                logger.warning("could not release the learner's /dev/shm files", exc_info=True)
        if started:
            ray.shutdown()


def learner_phase(learner: LearnerGroup, phase: str, it: int, *args: Any) -> dict[str, Any]:
    """Run ``phase`` on every rank; OIRL_FAULT may kill the driver or the last rank while it runs."""
    refs = learner.submit(phase, *args)
    faults.point(phase, it)
    if phase == "update" and faults.actor_to_kill("learner", it):
        ray.kill(learner.workers[-1], no_restart=True)
    return learner.wait(refs, phase)[0]


MEMORY_TIMEOUT_S = 60.0  # the actors are idle when asked, so an answer takes milliseconds


def peak_memory(engines: list[Any], learner: LearnerGroup, reward: Any) -> dict[str, float]:
    """memory/<role>_peak_rss_mib for the driver, every engine (with its vLLM processes), every learner rank and
    the reward actor: each process's resident-memory high-water mark so far (getrusage), so a row holds the peak
    up to its iteration. Every actor is asked at once and waited for once."""
    from learner.ranks import peak_rss_mib

    names = ([f"engine{i}" for i in range(len(engines))] + [f"learner_rank{r}" for r in range(len(learner.workers))]
             + ["reward"])
    refs = [e.peak_rss_mib.remote() for e in engines] + learner.submit("peak_rss_mib") + [reward.peak_rss_mib.remote()]
    values = get_all(refs, MEMORY_TIMEOUT_S, "peak memory", names)
    # The driver alone: its descendants are Ray's own processes and, through them, every actor.
    return {"memory/driver_peak_rss_mib": peak_rss_mib(),
            **{f"memory/{n}_peak_rss_mib": float(v) for n, v in zip(names, values)}}


def with_env_reward(batch: pa.Table, rewards: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-turn episodes: the environment's rewards (env_reward, summed over the episode's turns) added to the
    reward actor's score of the episode, normalised and raw alike (a failed score stays NaN)."""
    if "env_reward" not in batch.column_names:
        return rewards, raw
    env = batch.column("env_reward").to_numpy().astype(np.float64)
    return (rewards + env).astype(np.float32), (raw + env).astype(np.float32)


def iteration_metrics(it: int, batch: pa.Table, rewards: np.ndarray, timings: dict[str, float],
                      *stats: dict[str, Any], engine_restarts: int = 0) -> dict[str, Any]:
    versions = batch.column("policy_version").to_numpy()
    resp_tokens = pc.sum(pc.list_value_length(batch.column("response_token_ids"))).as_py()
    prompt_tokens = pc.sum(pc.list_value_length(batch.column("prompt_token_ids"))).as_py()
    engine_s = generate_seconds(batch) or timings["timing_s/generate"]  # a prefetched batch of an older checkpoint
    row: dict[str, Any] = {
        "iteration": it,
        "rollout/policy_version_min": int(versions.min()),
        "rollout/policy_version_max": int(versions.max()),
        "rollout/staleness_max": int(it - versions.min()),
        "rollout/staleness_mean": float(it - versions.mean()),
        "rollout/samples": batch.num_rows,
        "rollout/response_tokens_mean": resp_tokens / batch.num_rows,
        "rollout/prompt_tokens_mean": prompt_tokens / batch.num_rows,  # with the response: the compute floor's tokens
        "rollout/engine_restarts": engine_restarts,
        "reward/mean": float(np.mean(rewards)),  # what the learner trains on: normalised when reward.normalize
        "reward/std": float(np.std(rewards)),
        # The engines' own generation time: in one-step-off mode the batch was generated during the previous
        # iteration, so this iteration's generate phase holds almost none of it.
        "rollout/engine_generate_s": engine_s,
        "perf/gen_tokens_per_s": resp_tokens / engine_s,
        "perf/samples_per_s": batch.num_rows / timings["timing_s/iteration"],
    }
    if "loss_mask" in batch.column_names:  # multi-turn episodes: turns, tools, and the policy's own tokens
        from actors.agent.episodes import agent_metrics

        agent = agent_metrics(batch)
        row.update(agent)
        row["perf/gen_tokens_per_s"] = agent["rollout/policy_tokens_mean"] * batch.num_rows / engine_s
    if "reward_raw" in batch.column_names:  # the reward before normalisation and clipping: learning shows here
        raw = batch.column("reward_raw").to_numpy()
        row.update({"reward/raw_mean": float(np.mean(raw)), "reward/raw_std": float(np.std(raw))})
    for s in stats:
        row.update(s)
    row.update(timings)
    return row
