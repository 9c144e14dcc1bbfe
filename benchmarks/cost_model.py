"""A cost model of one oirl PPO iteration on a GPU cluster: pure functions over stated assumptions.

    iteration = generate + learner (prepare + update + ZeRO communication [+ optimizer offload]) + sync

Strict on-policy, as oirl runs by default: the phases do not overlap. What each term counts:

- **generate**: the rollout GPUs form ``engines = rollout_gpus / tp`` vLLM engines (tp: the smallest power of two
  whose weight shard takes at most half a GPU's memory). Each engine decodes its share of the samples in waves of
  at most ``max_num_seqs`` sequences (fewer if the KV cache does not hold them). A decode step reads the engine's
  weight shard once plus every running sequence's KV cache from HBM, or does 2*N FLOPs per sequence, whichever is
  slower; prefill is compute bound. Tensor-parallel all-reduces inside an engine are not counted.
- **learner**: 2*N FLOPs per token for each forward-only pass (the policy's old logprobs, the reference) and 6*N per
  token per epoch (forward + backward), over every prompt and response token, at ``learner_mfu`` of the GPUs' peak.
  ZeRO traffic per GPU, as ring collectives over the slowest link the group spans (NVLink inside one node, the
  network beyond): ZeRO-2 reduce-scatters gradients and all-gathers parameters once per optimizer step; ZeRO-3
  also all-gathers parameters for every forward and backward. ``zero_overlap`` of it is hidden behind compute.
  When ZeRO-3 alone does not fit, the optimizer state moves to host memory (DeepSpeed offload): each step then
  pays host Adam plus gradients down and parameters up over PCIe.
- **sync**: learner rank 0 gathers the full bf16 weights (ZeRO-3 only) and broadcasts them to every engine over the
  slowest link between them; a pipelined broadcast costs about bytes / link bandwidth whatever the number of
  receivers. The transfer is multiplied by ``sync_overhead`` (oirl's measured sync time over its floor, from
  benchmarks/results/sync.json) and ``sync_latency_s`` is added.

Memory rule (per GPU, ``memory_headroom`` of it usable; activations assumed to fit in the rest with gradient
checkpointing): ZeRO-2 holds full bf16 parameters (2N) + its shards of gradients and fp32 Adam state (14N/g) + a
full bf16 reference (2N, as oirl loads it today); ZeRO-3 holds 16N/g + a reference sharded the same way (2N/g);
ZeRO-3 with the optimizer offloaded holds 4N/g + 2N/g.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    name: str = "NVIDIA H100 SXM 80GB"
    peak_flops: float = 989e12
    """Dense bf16 tensor-core FLOP/s (no sparsity)."""
    hbm_bytes_per_s: float = 3.35e12
    """HBM3 bandwidth."""
    nvlink_bytes_per_s: float = 450e9
    """NVLink 4 per direction (900 GB/s is both directions together); a collective's traffic uses one direction."""
    network_bytes_per_s: float = 50e9
    """One 400 Gb/s InfiniBand NIC per GPU (DGX H100 layout)."""
    pcie_bytes_per_s: float = 25e9
    """Achieved host<->GPU copy rate per direction over PCIe 5 x16 (64 GB/s line rate), for optimizer offload."""
    memory_bytes: float = 80e9
    gpus_per_node: int = 8


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0
    """bf16 weights, KV cache and wire format."""

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param


MODEL_7B = ModelShape("7B dense (Mistral-7B shape: 32 layers, 8 KV heads x 128)", 7e9, 32, 8, 128)
MODEL_70B = ModelShape("70B dense (Llama-3-70B shape: 80 layers, 8 KV heads x 128)", 70e9, 80, 8, 128)


@dataclass(frozen=True)
class Workload:
    samples: int = 512
    """Samples per iteration (configs/gpu.yaml: 64 prompts x 8)."""
    prompt_tokens: int = 512
    response_tokens: int = 512
    """Every sample runs to the cap (benchmark mode, rollout.ignore_eos)."""
    epochs: int = 1
    num_minibatches: int = 4
    """Optimizer steps per epoch (oirl: gradient accumulation 1, so one micro-step each)."""
    policy_forward: bool = True
    """prepare() runs a forward of the policy for the old logprobs (oirl today)."""
    reference: bool = True
    """kl_coef > 0: a reference forward in prepare()."""
    max_num_seqs: int = 64
    """vLLM's running-sequence cap per engine (rollout.max_num_seqs)."""


@dataclass(frozen=True)
class Efficiency:
    learner_mfu: float = 0.35
    """Achieved / peak FLOP/s of training and scoring forwards (assumed; replaced by a GPU check when one exists)."""
    prefill_mfu: float = 0.5
    """Achieved / peak FLOP/s of prefill and of compute-bound decode steps."""
    decode_hbm_efficiency: float = 0.6
    """Achieved / peak HBM bandwidth of a memory-bound decode step."""
    collective_efficiency: float = 0.8
    """Achieved / line-rate bandwidth of NCCL collectives and of the weight broadcast."""
    zero_overlap: float = 0.5
    """Fraction of ZeRO traffic hidden behind compute (DeepSpeed overlap_comm and ZeRO-3 prefetch); 0: none."""
    sync_overhead: float = 1.0
    """oirl's sync seconds over the raw transfer (calibrated from sync.json)."""
    sync_latency_s: float = 0.0
    """Fixed cost of a sync (RPCs, version and fingerprint checks; calibrated from sync.json)."""
    memory_headroom: float = 0.8
    """Fraction of GPU memory for weights, optimizer state and KV cache; the rest for activations and buffers."""
    host_adam_params_per_s: float = 1e9
    """Parameters per second one GPU's share of the host updates with CPU Adam (optimizer offload only)."""


@dataclass(frozen=True)
class Layout:
    gpus: int
    learner_gpus: int
    tp: int
    zero_stage: int
    offload: bool = False

    @property
    def rollout_gpus(self) -> int:
        return self.gpus - self.learner_gpus

    @property
    def engines(self) -> int:
        return self.rollout_gpus // self.tp


# ---- links -------------------------------------------------------------------------------------------------------


def link_bytes_per_s(gpu: Gpu, eff: Efficiency, span_gpus: int) -> float:
    """Per-GPU collective bandwidth of a group spanning ``span_gpus`` GPUs (packed on whole nodes)."""
    raw = gpu.nvlink_bytes_per_s if span_gpus <= gpu.gpus_per_node else gpu.network_bytes_per_s
    return raw * eff.collective_efficiency


def ring_seconds(nbytes: float, group: int, bandwidth: float) -> float:
    """One ring all-gather or reduce-scatter of ``nbytes`` (the full tensor) over ``group`` GPUs: each GPU moves
    (group - 1) / group of it."""
    return 0.0 if group <= 1 else nbytes * (group - 1) / group / bandwidth


# ---- memory ------------------------------------------------------------------------------------------------------


def engine_tp(model: ModelShape, gpu: Gpu) -> int:
    """Smallest power-of-two tensor parallelism whose weight shard takes at most half a GPU's memory."""
    tp = 1
    while model.weight_bytes / tp > 0.5 * gpu.memory_bytes:
        tp *= 2
    return tp


def learner_bytes_per_gpu(model: ModelShape, g: int, zero_stage: int, offload: bool, reference: bool) -> float:
    n = model.params
    if zero_stage == 2:
        return 2 * n + 14 * n / g + (2 * n if reference else 0.0)
    states = 4 * n if offload else 16 * n
    return (states + (2 * n if reference else 0.0)) / g


def choose_zero(model: ModelShape, gpu: Gpu, eff: Efficiency, g: int, reference: bool) -> tuple[int, bool] | None:
    """The cheapest ZeRO setting whose learner state fits: ZeRO-2, else ZeRO-3, else ZeRO-3 with optimizer offload."""
    for stage, offload in ((2, False), (3, False), (3, True)):
        if learner_bytes_per_gpu(model, g, stage, offload, reference) <= eff.memory_headroom * gpu.memory_bytes:
            return stage, offload
    return None


def kv_capacity_seqs(model: ModelShape, gpu: Gpu, eff: Efficiency, tp: int, context: int) -> int:
    """Sequences of ``context`` tokens whose KV cache fits beside the weights in an engine of ``tp`` GPUs."""
    free = eff.memory_headroom * gpu.memory_bytes * tp - model.weight_bytes
    return max(0, int(free // (model.kv_bytes_per_token * context)))


# ---- phases ------------------------------------------------------------------------------------------------------


def decode_step_seconds(model: ModelShape, gpu: Gpu, eff: Efficiency, tp: int, batch: int, context: float) -> float:
    """One decode step of ``batch`` sequences with ``context`` tokens each on an engine of ``tp`` GPUs."""
    memory = (model.weight_bytes + batch * context * model.kv_bytes_per_token) / tp
    memory_s = memory / (gpu.hbm_bytes_per_s * eff.decode_hbm_efficiency)
    compute_s = 2 * model.params * batch / tp / (gpu.peak_flops * eff.prefill_mfu)
    return max(memory_s, compute_s)


def generate_seconds(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, layout: Layout) -> float:
    seqs = math.ceil(w.samples / layout.engines)  # the busiest engine's share
    context_max = w.prompt_tokens + w.response_tokens
    cap = min(w.max_num_seqs, kv_capacity_seqs(model, gpu, eff, layout.tp, context_max))
    if cap < 1:
        raise ValueError(f"{model.name}: no sequence of {context_max} tokens fits beside the weights at tp={layout.tp}")
    waves = math.ceil(seqs / cap)
    batch = math.ceil(seqs / waves)
    prefill = 2 * model.params * w.prompt_tokens * batch / layout.tp / (gpu.peak_flops * eff.prefill_mfu)
    # The KV term grows linearly with the step, so the mean context gives the exact sum over steps.
    mean_context = w.prompt_tokens + (w.response_tokens + 1) / 2
    decode = w.response_tokens * decode_step_seconds(model, gpu, eff, layout.tp, batch, mean_context)
    return waves * (prefill + decode)


def learner_flops(model: ModelShape, w: Workload) -> float:
    tokens = w.samples * (w.prompt_tokens + w.response_tokens)
    forwards = int(w.policy_forward) + int(w.reference)
    return (2 * forwards + 6 * w.epochs) * model.params * tokens


def zero_comm_seconds(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, g: int, zero_stage: int) -> float:
    """ZeRO traffic of one iteration per learner GPU (see the module docstring)."""
    bw = link_bytes_per_s(gpu, eff, g)
    one = ring_seconds(model.weight_bytes, g, bw)  # one all-gather (or reduce-scatter) of bf16 weights/gradients
    steps = w.epochs * w.num_minibatches
    if zero_stage == 2:
        return steps * 2 * one
    # ZeRO-3: per step, gather for forward and for backward + reduce-scatter gradients; prepare's forward-only
    # passes (policy, and the sharded reference) gather once per chunk, taken as one chunk per mini-batch.
    forwards = int(w.policy_forward) + int(w.reference)
    return steps * 3 * one + forwards * w.num_minibatches * one


def offload_seconds(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, g: int) -> float:
    """Optimizer offload per iteration: host Adam on each GPU's shard, gradients down and parameters up over PCIe."""
    shard = model.params / g
    per_step = shard / eff.host_adam_params_per_s + 2 * shard * model.bytes_per_param / gpu.pcie_bytes_per_s
    return w.epochs * w.num_minibatches * per_step


def learner_seconds(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, layout: Layout) -> dict[str, float]:
    g = layout.learner_gpus
    parts = {"compute": learner_flops(model, w) / (g * gpu.peak_flops * eff.learner_mfu),
             "zero_comm": zero_comm_seconds(model, gpu, eff, w, g, layout.zero_stage),
             "offload": offload_seconds(model, gpu, eff, w, g) if layout.offload else 0.0}
    total = parts["compute"] + (1 - eff.zero_overlap) * parts["zero_comm"] + parts["offload"]
    return {**parts, "total": total}


def sync_seconds(weight_bytes: float, gpu: Gpu, eff: Efficiency, learner_gpus: int, total_gpus: int,
                 gather: bool) -> dict[str, float]:
    """Publish the full weights: (ZeRO-3) gather to rank 0 over the learner's link, then one pipelined broadcast to
    the engines over the link that spans the whole job. ``raw``: the transfer alone; ``seconds``: x sync_overhead
    + sync_latency_s."""
    gather_s = ring_seconds(weight_bytes, learner_gpus, link_bytes_per_s(gpu, eff, learner_gpus)) if gather else 0.0
    broadcast_s = weight_bytes / link_bytes_per_s(gpu, eff, total_gpus)
    raw = gather_s + broadcast_s
    return {"gather": gather_s, "broadcast": broadcast_s, "raw": raw,
            "seconds": raw * eff.sync_overhead + eff.sync_latency_s}


def iteration(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, layout: Layout) -> dict[str, Any]:
    gen = generate_seconds(model, gpu, eff, w, layout)
    learn = learner_seconds(model, gpu, eff, w, layout)
    sync = sync_seconds(model.weight_bytes, gpu, eff, layout.learner_gpus, layout.gpus, layout.zero_stage == 3)
    return {"iteration_seconds": gen + learn["total"] + sync["seconds"], "generate_seconds": gen,
            "learner_seconds": learn["total"], "learner_breakdown": learn, "sync_seconds": sync["seconds"],
            "sync_breakdown": sync, "layout": asdict(layout) | {"engines": layout.engines}}


def learner_sizes(gpus: int, gpu: Gpu) -> list[int]:
    """Learner group sizes considered: 1, 2, 4, then whole nodes (below ``gpus``)."""
    sizes = [g for g in (1, 2, 4) if g < min(gpus, gpu.gpus_per_node)]
    return sizes + list(range(gpu.gpus_per_node, gpus, gpu.gpus_per_node))


def best_layout(model: ModelShape, gpu: Gpu, eff: Efficiency, w: Workload, gpus: int) -> dict[str, Any]:
    """The split of ``gpus`` between engines and learner ranks with the shortest projected iteration, among the
    learner sizes of ``learner_sizes`` whose state fits and engine counts that fill the rest at tp; ``fits: False``
    and ``why`` when none does."""
    tp = engine_tp(model, gpu)
    best: dict[str, Any] | None = None
    for learner_gpus in learner_sizes(gpus, gpu):
        if gpus - learner_gpus < tp or (gpus - learner_gpus) % tp:
            continue
        zero = choose_zero(model, gpu, eff, learner_gpus, w.reference)
        if zero is None:
            continue
        result = iteration(model, gpu, eff, w, Layout(gpus, learner_gpus, tp, *zero))
        if best is None or result["iteration_seconds"] < best["iteration_seconds"]:
            best = result
    if best is None:
        need = next(g for g in range(1, 1 << 20) if choose_zero(model, gpu, eff, g, w.reference) is not None)
        return {"fits": False, "iteration_seconds": None, "sync_seconds": None,
                "why": f"engines need tp={tp} GPUs and the learner at least {need} (ZeRO-3 with the optimizer on the "
                       f"host) under the memory rule: {tp + need} > {gpus} GPUs"}
    return {"fits": True, **best}
