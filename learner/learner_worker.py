"""LearnerWorker: one rank of the DeepSpeed ZeRO group that trains the policy (learner.algorithm: PPO with a
critic, or critic-free GRPO / RLOO / REINFORCE++). This file is the rank's loop, prepare() then update(); the pieces
it calls live beside it:

    config.py         LearnerConfig: every learner.* setting
    ranks.py          rendezvous, all-reduce over ranks, DeepSpeed config, peak memory
    models.py         the policy (+ PPO's shared value head), the frozen reference, chunked no-grad scoring
    critic.py         PPO's separate critic (learner.critic=separate): own engine, optimizer, lr, warm-up
    checks.py         the on-policy check and one-step-off importance weights, over every rank
    algorithms/       advantage estimators and losses (pure functions); GAE and the clipped losses in ppo.py
    weight_export.py  publishing the policy to the engines, and the final HF folder

All ranks form one torch.distributed group (gloo on CPU, NCCL on GPU); rank r trains on rows r::M of each
RolloutBatch, and DeepSpeed averages gradients, so M ranks take the same step as one rank on the whole batch
(losses are normalised by global counts). Critic-free algorithms build no critic; kl_coef=0 loads no reference.

Public methods (called on every rank by learner.group.LearnerGroup):
    master_address() -> (ip, port)                 # rank 0's, before setup
    check_storage(probe_path, token)               # before setup: --out is storage this rank shares with the driver
    setup(master_ip, master_port, micro_batch)     # joins the group, builds models and their DeepSpeed engines
    prepare(batch, iteration, ...) -> stats        # old/ref logprobs, values, KL, advantages, on-policy check
    update() -> stats                              # epochs over mini-batches (only the critic during its warm-up)
    built() -> dict / critic_state() -> dict        # which models this rank holds; the separate critic (tests)
    peak_rss_mib() -> float                         # this rank's peak memory (the driver logs it per rank)
    save_checkpoint(dir, tag) / load_checkpoint(dir, tag)   # policy and separate critic together
    + the publishing methods of WeightPublisher (export_weights, broadcast_weights, logprobs, save_hf, ...)

Reads the RolloutBatch columns prompt_id, prompt_token_ids, response_token_ids, response_logprobs, policy_version,
reward.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from learner.config import LearnerConfig
from learner.ranks import allreduce, free_master_address, init_distributed
from learner.weight_export import WeightPublisher

__all__ = ["LearnerConfig", "LearnerWorker", "free_master_address", "init_distributed"]

# What the policy's loss reads of a mini-batch's rows (learner.algorithms.policy_token_loss).
MB_KEYS = ("old_logprobs", "advantages", "old_values", "returns", "ref_logprobs", "is_weights", "resp_mask")


class LearnerWorker(WeightPublisher):
    def __init__(self, cfg: LearnerConfig, rank: int, model_path: str, dtype: str, seed: int,
                 temperature: float, run_id: str, log_file: str = ""):
        """log_file: this rank's stdout/stderr go there (oirl/logs.py); "" leaves them to Ray."""
        from oirl.logs import redirect_actor_output

        redirect_actor_output(log_file)
        self.cfg, self.rank, self.world = cfg, rank, cfg.num_ranks
        self.model_path, self.dtype_name, self.seed = model_path, dtype, seed
        self.temperature, self.run_id = temperature, run_id
        self.data: dict[str, Any] = {}
        self.iteration = 0
        self.critic: Any = None  # learner/critic.py's Critic when learner.critic=separate (PPO)
        self.shm_files: dict[int, list[str]] = {}
        self.shm_maps: dict[str, np.memmap] = {}  # each live bucket file's writable mapping
        self.shm_free: dict[tuple[str, int], list[tuple[str, np.memmap]]] = {}  # kept for reuse: (dir, size)
        self.shm_dir = "/dev/shm"
        self.shm_lock: int | None = None
        self.weight_group: Any = None  # (process group, store) of the collective transport, rank 0 only
        self.collective_buffers: dict[int, list[np.ndarray]] = {}

    def master_address(self) -> tuple[str, int]:
        return free_master_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def check_storage(self, probe_path: str, token: str) -> None:
        """At start: this rank sees the file the driver wrote under --out (shared storage), else an error naming
        the rank and its node (oirl.checkpoint.check_storage_probe)."""
        from oirl.checkpoint import check_storage_probe

        check_storage_probe(probe_path, token, self.rank)

    def peak_rss_mib(self) -> float:
        """This rank's peak resident memory so far; no collective, so the driver can ask between phases."""
        from learner.ranks import tree_peak_rss_mib

        return tree_peak_rss_mib()

    def built(self) -> dict:
        """What this rank holds: a reference model, a shared value head or a separate critic, and the parameters
        each trains."""
        return {"reference": self.ref is not None, "value_head": self.module.value_head is not None,
                "critic": "separate" if self.critic else ("shared" if self.module.value_head is not None else None),
                "trainable_params": sum(p.numel() for p in self.module.parameters() if p.requires_grad),
                "critic_params": self.critic.num_params if self.critic else 0}

    def critic_state(self) -> dict | None:
        """Every parameter of the separate critic as numpy (rank 0; every rank joins a ZeRO-3 gather). Tests."""
        if self.critic is None:
            raise RuntimeError("critic_state: this learner has no separate critic (set learner.critic=separate)")
        state = self.critic.full_state()
        return state if self.rank == 0 else None

    def setup(self, master_ip: str, master_port: int, micro_batch: int) -> dict:
        t0 = time.perf_counter()
        import deepspeed
        import torch
        from transformers import AutoTokenizer

        from learner.models import build_policy, load_policy_lm, load_reference
        from learner.ranks import deepspeed_config

        self.claim_shm_dir()  # before anything big: a dead run's buckets may fill /dev/shm
        c = self.cfg
        self.device = init_distributed(self.rank, self.world, master_ip, master_port, c.num_gpus, c.timeout_s,
                                       c.cpu_shm_allreduce)
        dtype = getattr(torch, self.dtype_name)
        torch.manual_seed(self.seed)
        tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        lm = load_policy_lm(self.model_path, dtype, c.gradient_checkpointing)
        has_critic = c.algorithm == "ppo"
        module = build_policy(lm, self.seed, with_value_head=has_critic and c.critic == "shared")
        self.ref = None  # kl_coef = 0: no reference model at all (not loaded, not run)
        if c.kl_coef > 0:
            self.ref = load_reference(self.model_path, getattr(torch, c.ref_dtype) if c.ref_dtype else dtype,
                                      "cpu" if c.ref_offload else self.device)
        bf16 = self.dtype_name == "bfloat16"
        ds = deepspeed_config(micro_batch, self.world, c.zero_stage, c.lr, c.weight_decay, c.max_grad_norm, bf16)
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds)
        self.module = self.engine.module
        if has_critic and c.critic == "separate":
            from learner.critic import Critic

            self.critic = Critic(c, self.world, self.model_path, dtype, self.seed, micro_batch, bf16)
        return {"rank": self.rank, "seconds": time.perf_counter() - t0}

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        return allreduce(values, self.device, op)

    # ---- the rank's loop: prepare, then update -----------------------------------------------------------------

    def prepare(self, batch: Any, iteration: int, on_policy_tolerance: float = 1e-3) -> dict:
        """Score this rank's rows: old logprobs, values (PPO), reference logprobs, KL, the algorithm's advantages,
        the engine/learner logprob comparison over every rank (on_policy_tolerance: per-token |diff| counted as
        over; it is enforced on the rows of this iteration's version) and the rollout correction's weights (every
        row: the engine sampled them, whatever its version)."""
        import pyarrow.compute as pc
        import torch

        from learner import checks, ppo
        from learner.algorithms.advantages import per_token_advantages
        from learner.models import chunk_inputs, reference_logits, score_in_chunks

        self.iteration, c, temp, dev = iteration, self.cfg, self.temperature, self.device
        rows = np.arange(self.rank, batch.num_rows, self.world)
        d = self.data = {k: v.to(dev) for k, v in ppo.pad_batch(batch.take(rows), self.pad_id).items()}

        def policy(sl: slice, t_len: int) -> dict:
            logits, values = self.engine(*chunk_inputs(d, sl, t_len), temp)
            lp, ent = ppo.logprobs_and_entropy(logits, d["resp_ids"][sl])
            return {"lp": lp, "ent": ent, **({"v": values} if values is not None else {})}

        self.fused = c.old_logprobs == "update"  # update()'s own forward gives them (see LearnerConfig.old_logprobs)
        if self.fused:
            # Until update() scores the batch, the engine's logprobs stand in (the KL statistic and the KL-shaped
            # reward read them; the check in update() then bounds |engine - learner| on every token).
            scored = {"lp": d["engine_logprobs"].clone(), "ent": torch.zeros_like(d["engine_logprobs"])}
        else:
            scored = score_in_chunks(d, c.forward_batch_size, policy)
        d["old_logprobs"], entropy = scored["lp"], scored["ent"]
        d["old_values"] = self.critic.values(d) if self.critic else scored.get("v")
        d["ref_logprobs"] = d["old_logprobs"]  # kl_coef = 0: the KL term is zero and needs no reference
        if self.ref is not None:
            self.ref.to(dev)  # a no-op unless learner.ref_offload keeps it in host memory between prepares

            def reference(sl: slice, t_len: int) -> dict:
                logits = reference_logits(self.ref, *chunk_inputs(d, sl, t_len), temp)
                return {"lp": ppo.logprobs_from_logits(logits, d["resp_ids"][sl])}

            d["ref_logprobs"] = score_in_chunks(d, c.forward_batch_size, reference)["lp"]
            if c.ref_offload:
                self.ref.to("cpu")
        mask = d["resp_mask"]
        kl = ppo.kl_estimate(d["old_logprobs"], d["ref_logprobs"], c.kl_estimator) * mask
        batch_rewards = torch.from_numpy(batch.column("reward").to_numpy().astype(np.float32)).to(dev)
        shaped = {}
        if c.overlong_buffer:  # DAPO's soft overlong punishment, on every rank's copy of the whole batch
            from learner.algorithms import overlong_penalty

            lengths = torch.from_numpy(pc.list_value_length(batch.column("response_token_ids")).to_numpy()).to(dev)
            penalty = overlong_penalty(lengths, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
            batch_rewards = batch_rewards + penalty
            d["reward"] = d["reward"] + penalty[torch.as_tensor(rows, device=dev)]
            shaped = {"reward/overlong_penalty_mean": float(penalty.mean()),
                      "reward/overlong_frac": float((penalty < 0).float().mean())}
        groups = torch.from_numpy(batch.column("prompt_id").to_numpy().astype(np.int64)).to(dev)
        adv, d["returns"] = per_token_advantages(c, d["reward"], kl, mask, d["old_values"], batch_rewards, groups,
                                                 torch.as_tensor(rows, device=dev))
        n_tok, s1, s2 = self._allreduce([mask.sum().item(), ppo.masked_sum(adv, mask).item(),
                                         ppo.masked_sum(adv**2, mask).item()])
        if c.algorithm == "reinforce_pp" or (c.algorithm == "ppo" and c.whiten_advantages):
            mean = s1 / n_tok  # over every rank's tokens (REINFORCE++ normalises its returns this way by definition)
            adv = ppo.masked_whiten(adv, mask, mean, max(s2 / n_tok - mean**2, 0.0))
        d["advantages"] = -adv if c.flip_advantage_sign else adv
        if d["old_values"] is None:
            d["old_values"] = torch.zeros_like(d["old_logprobs"])  # critic-free: reported as 0
        mine = batch.take(rows)
        versions = torch.from_numpy(mine.column("policy_version").to_numpy()).to(dev)
        # Rows of this iteration's version only: one-step-off rows were sampled by the version before, which
        # this learner no longer holds (the driver's canary compares every version at its sync instead).
        self.check_mask = (versions == iteration).to(mask.dtype).unsqueeze(-1) * mask
        self.on_policy_tolerance = on_policy_tolerance
        engine_col = "engine_index" if "engine_index" in batch.column_names else None  # older prefetched batches
        self.check_engines = (torch.from_numpy(mine.column(engine_col).to_numpy().astype(np.int64)).to(dev)
                              if engine_col else None)
        self.num_engines = int(pc.max(batch.column(engine_col)).as_py() or 0) + 1 if engine_col else 1
        stats = {} if self.fused else checks.on_policy_stats(d, self.check_mask, on_policy_tolerance, dev,
                                                            self.check_engines, self.num_engines)
        d.pop("is_weights", None)
        if not self.fused:  # fused: update() computes the weights from its own forward, the old logprobs
            stats.update(checks.rollout_correction(d, mask, c, dev))
        kl_sum, v_sum, n_seq, ent_sum = self._allreduce([
            ppo.masked_sum(kl, mask).item(), ppo.masked_sum(d["old_values"], mask).item(), float(len(rows)),
            ppo.masked_sum(entropy, mask).item()])
        out = {"kl/mean": kl_sum / n_seq, "kl/per_token": kl_sum / n_tok, "learner/value_mean": v_sum / n_tok,
               "learner/tokens": n_tok, **stats, **shaped}
        if not self.fused:
            out["rollout/entropy"] = ent_sum / n_tok
        return out

    def update(self) -> dict:
        """Epochs over mini-batches of the clipped surrogate (+ the shared critic's value loss, + k3 KL when it is
        in the loss, - entropy bonus), aggregated over the global mini-batch (learner.loss_aggregation); the
        separate critic takes its own step on its value loss. During learner.critic_warmup_iterations only the
        critic trains: the policy engine takes no step, so the published weights stay as they are."""
        import torch

        from learner import algorithms, checks, ppo
        from learner.algorithms.correction import correction_weights
        from learner.ranks import peak_rss_mib

        d, cfg = self.data, self.cfg
        warmup = self.critic is not None and self.iteration < cfg.critic_warmup_iterations
        totals: dict[str, float] = {}
        steps = 0
        ent_sum = 0.0  # learner.old_logprobs=update: the entropy statistic comes from this pass
        corrections: list[dict[str, float]] = []  # ... and so do the rollout correction's weights
        if self.fused and cfg.rollout_correction != "none":
            d["is_weights"] = torch.ones_like(d["old_logprobs"])
        autocast = cfg.update_autocast == "bfloat16"  # bf16 compute, float32 master weights (LearnerConfig)
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration * 101 + epoch)
            for mb in torch.randperm(d["input_ids"].shape[0], generator=g).chunk(cfg.num_minibatches):
                mask = d["resp_mask"][mb]
                n_tok, n_seq = self._allreduce([mask.sum().item(), (mask.sum(-1) > 0).sum().item()])
                # DeepSpeed averages gradients over ranks: normalise by the global count / world.
                denominator = (n_tok if cfg.loss_aggregation == "token_mean" else n_seq) / self.world
                keys = ("pg", "vl", "clipped", "approx_kl", "ent")
                local = dict.fromkeys(keys, 0.0)  # this rank's masked sums over the mini-batch
                pg_loss = 0.0  # this rank's share of the policy loss, aggregated as the loss is (loss_aggregation)
                if self.critic is not None:
                    t_len = int(d["attention_mask"][mb].sum(1).max())
                    local["vl"] = ppo.masked_sum(self.critic.train_step(d, mb, t_len, denominator), mask).item()
                if not warmup:
                    micro = mb.split(cfg.forward_batch_size)
                    for i, rows in enumerate(micro):
                        # Gradients accumulate over the micro-batches; the one optimizer step comes after the last.
                        self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                        t_len = int(d["attention_mask"][rows].sum(1).max())  # each micro-batch cut to its longest
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                            logits, values = self.engine(d["input_ids"][rows, :t_len],
                                                         d["attention_mask"][rows, :t_len],
                                                         d["resp_index"][rows].clamp(max=t_len - 1), self.temperature)
                        logp = ppo.logprobs_from_logits(logits, d["resp_ids"][rows])
                        m = d["resp_mask"][rows]
                        if self.fused:  # these weights are the ones the engine sampled with: the old logprobs
                            d["old_logprobs"][rows] = logp.detach()
                            w, st = correction_weights(logp.detach(), d["engine_logprobs"][rows], m,
                                                       cfg.rollout_correction, cfg.importance_cap, cfg.mis_lo,
                                                       cfg.mis_hi, cfg.mis_level)
                            corrections.append({k: v.item() for k, v in st.items()})
                            if cfg.rollout_correction != "none":
                                d["is_weights"][rows] = w
                        per_token, parts = algorithms.policy_token_loss(
                            cfg, logp, logits, values, {k: d[k][rows] for k in MB_KEYS if d.get(k) is not None})
                        if self.fused:  # the entropy statistic, from the loss's own entropy when it has one
                            with torch.no_grad():
                                ent = parts["ent"] if cfg.entropy_coef else ppo.entropy_from_logits(logits)
                                ent_sum += ppo.masked_sum(ent, m).item()
                        agg = {"mode": cfg.loss_aggregation, "denominator": denominator,
                               "token_norm": float(max(cfg.max_new_tokens, 1))}
                        self.engine.backward(algorithms.aggregate(per_token, m, **agg))
                        pg_loss += algorithms.aggregate(parts["pg"], m, **agg).item()
                        parts["approx_kl"] = d["old_logprobs"][rows] - logp.detach()
                        with torch.no_grad():
                            for k in keys:
                                if k in parts and (k != "vl" or values is not None):
                                    local[k] += ppo.masked_sum(parts[k], m).item()
                    if self.fused:  # before the (only) step: every token of every rank vs the engine's
                        fused_stats = checks.on_policy_stats(d, self.check_mask, self.on_policy_tolerance,
                                                             self.device, self.check_engines, self.num_engines)
                    self.engine.step()
                sums = self._allreduce([local[k] for k in keys] + [pg_loss])
                for key, val in zip(("policy_loss_token_mean", "value_loss", "clipfrac", "approx_kl", "entropy"), sums):
                    totals[key] = totals.get(key, 0.0) + val / n_tok
                # Each rank's share is over global count / world (DeepSpeed averages the gradients): / world
                totals["policy_loss"] = totals.get("policy_loss", 0.0) + sums[-1] / self.world
                norms = {"grad_norm": None if warmup else self.engine.get_global_grad_norm()}
                if self.critic is not None:
                    norms["critic_grad_norm"] = self.critic.engine.get_global_grad_norm()
                for key, gn in norms.items():
                    totals[key] = totals.get(key, 0.0) + float(gn if gn is not None else 0.0)
                steps += 1
        stats = {f"learner/{k}": v / steps for k, v in totals.items()}
        if self.fused:
            # fused: one mini-batch, so its global token count n_tok is the whole batch's
            (ent_tot,) = self._allreduce([ent_sum])
            stats.update(fused_stats, **{"rollout/entropy": ent_tot / max(n_tok, 1.0)})
            stats.update(checks.correction_stats(corrections, self.device))
        (stats["learner/peak_rss_mib"],) = self._allreduce([peak_rss_mib()], op="max")
        if self.critic is not None:
            stats["learner/critic_warmup"] = float(warmup)
        return stats

    # ---- persistence -----------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Write this rank's part of checkpoint ``tag`` (the policy, and the separate critic under tag/critic).
        DeepSpeed's own 'latest' pointer is not written: the driver commits a checkpoint (oirl/checkpoint.py)
        only after every rank returned from here."""
        from oirl.checkpoint import save_failure

        try:
            self.engine.save_checkpoint(directory, tag=tag, save_latest=False)
            if self.critic is not None:
                self.critic.save(directory, tag)
        except (OSError, RuntimeError) as e:
            raise OSError(f"learner rank {self.rank}: {save_failure(directory, tag, e)}") from e

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag} under {directory}")
        if self.critic is not None:
            self.critic.load(directory, tag)
