"""LearnerConfig: every learner.* setting of a run (the DeepSpeed ranks, the algorithm and its losses, PPO's critic,
memory options). oirl/config.py composes it into RunConfig and validates it at start-up; each rank receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oirl.bounds import bounds


@dataclass(frozen=True)
class LearnerConfig:
    algorithm: str = "ppo"
    """'ppo' (GAE with a critic), 'grpo' (group-normalised outcome advantage), 'rloo' (leave-one-out baseline),
    'reinforce_pp' (REINFORCE++: per-token KL in the return, batch-normalised), 'gspo' (GRPO's advantage with a
    sequence-level ratio and clip) or 'dapo' (GRPO's advantage with clip-higher, dynamic sampling and overlong
    shaping). Critic-free ones build no value head. Settings the user leaves unset follow the algorithm's recipe
    (oirl.config.ALGORITHM_DEFAULTS)."""
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
    rollout_correction: str = "tis"
    """How the loss corrects for the engine (the behaviour policy: other kernels, bf16 most, and in one-step-off
    mode the previous version) sampling the tokens instead of the learner: 'tis' (each token's loss x
    min(pi_learner / pi_engine, importance_cap)), 'mis' (tokens, or samples with mis_level=sequence, whose ratio
    is outside [mis_lo, mis_hi] leave the loss), 'seq' (every token x the sample's truncated geometric-mean ratio,
    as GSPO) or 'none'. Applied in strict and one-step-off mode (learner/algorithms/correction.py)."""
    importance_cap: float = field(default=2.0, metadata=bounds(gt=0))
    """Truncation of the importance weights of rollout_correction=tis and seq."""
    mis_lo: float = field(default=0.5, metadata=bounds(ge=0, lt=1))
    """rollout_correction=mis: lowest ratio pi_learner / pi_engine kept in the loss."""
    mis_hi: float = field(default=2.0, metadata=bounds(gt=1))
    """rollout_correction=mis: highest ratio kept in the loss."""
    mis_level: str = "token"
    """rollout_correction=mis: judge each 'token' by its ratio, or each 'sequence' by its geometric-mean ratio."""
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
    """PPO ratio clip epsilon (the lower side, 1 - clip_ratio, and the upper side unless clip_ratio_high is set)."""
    clip_ratio_high: float = field(default=0.0, metadata=bounds(ge=0, why="0: the same as clip_ratio"))
    """Upper clip 1 + clip_ratio_high (DAPO's clip-higher, 0.28: low-probability tokens may grow); 0 = clip_ratio."""
    overlong_buffer: int = field(default=0, metadata=bounds(ge=0, why="0: no overlong shaping"))
    """DAPO's soft overlong punishment: the last N tokens before rollout.max_new_tokens cost up to
    overlong_penalty in reward, linearly; 0 = off."""
    overlong_penalty: float = field(default=1.0, metadata=bounds(ge=0))
    """The reward a response reaching rollout.max_new_tokens loses (overlong_buffer > 0)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal (no signal for group-relative advantages) leave
    the batch, and more prompts are generated and scored until it is full again (dynamic_sampling_max_rounds)."""
    dynamic_sampling_max_rounds: int = field(default=4, metadata=bounds(ge=1))
    """Generation rounds per iteration with dynamic_sampling; if the batch is still short, the iteration trains on
    the groups it has plus constant ones (logged as rollout/dynamic_filled_frac) rather than never finishing."""
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
    """dtype of the frozen reference model: '' = model.dtype, the only value accepted: a reference in another dtype
    than the policy's forward makes the KL measure precision, not drift (a bf16 reference beside an fp32 policy:
    0.18-0.38 nats per sample before any step). To save its memory, use ref_offload."""
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
