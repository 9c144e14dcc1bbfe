"""LearnerConfig: every learner.* setting of a run (the DeepSpeed ranks, the algorithm and its losses, PPO's critic,
memory options). oirl/config.py composes it into RunConfig and validates it at start-up; each rank receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oirl.bounds import bounds


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
    max_new_tokens: int = field(default=0, metadata=bounds(ge=0, why="0: the driver sets it"))
    """Set by the driver from rollout.max_new_tokens (the seq_mean_token_sum constant)."""
    critic: str = "shared"
    """PPO's critic: 'shared' (a value head on the policy's backbone, trained with the policy's loss and lr) or
    'separate' (its own model, DeepSpeed engine, optimizer and lr: learner/critic.py)."""
    critic_lr: float = field(default=0.0, metadata=bounds(ge=0, why="0 = learner.lr"))
    """AdamW learning rate of the separate critic; 0 = learner.lr."""
    critic_warmup_iterations: int = field(default=0, metadata=bounds(ge=0))
    """Separate critic: the first N iterations train only the critic (the policy, and the weights it publishes,
    stay as they are), so PPO starts from values that fit the initial policy."""
    critic_init: str = "policy"
    """Separate critic's starting point: 'policy' (its backbone, a head near 0) or a reward-model folder from
    `oirl train-rm` (backbone and score head; same model type and vocabulary as the policy)."""
    importance_cap: float = field(default=2.0, metadata=bounds(gt=0))
    """One-step-off mode (rollout.async_steps=1): the policy loss of each token is weighted by
    min(pi_learner / pi_behaviour, importance_cap), the behaviour being the engine's logprobs (truncated IS)."""
    num_ranks: int = field(default=2, metadata=bounds(ge=1))
    """Ranks in the ZeRO group (Ray actors)."""
    zero_stage: int = field(default=2, metadata=bounds(ge=0, le=3))
    """DeepSpeed ZeRO stage 0-3."""
    lr: float = field(default=1e-5, metadata=bounds(gt=0))
    """AdamW learning rate of the policy (and of the value head when learner.critic=shared)."""
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    """AdamW weight decay."""
    max_grad_norm: float = field(default=1.0, metadata=bounds(ge=0))
    """Gradient clipping norm."""
    ppo_epochs: int = field(default=1, metadata=bounds(ge=1))
    """Passes over each batch."""
    num_minibatches: int = field(default=1, metadata=bounds(ge=1))
    """Optimizer steps per epoch (the batch splits evenly)."""
    clip_ratio: float = field(default=0.2, metadata=bounds(gt=0))
    """PPO ratio clip epsilon."""
    value_clip: float = field(default=0.2, metadata=bounds(gt=0, why="it bounds the value update per step"))
    """Clip of the value update around the old values."""
    vf_coef: float = field(default=0.5, metadata=bounds(ge=0))
    """Weight of the value loss in the policy's loss (learner.critic=shared; a separate critic has its own)."""
    kl_coef: float = field(default=0.05, metadata=bounds(ge=0))
    """KL penalty coefficient in the per-token reward."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: 'k1' (log ratio) or 'k3' (non-negative)."""
    entropy_coef: float = field(default=0.0, metadata=bounds(ge=0))
    """Entropy bonus weight."""
    gamma: float = field(default=1.0, metadata=bounds(ge=0, le=1))
    """Discount over response tokens."""
    gae_lambda: float = field(default=0.95, metadata=bounds(ge=0, le=1))
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over the whole batch (all ranks)."""
    flip_advantage_sign: bool = False
    """Sanity switch for tests: train against the reward (learning must then fail)."""
    forward_batch_size: int = field(default=8, metadata=bounds(ge=1, why="rows per no-grad forward"))
    """Rows per forward: prepare()'s no-grad chunks, and update()'s micro-batches (gradients accumulate over a
    mini-batch's micro-batches into one optimizer step). Full-vocabulary logits exist for one such chunk at a time,
    and each chunk is cut to its own longest row."""
    update_autocast: str = ""
    """'' (the update computes in model.dtype) or 'bfloat16': update()'s forward and backward run under
    torch.autocast in bf16 while the master weights, the optimizer, prepare()'s scoring, the on-policy check and the
    published weights stay in model.dtype (float32). Mixed precision as GPU trainers use it; on CPUs with AVX512-BF16
    a bf16 matmul runs ~4.5x the fp32 rate here. The ratio then carries bf16 noise (learner/approx_kl shows it)."""
    old_logprobs: str = "auto"
    """Where the old logprobs (the PPO ratio's denominator, and the learner side of the on-policy check) come from.
    'forward': a no-grad policy forward in prepare(). 'update': update()'s own forward, before its only optimizer
    step; needs one step per batch (ppo_epochs=1, num_minibatches=1), no value function (critic-free) and strict
    on-policy rollouts, where that forward sees exactly the weights the engine sampled with, so the check still
    covers every token of the batch. Saves one policy forward per iteration. 'auto': 'update' where allowed."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, ~30% more update time)."""
    ref_dtype: str = ""
    """dtype of the frozen reference model: '' = model.dtype, or 'bfloat16' / 'float32' (bf16 halves its memory)."""
    ref_offload: bool = False
    """Keep the reference model in host memory and move it to the device only for prepare()'s reference pass."""
    num_cpus: float = field(default=1.0, metadata=bounds(
        gt=0, why="each rank's placement-group bundle reserves it, and Ray refuses a bundle of 0 CPUs"))
    """Ray CPUs per rank."""
    num_gpus: float = field(default=0.0, metadata=bounds(ge=0))
    """Ray GPUs per rank (1 on GPU clusters)."""
    cpu_shm_allreduce: bool = False
    """Use DeepSpeed's shared-memory allreduce op on CPU (JIT-compiles ~150 s on first use); false = plain gloo."""
    timeout_s: float = field(default=1800.0, metadata=bounds(gt=0, why="every remote wait needs a timeout"))
    """Longest wait for one learner call (collectives use it too)."""
