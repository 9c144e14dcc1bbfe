"""RolloutWorker: a Ray actor that owns one vLLM engine and generates on-policy samples.

Public methods (its RPC surface):
    generate(prompt_ids, prompt_token_ids, expected_version) -> pa.Table   # RolloutBatch rows, n per prompt
    load_weights(update: WeightUpdate, buffers) -> dict                   # in place, via vLLM's reload path
    served() -> dict                                                      # version + fingerprint the worker serves
    prompt_logprobs(token_ids, prompt_lens) -> list[np.ndarray]           # canary after a sync
    peak_rss_mib() -> float                                               # peak memory, engine included
    shutdown()

Writes the rollout columns of the RolloutBatch (see oirl/batch.py): prompt_id, sample_index, prompt_token_ids,
response_token_ids, response_logprobs, finish_reason, policy_version. Token ids are the engine's own; nothing is
decoded and re-tokenized.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from oirl.bounds import bounds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    num_engines: int = field(default=1, metadata=bounds(ge=1))
    """Number of vLLM engines (one Ray actor each)."""
    samples_per_prompt: int = field(default=4, metadata=bounds(ge=1))
    """Samples generated per prompt (n)."""
    max_new_tokens: int = field(default=64, metadata=bounds(ge=1))
    """Maximum generated tokens per sample."""
    temperature: float = field(default=1.0, metadata=bounds(gt=0, why="PPO needs a stochastic policy"))
    """Sampling temperature; the learner scores with the same temperature."""
    top_p: float = field(default=1.0, metadata=bounds(ge=1, le=1, why=(
        "nucleus sampling truncates the distribution the engine samples from, but the learner scores the full one, "
        "so PPO's ratios and the on-policy check would be wrong; set rollout.top_p=1.0 (lower rollout.temperature "
        "to sharpen sampling)")))
    """Nucleus sampling. Must stay 1.0: the learner scores the full distribution, so a truncated one would make
    the PPO ratios and the on-policy check wrong (rejected at start-up)."""
    top_k: int = field(default=-1, metadata=bounds(ge=-1, le=0, why=(
        "top-k truncates the sampling distribution (see rollout.top_p); set rollout.top_k=-1 (off)")))
    """Top-k sampling; must stay -1 (off) for the same reason as top_p."""
    kv_cache_gib: float = field(default=1.0, metadata=bounds(gt=0))
    """KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE); without it vLLM reserves most of RAM."""
    gpu_memory_utilization: float = field(default=0.4, metadata=bounds(gt=0, le=1))
    """Fraction of GPU memory an engine may use (GPU only)."""
    cpu_threads_bind: str = "auto"
    """VLLM_CPU_OMP_THREADS_BIND: 'auto', a core range like '0-1', or 'nobind'."""
    cpu_threads: int = field(default=0, metadata=bounds(ge=0, why="0 chooses (see the field's docstring)"))
    """OpenMP threads a CPU engine computes with. 0: every core of the node when strictly on-policy (the learner
    waits while the engine generates, so its cores would idle), else max(1, num_cpus). Ray sets OMP_NUM_THREADS to
    the actor's num_cpus, which alone held the engine to one core: 0.58x of the same engine outside Ray. Several
    engines on one node: give each its share of the cores."""
    in_process_engine: bool = True
    """Run the engine inside the actor process (fast start on CPU); false = vLLM's own engine processes."""
    num_cpus: float = field(default=1.0, metadata=bounds(ge=0))
    """Ray CPUs reserved per engine actor."""
    num_gpus: float = field(default=0.0, metadata=bounds(ge=0))
    """Ray GPUs per engine actor (1 on GPU clusters)."""
    cuda_graphs: bool = True
    """GPU engines capture CUDA graphs (vLLM's default, much faster decoding); false = eager. CPU engines always
    run eager."""
    max_num_seqs: int = field(default=0, metadata=bounds(ge=0, why="0 sizes it to the batch"))
    """Sequences an engine runs at once (vLLM's scheduler limit). 0: the engine's share of a batch (prompts per
    engine x samples_per_prompt), at most MAX_NUM_SEQS."""
    max_model_len: int = field(default=0, metadata=bounds(ge=0, why="0 is the prompt + response budget"))
    """Longest sequence an engine holds (prompt + response). 0: data.max_prompt_tokens + rollout.max_new_tokens, so
    vLLM sizes its KV cache for the run's sequences, not for the model's whole context window."""
    timeout_s: float = field(default=900.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Longest wait for one generate call before the driver fails the iteration."""
    async_steps: int = field(default=0, metadata=bounds(ge=0, le=1, why="0 on-policy, 1 one-step-off"))
    """0: strictly on-policy (iteration k samples with version k). 1: one-step-off: the batch of k+1 is generated
    with version k while the learner trains on batch k (importance-corrected, learner.importance_cap)."""
    ignore_eos: bool = False
    """Benchmark mode: every sample runs to max_new_tokens, so systems compared side by side do equal work."""
    env: str = ""
    """Multi-turn episodes: an environment (actors/agent): a built-in name (calculator, python, lookup) or
    'package.module:factory'. '' = one response per sample."""
    env_args: str = ""
    """Keyword arguments for the environment's factory, as a JSON object (e.g. '{"call_bonus": 0.5}')."""
    max_turns: int = field(default=4, metadata=bounds(ge=1, le=64))
    """Policy turns per episode at most (rollout.env set); each turn generates up to rollout.max_new_tokens."""
    max_observation_tokens: int = field(default=256, metadata=bounds(ge=1))
    """An environment message longer than this many tokens is cut (and says so)."""
    max_episode_tokens: int = field(default=0, metadata=bounds(ge=0, why="0 is max_turns turns and observations"))
    """Response tokens one episode may hold, the policy's and the environment's. 0: max_turns x max_new_tokens +
    (max_turns - 1) x (max_observation_tokens + 32 for the chat template's tokens around a message)."""
    env_timeout_s: float = field(default=60.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Longest environment step (its tool calls included); beyond it the episode ends, counted in
    rollout/tool_errors. Each tool call has its own, shorter timeout (actors/agent/env.py)."""
    agent_timeout_s: float = field(default=300.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """rollout.env=agent:...: longest black-box agent episode, its completions included; beyond it the episode ends
    (counted in rollout/tool_errors) and the batch goes on. Keep it below rollout.timeout_s."""
    max_restarts: int = field(default=2, metadata=bounds(ge=0, why="0: no replacement"))
    """Engines that die mid-generate are replaced (synced to the current version, shard regenerated with the same
    seeds) up to this many times per run; then the run stops and names the engine."""


@dataclass(frozen=True)
class SyncConfig:
    transport: str = "auto"
    """'shm' (/dev/shm files; engines on the learner's node), 'object_store' (Ray objects), 'collective' (learner
    rank 0 broadcasts over a torch.distributed group with the engines' workers: gloo on CPU, NCCL on GPU), or
    'auto' (shm when every engine shares learner rank 0's node, else collective)."""
    bucket_mb: int = field(default=256, metadata=bounds(ge=1))
    """Largest bucket of packed weights, in MiB."""
    shm_reuse: bool = True
    """shm transport: keep a version's /dev/shm files once every engine has loaded it and write the next version
    into them (no page faults: packing 538 MB went from 0.34 s to a memcpy's ~0.03 s). It keeps one model copy in
    /dev/shm between syncs, which a sync needs at its peak anyway; false frees it after each sync."""
    canary_tolerance: float = field(default=1e-3, metadata=bounds(gt=0))
    """|engine logprob - learner logprob| above which a canary token counts as differing."""
    canary_max_frac: float = field(default=0.0, metadata=bounds(ge=0, lt=1, why="1 would let every token differ"))
    """Fraction of canary tokens allowed beyond canary_tolerance (fp32: 0, so the max decides; bf16: see
    configs/gpu.yaml, measured in benchmarks/results/check_calibration.json)."""
    max_mismatch_kl: float = field(default=0.0, metadata=bounds(ge=0, why="0: off"))
    """Largest k3 estimate of KL(engine || learner) on the compared tokens that the canary and the on-policy check
    accept (a statistic of every token, not of the worst one); 0 = not checked (fp32 relies on the tolerances)."""
    canary_samples: int = field(default=2, metadata=bounds(
        ge=1, why="a canary of no sample compares nothing; turn the canary off with sync.canary_every=0"))
    """Samples of the last batch re-scored by every engine after a sync."""
    canary_every: int = field(default=1, metadata=bounds(ge=0, why="0: never, 1: every sync"))
    """Run the canary at the first sync and then at every N-th version (1: every sync; 0: never; one-step-off
    mode, rollout.async_steps=1, runs it at every sync whatever this says: there the on-policy check cannot
    compare the rows, sampled by a version the learner no longer holds). The canary takes
    ~2 s per sync at 135M on 2 cores; in strict on-policy mode the next iteration's on-policy check compares every
    sampled token anyway, so a recipe may space the canary out (the fingerprint check runs at every sync)."""
    on_policy_tolerance: float = field(default=1e-3, metadata=bounds(gt=0))
    """Per-token |engine logprob - learner logprob| allowed on the sampled tokens, checked every iteration over
    every response token of every rank (fp32: ~1e-5 is typical; bf16 needs ~0.05-0.1)."""
    on_policy_max_frac: float = field(default=0.0, metadata=bounds(
        ge=0, lt=1, why="1 would let every token fail"))
    """Fraction of response tokens allowed beyond on_policy_tolerance (bf16: a small fraction of low-probability
    tokens may exceed it without anything being wrong)."""
    on_policy_action: str = "error"
    """What a failed on-policy check does: 'error' (stop; the engines do not serve the learner's policy) or 'warn'."""
    timeout_s: float = field(default=300.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Longest wait for one engine to load a version."""


MAX_NUM_SEQS = 1024  # vLLM 0.32's own default for offline use on 70+ GB GPUs; more only queues longer


def engine_kwargs(cfg: RolloutConfig, model_path: str, dtype: str, seed: int, engine_index: int = 0) -> dict[str, Any]:
    """What the engine is built with (vllm.LLM's keyword arguments), from the config alone. ``cfg.max_model_len``
    and ``cfg.max_num_seqs`` as the driver resolved them (oirl.plan.engine_config); 0 in a config built by hand
    leaves vLLM's default (the model's context window; 256 or more sequences)."""
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=dtype, seed=seed + engine_index,
        enforce_eager=not (cfg.cuda_graphs and cfg.num_gpus > 0),
        enable_prefix_caching=True,
        worker_extension_cls="actors.vllm_extension.WeightReceiver",
        logprobs_mode="processed_logprobs",  # logprobs of the distribution actually sampled (temperature)
    )
    if cfg.max_num_seqs:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.in_process_engine:
        kwargs["distributed_executor_backend"] = "uni"
    if cfg.env and cfg.num_gpus == 0 and cfg.max_model_len:
        # Multi-turn episodes add long prompts (the trajectory so far) while others decode, so the scheduler splits
        # prefills; vLLM then rewinds the request's seeded generator, which a CPU generator cannot do ("CPU
        # Generator does not use offset"). Whole prefills only, with room for the longest.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 4096)
    if cfg.num_gpus > 0:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return kwargs


def engine_threads(cfg: RolloutConfig) -> int:
    """See RolloutConfig.cpu_threads."""
    if cfg.cpu_threads > 0:
        return cfg.cpu_threads
    if cfg.async_steps == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cfg.num_cpus))


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, model_path: str, dtype: str, seed: int, engine_index: int = 0,
                 log_file: str = ""):
        """log_file: this actor's stdout/stderr (vLLM's engine processes included) go there (oirl/logs.py)."""
        from oirl.logs import redirect_actor_output

        redirect_actor_output(log_file)
        self.cfg = cfg
        self.engine_index = engine_index
        self.version = 0
        # vLLM reads these when the engine is built; set before importing it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_threads_bind)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process_engine else "1"
        if cfg.num_gpus == 0:
            self.threads = engine_threads(cfg)
            os.environ["OMP_NUM_THREADS"] = str(self.threads)  # read when the OpenMP runtime starts (torch import)
            import torch

            torch.set_num_threads(self.threads)  # in case torch was imported already; vLLM binds after this
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**engine_kwargs(cfg, model_path, dtype, seed, engine_index))
        logger.info("engine %d ready in %.1fs", engine_index, time.perf_counter() - t0)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def peak_rss_mib(self) -> float:
        """Peak resident memory of this actor with its engine (in process, or vLLM's own processes); the driver logs
        it every iteration as memory/engine<i>_peak_rss_mib."""
        from learner.ranks import tree_peak_rss_mib

        return tree_peak_rss_mib()

    def generate(self, prompt_ids: list[int], prompt_token_ids: list[list[int]], expected_version: int,
                 seeds: list[int] | None = None, rows: list[dict] | None = None) -> pa.Table:
        """n samples for each prompt with the weights of ``expected_version``; returns RolloutBatch rows.

        seeds: one sampling seed per prompt, so a resumed run draws the same samples as an uninterrupted one.
        rows: with rollout.env, each prompt's data row ({'prompt_id', 'question', 'answer'}): the environment
        renders the episode's first messages from it (actors/agent/episodes.py).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from oirl.batch import make_rollout_batch, with_generate_seconds

        if self.version != expected_version:
            raise RuntimeError(
                f"engine {self.engine_index} serves version {self.version} but the driver expects "
                f"{expected_version}; a weight sync was missed"
            )
        seeds = seeds if seeds is not None else [None] * len(prompt_ids)
        if self.cfg.env:
            from actors.agent.episodes import run_episodes

            if rows is None:
                raise ValueError("rollout.env is set but generate() got no data rows")
            return run_episodes(self.llm, self.cfg, rows, list(seeds), self.version, self.engine_index)
        params = [SamplingParams(n=self.cfg.samples_per_prompt, temperature=self.cfg.temperature,
                                 top_p=self.cfg.top_p, top_k=self.cfg.top_k, max_tokens=self.cfg.max_new_tokens,
                                 logprobs=0, seed=s, ignore_eos=self.cfg.ignore_eos)
                  for s in seeds]
        t0 = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], params,
                                    use_tqdm=False)
        seconds = time.perf_counter() - t0
        rows: dict[str, list] = {k: [] for k in ("pid", "idx", "prompt", "resp", "lp", "finish")}
        for pid, ids, out in zip(prompt_ids, prompt_token_ids, outputs):
            for j, c in enumerate(out.outputs):
                tokens = list(c.token_ids)
                rows["pid"].append(pid)
                rows["idx"].append(j)
                rows["prompt"].append(ids)
                rows["resp"].append(tokens)
                rows["lp"].append([step[t].logprob for step, t in zip(c.logprobs, tokens)])
                rows["finish"].append(c.finish_reason or "length")
        return with_generate_seconds(make_rollout_batch(rows["pid"], rows["idx"], rows["prompt"], rows["resp"],
                                                        rows["lp"], rows["finish"], self.version,
                                                        self.engine_index), seconds)

    def load_weights(self, update: Any, timeout_s: float = 300.0, fault_skip_reload: bool = False) -> dict:
        """Receive version k+1: fetch the buckets, reload them in place, reset the prefix cache.

        fault_skip_reload: OIRL_FAULT=stale-engine (oirl/faults.py): the worker receives and hashes the buckets
        but does not reload them, and reports success: the silent stale-weights failure the checks must catch.

        update: oirl.weights.WeightUpdate; each bucket.location is a /dev/shm path (shm) or an ObjectRef
        (object_store: zero-copy from the node's object store, fetched by Ray across nodes). The engine's worker
        hashes what it loads and reports that fingerprint; a mismatch with the learner's fails here, naming the
        engine (and again in the driver's served() check).
        """
        import ray

        from oirl.weights import bucket_to_wire

        t0 = time.perf_counter()
        arrays: list[Any] | None
        if update.transport == "collective":
            arrays = None  # the engine's worker receives them from learner rank 0's broadcast
        elif update.transport == "shm":
            # In another process (vLLM's multiprocess engine) the worker maps the files itself.
            arrays = ([np.memmap(b.location, dtype=np.uint8, mode="c") for b in update.buckets]
                      if self.cfg.in_process_engine else [b.location for b in update.buckets])
        else:
            arrays = ray.get([b.location for b in update.buckets], timeout=timeout_s)
            if not self.cfg.in_process_engine:
                arrays = [bytes(a) for a in arrays]  # crosses vLLM's msgpack RPC
        t_fetch = time.perf_counter()
        reports = self._reload([bucket_to_wire(b) for b in update.buckets], arrays, update.version,
                               fault_skip_reload)
        self.llm.reset_prefix_cache()
        for report in reports:
            if report["fingerprint"] != update.fingerprint:
                raise RuntimeError(
                    f"engine {self.engine_index}: the weights its worker loaded for version {update.version} hash to "
                    f"{report['fingerprint']}, not the learner's {update.fingerprint}: corrupted on the way"
                )
        self.version = update.version
        return {"engine": self.engine_index, "version": update.version, "fetch_s": t_fetch - t0,
                "verify_s": max(r["verify_s"] for r in reports), "reload_s": max(r["reload_s"] for r in reports),
                "digest_s": max(r["digest_s"] for r in reports), "seconds": time.perf_counter() - t0}

    # ---- benchmark hooks (benchmarks/sync.py) -------------------------------------------------------------------

    def reload_floor(self, update: Any, timeout_s: float = 300.0) -> float:
        """Seconds of the worker's in-place reload of ``update``'s tensors once they sit in its memory: the floor
        a sync is measured against. The engine serves the same weights afterwards (version unchanged)."""
        import ray

        from oirl.weights import bucket_to_wire

        if update.transport == "shm":
            arrays: list[Any] = [b.location for b in update.buckets]
        elif update.transport == "object_store":
            arrays = [bytes(a) for a in ray.get([b.location for b in update.buckets], timeout=timeout_s)]
        else:
            raise ValueError(f"reload_floor needs an shm or object_store update, not {update.transport!r}")
        seconds = self.llm.collective_rpc("oirl_reload_floor", args=([bucket_to_wire(b) for b in update.buckets],
                                                                     arrays))
        self.llm.reset_prefix_cache()
        return max(seconds)

    def stage_tensor(self, name: str, dtype: str, shape: list[int], raw: bytes) -> None:
        """Per-parameter baseline: one RPC (actor, then worker) per tensor, as one-call-per-tensor syncs do."""
        self.llm.collective_rpc("oirl_stage_tensor", args=(name, dtype, shape, raw))

    def reload_staged(self, version: int) -> int:
        """Per-parameter baseline: load what stage_tensor kept; the engine then serves ``version`` (unverified)."""
        counts = self.llm.collective_rpc("oirl_reload_staged")
        self.llm.reset_prefix_cache()
        self.version = version
        return min(counts)

    def join_weight_group(self, master_ip: str, master_port: int, rank: int, world: int, timeout_s: float) -> None:
        """The engine's worker joins the collective transport's group as ``rank`` (tensor parallel 1: one worker)."""
        self.llm.collective_rpc("oirl_join_group", args=(master_ip, master_port, rank, world, timeout_s))

    def _reload(self, wire: list[dict], arrays: list[Any] | None, version: int,
                fault_skip_reload: bool = False) -> list[dict]:
        """Every worker of the engine hashes and loads the buckets (actors/vllm_extension.py)."""
        return self.llm.collective_rpc("oirl_reload", args=(wire, arrays, version, fault_skip_reload))

    def served(self) -> dict:
        """Version and fingerprint as reported by the engine's worker itself (not the actor's bookkeeping)."""
        reports = self.llm.collective_rpc("oirl_served")
        return {"engine": self.engine_index, "workers": reports}

    def prompt_logprobs(self, token_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        """Engine logprob of every token after prompt_lens[i] in token_ids[i] (temperature 1, canary)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False)
        result = []
        for ids, plen, out in zip(token_ids, prompt_lens, outs):
            lps = out.prompt_logprobs
            result.append(np.array([lps[i][ids[i]].logprob for i in range(plen, len(ids))], dtype=np.float32))
        return result

    def shutdown(self) -> None:
        # Leftover engine processes otherwise fill /dev/shm (see DESIGN.md).
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
