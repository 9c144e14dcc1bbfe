"""LearnerWorker: one rank of the DeepSpeed ZeRO group that trains the policy (learner.algorithm: PPO with a
critic, or critic-free GRPO / RLOO / REINFORCE++).

Holds the policy (an HF causal LM; for PPO with a value head on its last hidden state: learner/models.py) and, when
kl_coef > 0, a frozen reference model for the KL term. All ranks form one torch.distributed group (gloo on CPU,
NCCL on GPU); rank r trains on rows r::M of each RolloutBatch, and DeepSpeed averages gradients, so M ranks take the
same step as one rank on the whole batch (losses are normalised by global counts). Advantage estimators and losses
are pure functions in learner/ppo.py and learner/algorithms/; publishing weights is learner/weight_export.py.

Public methods (called on every rank by learner.group.LearnerGroup):
    master_address() -> (ip, port)                 # rank 0's, before setup
    setup(master_ip, master_port, micro_batch)     # joins the group, builds models and the DeepSpeed engine
    prepare(batch, iteration, ...) -> stats        # old/ref logprobs, values, KL, advantages, on-policy check
    update() -> stats                              # epochs over mini-batches
    built() -> dict                                # which models this rank holds
    save_checkpoint(dir, tag) / load_checkpoint(dir, tag) / save_hf(dir)
    + the publishing methods of WeightPublisher (export_weights, broadcast_weights, logprobs, ...)

Reads the RolloutBatch columns prompt_id, prompt_token_ids, response_token_ids, response_logprobs, policy_version,
reward.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learner.models import build_policy, reference_logits
from learner.weight_export import WeightPublisher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerConfig:
    algorithm: str = "ppo"
    """'ppo' (GAE with a critic), 'grpo' (group-normalised outcome advantage), 'rloo' (leave-one-out baseline) or
    'reinforce_pp' (REINFORCE++: per-token KL in the return, batch-normalised). Critic-free ones build no value head."""
    grpo_scale_by_std: bool = True
    """grpo: divide by the group's reward std (false = Dr. GRPO: mean-centred only)."""
    loss_aggregation: str = "token_mean"
    """'token_mean' (every response token of the global mini-batch weighs the same), 'seq_mean_token_mean' (each
    sample weighs the same) or 'seq_mean_token_sum' (Dr. GRPO: token sums over a constant, max_new_tokens)."""
    kl_in_loss: bool = False
    """KL to the reference as a k3 term in the loss (GRPO) instead of a penalty in the per-token reward; grpo and
    rloo need it (their advantage is per sequence)."""
    max_new_tokens: int = 0
    """Set by the driver from rollout.max_new_tokens (the seq_mean_token_sum constant)."""
    importance_cap: float = 2.0
    """One-step-off mode (rollout.async_steps=1): the policy loss of each token is weighted by
    min(pi_learner / pi_behaviour, importance_cap), the behaviour being the engine's logprobs (truncated IS)."""
    num_ranks: int = 2
    """Ranks in the ZeRO group (Ray actors)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    lr: float = 1e-5
    """AdamW learning rate (policy and value head)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    ppo_epochs: int = 1
    """Passes over each batch."""
    num_minibatches: int = 1
    """Optimizer steps per epoch (the batch splits evenly)."""
    clip_ratio: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float = 0.2
    """Clip of the value update around the old values."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    kl_coef: float = 0.05
    """KL penalty coefficient in the per-token reward."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: 'k1' (log ratio) or 'k3' (non-negative)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """Discount over response tokens."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over the whole batch (all ranks)."""
    flip_advantage_sign: bool = False
    """Sanity switch for tests: train against the reward (learning must then fail)."""
    forward_batch_size: int = 8
    """Rows per no-grad forward in prepare(); full-vocabulary logits exist for one such chunk at a time."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, ~30% more update time)."""
    ref_dtype: str = ""
    """dtype of the frozen reference model: '' = model.dtype, or 'bfloat16' / 'float32' (bf16 halves its memory)."""
    ref_offload: bool = False
    """Keep the reference model in host memory and move it to the device only for prepare()'s reference pass."""
    num_cpus: float = 1.0
    """Ray CPUs per rank."""
    num_gpus: float = 0.0
    """Ray GPUs per rank (1 on GPU clusters)."""
    cpu_shm_allreduce: bool = False
    """Use DeepSpeed's shared-memory allreduce op on CPU (JIT-compiles ~150 s on first use); false = plain gloo."""
    timeout_s: float = 1800.0
    """Longest wait for one learner call (collectives use it too)."""


def free_master_address() -> tuple[str, int]:
    """This node's address and a free port for rank 0 to host the torch.distributed rendezvous."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def init_distributed(rank: int, world: int, master_ip: str, master_port: int, num_gpus: float, timeout_s: float,
                     cpu_shm_allreduce: bool = False) -> Any:
    """Join the DeepSpeed/torch.distributed group (gloo on CPU, NCCL on GPU); returns this rank's device."""
    os.environ.update(MASTER_ADDR=master_ip, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0" if num_gpus else str(rank))
    if not num_gpus:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.ops
    import torch

    if not cpu_shm_allreduce:
        # The shm allreduce op JIT-compiles for ~150 s on a fresh machine; gloo alone is correct and fast enough
        # for CPU-sized models (measured, DESIGN.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if num_gpus else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


class LearnerWorker(WeightPublisher):
    def __init__(self, cfg: LearnerConfig, rank: int, model_path: str, dtype: str, seed: int,
                 temperature: float, run_id: str):
        self.cfg, self.rank, self.world = cfg, rank, cfg.num_ranks
        self.model_path, self.dtype_name, self.seed = model_path, dtype, seed
        self.temperature, self.run_id = temperature, run_id
        self.data: dict[str, Any] = {}
        self.iteration = 0
        self.shm_files: dict[int, list[str]] = {}
        self.shm_dir = "/dev/shm"
        self.shm_lock: int | None = None
        self.weight_group: Any = None  # (process group, store) of the collective transport, rank 0 only
        self.collective_buffers: dict[int, list[np.ndarray]] = {}

    def master_address(self) -> tuple[str, int]:
        return free_master_address()

    def built(self) -> dict:
        """What this rank holds: whether a reference model and a value head exist, and the trainable parameters."""
        return {"reference": self.ref is not None, "value_head": self.module.value_head is not None,
                "trainable_params": sum(p.numel() for p in self.module.parameters() if p.requires_grad)}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def setup(self, master_ip: str, master_port: int, micro_batch: int) -> dict:
        t0 = time.perf_counter()
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from oirl.weights import claim_shm, clean_stale_shm

        if os.path.isdir(self.shm_dir):  # every rank cleans its node: dead runs' buckets, never a live run's
            if self.rank == 0:
                self.shm_lock = claim_shm(self.shm_dir, self.run_id)
            stale = clean_stale_shm(self.shm_dir, self.run_id)
            if stale:
                logger.warning("removed %d /dev/shm files left by runs that are no longer alive", len(stale))

        self.device = init_distributed(self.rank, self.world, master_ip, master_port, self.cfg.num_gpus,
                                       self.cfg.timeout_s, self.cfg.cpu_shm_allreduce)
        dtype = getattr(torch, self.dtype_name)
        torch.manual_seed(self.seed)
        tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        lm = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        lm.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = build_policy(lm, self.seed, with_value_head=self.cfg.algorithm == "ppo")
        self.ref = None  # kl_coef = 0: no reference model at all (not loaded, not run)
        if self.cfg.kl_coef > 0:
            ref_dtype = getattr(torch, self.cfg.ref_dtype) if self.cfg.ref_dtype else dtype
            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=ref_dtype).eval()
            self.ref.requires_grad_(False)
            self.ref.to("cpu" if self.cfg.ref_offload else self.device)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * self.world,
            # DeepSpeed's default 5e8-element communication buckets cost ~4 GB per rank; 5e7 is plenty here.
            "zero_optimization": {"stage": self.cfg.zero_stage, "reduce_bucket_size": int(5e7),
                                  "allgather_bucket_size": int(5e7)},
            "optimizer": {"type": "AdamW", "params": {"lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay,
                                                      "torch_adam": True, "adam_w_mode": True}},
            "gradient_clipping": self.cfg.max_grad_norm,
            "bf16": {"enabled": self.dtype_name == "bfloat16"},
            "steps_per_print": 1 << 30,
        }
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
        self.module = self.engine.module
        return {"rank": self.rank, "seconds": time.perf_counter() - t0}

    # ---- PPO -------------------------------------------------------------------------------------------------

    def _score(self, model_fn: Any) -> tuple[Any, Any, Any]:
        """Logprobs of the sampled tokens [B, R], values [B, R] (None for a model without a value head) and
        entropy [B, R] of this rank's rows, one chunk of forward_batch_size rows at a time: full-vocabulary logits
        ([rows, R, V], several GB per model per rank at GPU scale) never exist for more than one chunk."""
        import torch

        from learner import ppo

        d, fb = self.data, self.cfg.forward_batch_size
        lps, values, ents = [], [], []
        with torch.no_grad():
            for s in range(0, d["input_ids"].shape[0], fb):
                sl = slice(s, s + fb)
                t_len = int(d["attention_mask"][sl].sum(1).max())  # drop the padding this chunk does not need
                out = model_fn(d["input_ids"][sl, :t_len], d["attention_mask"][sl, :t_len],
                               d["resp_index"][sl].clamp(max=t_len - 1))
                logits, vals = out if isinstance(out, tuple) else (out, None)
                lp, ent = ppo.logprobs_and_entropy(logits, d["resp_ids"][sl])
                lps.append(lp)
                ents.append(ent)
                if vals is not None:
                    values.append(vals)
                del out, logits
        return torch.cat(lps), (torch.cat(values) if values else None), torch.cat(ents)

    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _on_policy_stats(self, mask: Any, tolerance: float) -> dict:
        """|learner - engine| logprob of every sampled response token under ``mask``, over every rank: the primary
        on-policy check (the engine sampled these tokens; the learner must give them the same probability)."""
        diff = (self.data["old_logprobs"] - self.data["engine_logprobs"]).abs() * mask
        (worst,) = self._allreduce([diff.max().item() if mask.numel() else 0.0], op="max")
        total, over, n_tok = self._allreduce([diff.sum().item(), ((diff > tolerance) * mask).sum().item(),
                                              mask.sum().item()])
        key = "rollout/engine_learner_logprob"
        return {f"{key}_max_abs_diff": worst, f"{key}_mean_abs_diff": total / max(n_tok, 1.0),
                f"{key}_frac_over_tol": over / max(n_tok, 1.0), f"{key}_tolerance": tolerance,
                f"{key}_tokens_checked": n_tok}

    def _importance_weights(self, mask: Any, cap: float) -> dict:
        """Truncated importance weights min(pi_learner / pi_engine, cap) of every response token (kept for update)
        and their statistics over every rank."""
        from learner import algorithms

        d = self.data
        d["is_weights"], st = algorithms.truncated_importance_weights(d["old_logprobs"], d["engine_logprobs"],
                                                                      mask, cap)
        n, w_sum, n_trunc = self._allreduce([st["num_tokens"].item(), st["weight_sum"].item(),
                                             st["num_truncated"].item()])
        (ratio_max,) = self._allreduce([st["ratio_max"].item()], op="max")
        return {"learner/is_weight_mean": w_sum / max(n, 1.0), "learner/is_ratio_max": ratio_max,
                "learner/is_truncated_frac": n_trunc / max(n, 1.0)}

    def prepare(self, batch: Any, iteration: int, on_policy_tolerance: float = 1e-3,
                importance_cap: float = 0.0) -> dict:
        """Score this rank's rows: old logprobs (+ values for PPO), reference logprobs, KL, the algorithm's
        advantages, and the engine/learner logprob comparison over every rank (on_policy_tolerance: per-token
        |diff| counted as over; it is enforced on the rows of this iteration's version, the stale rows of
        one-step-off mode are importance-weighted instead: importance_cap > 0)."""
        import torch

        from learner import ppo

        self.iteration = iteration
        rows = np.arange(self.rank, batch.num_rows, self.world)
        d = {k: v.to(self.device) for k, v in ppo.pad_batch(batch.take(rows), self.pad_id).items()}
        self.data = d
        temp = self.temperature
        d["old_logprobs"], d["old_values"], entropy = self._score(lambda i, a, r: self.engine(i, a, r, temp))
        if self.ref is None:
            d["ref_logprobs"] = d["old_logprobs"]  # kl_coef = 0: the KL term is zero and needs no reference
        else:
            if self.cfg.ref_offload:
                self.ref.to(self.device)
            d["ref_logprobs"], _, _ = self._score(lambda i, a, r: reference_logits(self.ref, i, a, r, temp))
            if self.cfg.ref_offload:
                self.ref.to("cpu")
        mask = d["resp_mask"]
        kl = ppo.kl_estimate(d["old_logprobs"], d["ref_logprobs"], self.cfg.kl_estimator) * mask
        adv, d["returns"] = self._advantages(batch, rows, kl, mask)
        n_tok, s1, s2 = self._allreduce([mask.sum().item(), ppo.masked_sum(adv, mask).item(),
                                         ppo.masked_sum(adv**2, mask).item()])
        if self.cfg.algorithm == "reinforce_pp" or (self.cfg.algorithm == "ppo" and self.cfg.whiten_advantages):
            mean = s1 / n_tok  # over every rank's tokens (REINFORCE++ normalises its returns this way by definition)
            adv = ppo.masked_whiten(adv, mask, mean, max(s2 / n_tok - mean**2, 0.0))
        d["advantages"] = -adv if self.cfg.flip_advantage_sign else adv
        if d["old_values"] is None:
            d["old_values"] = torch.zeros_like(d["old_logprobs"])  # critic-free: reported as 0
        versions = torch.from_numpy(batch.take(rows).column("policy_version").to_numpy()).to(self.device)
        fresh = (versions == iteration).to(mask.dtype).unsqueeze(-1) * mask
        stats = self._on_policy_stats(fresh, on_policy_tolerance)
        d.pop("is_weights", None)
        if importance_cap > 0:
            stats.update(self._importance_weights(mask, importance_cap))
        kl_sum, v_sum, r_sum, n_seq, ent_sum = self._allreduce([
            ppo.masked_sum(kl, mask).item(), ppo.masked_sum(d["old_values"], mask).item(), d["reward"].sum().item(),
            float(len(rows)), ppo.masked_sum(entropy, mask).item()])
        return {"kl/mean": kl_sum / n_seq, "kl/per_token": kl_sum / n_tok, "learner/value_mean": v_sum / n_tok,
                "rollout/entropy": ent_sum / n_tok,
                "learner/tokens": n_tok, **stats}

    def _advantages(self, batch: Any, rows: np.ndarray, kl: Any, mask: Any) -> tuple[Any, Any]:
        """Per-token advantages [B, R] of this rank's rows, and the critic's returns [B, R] (PPO only, else None).

        ppo: GAE over KL-shaped token rewards and the critic's values. reinforce_pp: the discounted return of the
        KL-shaped token rewards (whitened over all ranks by the caller). grpo / rloo: one advantage per sample from
        its group (the samples of one prompt), computed on the whole batch that every rank holds, so a group split
        over ranks is still one group; KL then goes in the loss (learner.kl_in_loss)."""
        import torch

        from learner import algorithms, ppo

        d, c = self.data, self.cfg
        kl_coef = 0.0 if c.kl_in_loss else c.kl_coef
        if c.algorithm == "ppo":
            rewards = ppo.token_rewards(d["reward"], kl, mask, kl_coef)
            return ppo.compute_gae(rewards, d["old_values"], mask, c.gamma, c.gae_lambda)
        if c.algorithm == "reinforce_pp":
            return algorithms.reinforce_pp_returns(d["reward"], kl, mask, kl_coef, c.gamma), None
        rewards = torch.from_numpy(batch.column("reward").to_numpy().astype(np.float32)).to(self.device)
        groups = torch.from_numpy(batch.column("prompt_id").to_numpy().astype(np.int64)).to(self.device)
        one = torch.ones(len(rewards), 1, device=self.device)
        if c.algorithm == "grpo":
            per_sample = algorithms.grpo_advantages(rewards, groups, one, scale_by_std=c.grpo_scale_by_std)
        else:
            per_sample = algorithms.rloo_advantages(rewards, groups, one)
        return per_sample[torch.as_tensor(rows, device=self.device), 0].unsqueeze(-1) * mask, None

    def update(self) -> dict:
        """Epochs over mini-batches of the clipped surrogate (+ the critic's value loss for PPO, + k3 KL when it is
        in the loss, - entropy bonus), aggregated over the global mini-batch (learner.loss_aggregation)."""
        import torch

        from learner import algorithms, ppo

        d, cfg = self.data, self.cfg
        n = d["input_ids"].shape[0]
        totals: dict[str, float] = {}
        steps = 0
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration * 101 + epoch)
            perm = torch.randperm(n, generator=g)
            for mb in perm.chunk(cfg.num_minibatches):
                mask = d["resp_mask"][mb]
                t_len = int(d["attention_mask"][mb].sum(1).max())
                logits, values = self.engine(d["input_ids"][mb, :t_len], d["attention_mask"][mb, :t_len],
                                             d["resp_index"][mb].clamp(max=t_len - 1), self.temperature)
                logp = ppo.logprobs_from_logits(logits, d["resp_ids"][mb])
                pg, clipped = ppo.policy_loss(logp, d["old_logprobs"][mb], d["advantages"][mb], cfg.clip_ratio)
                if "is_weights" in d:  # one-step-off: correct for the behaviour policy that sampled the tokens
                    pg = pg * d["is_weights"][mb]
                per_token = pg
                vl = torch.zeros_like(logp)
                if values is not None:
                    vl = ppo.value_loss(values, d["old_values"][mb], d["returns"][mb], cfg.value_clip)
                    per_token = per_token + cfg.vf_coef * vl
                if cfg.kl_in_loss and self.ref is not None:
                    per_token = per_token + cfg.kl_coef * algorithms.kl_loss_k3(logp, d["ref_logprobs"][mb])
                ent = ppo.entropy_from_logits(logits) if cfg.entropy_coef else torch.zeros_like(logp)
                per_token = per_token - cfg.entropy_coef * ent
                n_tok, n_seq = self._allreduce([mask.sum().item(), (mask.sum(-1) > 0).sum().item()])
                # DeepSpeed averages gradients over ranks: normalise by the global count / world.
                count = n_tok if cfg.loss_aggregation == "token_mean" else n_seq
                loss = algorithms.aggregate(per_token, mask, cfg.loss_aggregation, denominator=count / self.world,
                                            token_norm=float(max(cfg.max_new_tokens, 1)))
                self.engine.backward(loss)
                self.engine.step()
                with torch.no_grad():
                    approx_kl = ppo.masked_sum(d["old_logprobs"][mb] - logp, mask)
                    local = [ppo.masked_sum(pg, mask).item(), ppo.masked_sum(vl, mask).item(),
                             ppo.masked_sum(clipped, mask).item(), approx_kl.item(),
                             ppo.masked_sum(ent, mask).item()]
                pg_s, vl_s, cf_s, ak_s, en_s = self._allreduce(local)
                for key, val in (("policy_loss", pg_s), ("value_loss", vl_s), ("clipfrac", cf_s),
                                 ("approx_kl", ak_s), ("entropy", en_s)):
                    totals[key] = totals.get(key, 0.0) + val / n_tok
                gn = self.engine.get_global_grad_norm()
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(gn if gn is not None else 0.0)
                steps += 1
        return {f"learner/{k}": v / steps for k, v in totals.items()}

    # ---- persistence -----------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Write this rank's part of checkpoint ``tag``. DeepSpeed's own 'latest' pointer is not written: the
        driver commits a checkpoint (oirl/checkpoint.py) only after every rank returned from here."""
        self.engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag} under {directory}")

    def save_hf(self, out_dir: str) -> None:
        """The policy as a plain HF folder (weights + config + tokenizer) that transformers and vLLM load."""
        import torch

        with self._gathered():
            if self.rank != 0:
                return
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            state = {n: p.detach().cpu().clone() for n, p in self.module.lm.state_dict().items()}
            self.module.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
            if self.module.value_head is not None:
                torch.save(self.module.value_head.state_dict(), out / "value_head.pt")
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja", "generation_config.json"):
                src = Path(self.model_path) / name
                if src.is_file():
                    shutil.copy(src, out / name)
