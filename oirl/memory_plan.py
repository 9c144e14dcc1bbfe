"""Memory plan (`oirl plan --memory`): the bytes a config needs on each device, per role, before anything starts.

    plan = memory_plan(cfg, Architecture.from_hf_config(json.load(...)), device_bytes=80 << 30)

For each role the plan lists its parts and the moment each is alive; a role's peak is its largest moment:

learner rank (one per device; DeepSpeed ZeRO over g = learner.num_ranks ranks, N parameters):
- weights: N x bytes(model.dtype), a g-th of it under ZeRO-3 (plus the gathered working set: the largest module
  and DeepSpeed's prefetch bucket);
- gradients: N x bytes(model.dtype) under ZeRO 0/1, a g-th of it under ZeRO 2/3 (filled during backward: whole
  beside the activations only when a step accumulates several micro-batches), plus DeepSpeed's reduce bucket
  (reduce_bucket_size elements, learner/ranks.py) and, at the end of backward, the embedding's dense gradient;
- optimizer: fp32 master weights (4 B/param; DeepSpeed keeps them even for an fp32 model) and AdamW's two moments
  (8 B/param), a g-th of them under ZeRO >= 1; at the step also the fp32 copy of the gradient partition (4 B/param);
- reference: N x bytes(learner.ref_dtype), whole on every rank (it is not a DeepSpeed model); in host memory
  between prepares with learner.ref_offload;
- activations of one micro-batch (learner.forward_batch_size rows of max_prompt_tokens + max_new_tokens tokens), by
  ``layer_activation_bytes``, or with learner.gradient_checkpointing every layer's input plus one layer recomputed;
- the logits chunk: [rows, max_new_tokens, vocab] logits in the compute dtype, kept for backward, their gradient,
  and one fp32 chunk of learner/ppo.py's vocabulary-chunked log-softmax (LOGPROB_CHUNK_ELEMENTS);
- with learner.update_autocast=bfloat16, the bf16 copies of the weights autocast keeps for backward;
- on a GPU, RUNTIME_BYTES for the CUDA context, NCCL and the allocator's fragmentation.
The moments: prepare (state + reference + one no-grad scoring chunk), backward (state + reduce bucket +
activations + logits), the end of backward (state + gradients + the embedding's gradient) and the optimizer step
(state + gradients + the fp32 gradient copy).

rollout engine: the weights, and vLLM's KV cache: on a GPU it takes rollout.gpu_memory_utilization of the device
and the cache is what the weights and ENGINE_OVERHEAD_BYTES leave of it; on CPU rollout.kv_cache_gib beside the
weights. It fits when the cache holds at least one sequence of max_prompt_tokens + max_new_tokens; the plan also says
how many of the batch's sequences it holds at once (vLLM queues the rest).

The per-token activation formula is exact for transformers' Llama/Qwen2 decoder layers with SDPA and a padding
mask, counted from the tensors autograd saves (tests/oirl/test_memory_plan.py checks it against saved-tensor hooks
and the whole plan against the measured peak of learner ranks: benchmarks/memory_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_BYTES = int(2.0 * GIB)
"""Per GPU: the CUDA context and kernels (~0.5-1 GiB), NCCL's buffers and the caching allocator's fragmentation."""
ENGINE_OVERHEAD_BYTES = int(2.0 * GIB)
"""Per vLLM engine on a GPU, inside gpu_memory_utilization: activations of its largest batch and CUDA graphs."""
ZERO3_PREFETCH_ELEMENTS = int(5e7)
"""DeepSpeed ZeRO-3's default stage3_prefetch_bucket_size: parameters gathered ahead of the module that runs."""


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder (Llama, Qwen2, Mistral): what memory depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    """Qwen2 has biases on q, k and v."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> Architecture:
        """From an HF config.json (LlamaConfig / Qwen2Config / MistralConfig fields)."""
        heads = int(cfg["num_attention_heads"])
        return cls(name=name or str(cfg.get("_name_or_path") or cfg.get("model_type", "model")),
                   hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        attn = self.hidden * (2 * self.q_dim + 2 * self.kv_dim)
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return attn + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self) -> int:
        """Exactly what transformers' *ForCausalLM holds (a tied head counted once)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """vLLM's KV cache: K and V of every layer for one token."""
        return 2 * self.layers * self.kv_dim * dtype_bytes

    def layer_activation_bytes(self, b: int, seq_len: int, autocast: bool = False) -> int:
        """Bytes one decoder layer keeps for backward per token, compute dtype of b bytes, sequences of seq_len.

        Saved by autograd (transformers' Llama/Qwen2 layer, SDPA, a padding mask): each RMSNorm its fp32 input,
        rsqrt (4 B) and two b-byte tensors (normalised, weighted: 4h + 2bh + 4); q, k, v after RoPE, the attention
        output and its contiguous copy for o_proj (b(q + 2kv) + 2bq), the attention's fp32 logsumexp per head, the
        layer's own copy of the [T, T] mask (b T per token); the MLP's gate, SiLU(gate), up and their product
        (4bi). Under autocast (fp32 weights, b = 2): the norms keep fp32 tensors (4h + 4h + 4) and each of the five
        projections of h-wide inputs keeps its own bf16 cast of its input (5 x 2h)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        norms = 2 * (4 * h + 4 * h + 4) + 5 * 2 * h if autocast else 2 * (4 * h + 2 * b * h + 4)
        attention = b * (q + 2 * kv) + 2 * b * q + 4 * self.heads + b * seq_len
        return norms + attention + 4 * b * i

    def head_activation_bytes(self, b: int, autocast: bool = False) -> int:
        """Per token, outside the layers: the input ids and the final RMSNorm's saved tensors."""
        return 8 + 4 * self.hidden + (4 if autocast else b) * self.hidden + 4


def _arch(name: str, **kw: Any) -> Architecture:
    return Architecture(name=name, **kw)


ARCHITECTURES = {a.name: a for a in (
    _arch("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
          tied=True),
    _arch("qwen2.5-1.5b", hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960,
          vocab=151936, tied=True, qkv_bias=True),
    _arch("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
          vocab=128256, tied=True),
    _arch("qwen2.5-7b", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
          vocab=152064, tied=False, qkv_bias=True),
    _arch("llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
          vocab=128256, tied=False),
    _arch("qwen2.5-32b", hidden=5120, layers=64, heads=40, kv_heads=8, head_dim=128, intermediate=27648,
          vocab=152064, tied=False, qkv_bias=True),
)}
"""Shapes from the released config.json files (Qwen2.5-*-Instruct, Llama-3.x): parameters as transformers builds."""
TABLE = ("qwen2.5-1.5b", "llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b", "qwen2.5-32b")
"""The shapes `oirl plan --memory` plans besides the config's own model."""


def config_architecture(cfg: Any) -> tuple[Architecture | None, str]:
    """The config's model as planned: its config.json where there is one here, the known shape of 'smollm2-135m'
    and 'tiny' otherwise; (None, why) when neither."""
    from oirl.models import model_folder

    folder = model_folder(cfg.model)
    name = cfg.model.path
    if (folder / "config.json").is_file():
        return Architecture.from_hf_config(json.loads((folder / "config.json").read_text()), name), str(folder)
    if name == "smollm2-135m":
        return dataclasses.replace(ARCHITECTURES["smollm2-135m"]), "known shape (not converted here yet)"
    if name == "tiny":
        m = cfg.model
        return Architecture(name, m.tiny_hidden_size, m.tiny_num_layers, max(1, m.tiny_hidden_size // 32),
                            max(1, m.tiny_hidden_size // 64), 32, 2 * m.tiny_hidden_size, m.tiny_vocab_size,
                            True), "oirl's tiny model (vocabulary at most model.tiny_vocab_size)"
    return None, f"model.path={name!r}: no config.json at {folder} on this machine"


def resolve_architecture(spec: str) -> Architecture:
    """A table name (ARCHITECTURES), an HF folder or a config.json path."""
    if spec in ARCHITECTURES:
        return ARCHITECTURES[spec]
    path = Path(spec).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--model {spec!r}: not one of {', '.join(ARCHITECTURES)} and no config.json there")
    return Architecture.from_hf_config(json.loads(file.read_text()), path.name)


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class RolePlan:
    role: str
    count: int
    device: str
    """'gpu' or 'cpu' (host memory of the actor's process)."""
    parts: dict[str, int]
    """Bytes of each part, by name."""
    moments: dict[str, list[str]]
    """Which parts are alive together at each moment."""
    notes: list[str] = field(default_factory=list)

    def moment_bytes(self) -> dict[str, int]:
        return {m: sum(self.parts[p] for p in names) for m, names in self.moments.items()}

    @property
    def peak_moment(self) -> str:
        sizes = self.moment_bytes()
        return max(sizes, key=lambda m: sizes[m])

    @property
    def peak_bytes(self) -> int:
        return max(self.moment_bytes().values())


def _bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def learner_plan(cfg: Any, arch: Architecture) -> RolePlan:
    """One learner rank's bytes (see the module docstring)."""
    from learner.ppo import LOGPROB_CHUNK_ELEMENTS
    from learner.ranks import deepspeed_config

    lc, on_gpu = cfg.learner, cfg.learner.num_gpus > 0
    g, stage, n = lc.num_ranks, lc.zero_stage, arch.params()
    bw = _bytes(cfg.model.dtype)
    b_act = 2 if lc.update_autocast == "bfloat16" else bw
    b_ref = _bytes(lc.ref_dtype or cfg.model.dtype)
    zero = deepspeed_config(1, g, stage, lc.lr, 0.0, 1.0, bw == 2)["zero_optimization"]
    shard = g if stage >= 1 else 1  # optimizer state (and the master weights) partitioned from ZeRO-1 on
    rows_rank = max(1, cfg.batch_size // g)
    rows_mb = max(1, min(lc.forward_batch_size, math.ceil(rows_rank / lc.num_minibatches)))
    rows_fwd = max(1, min(lc.forward_batch_size, rows_rank))
    t, r = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, cfg.rollout.max_new_tokens
    parts: dict[str, int] = {}
    parts["weights"] = n * bw // (g if stage == 3 else 1)
    if stage == 3:
        largest = max(arch.layer_params(), arch.vocab * arch.hidden)
        parts["weights gathered (ZeRO-3)"] = (largest + ZERO3_PREFETCH_ELEMENTS) * bw
    parts["gradients"] = n * bw // (g if stage >= 2 else 1)
    parts["reduce bucket (DeepSpeed)"] = zero["reduce_bucket_size"] * bw if stage >= 2 else 0
    parts["fp32 master weights"] = 4 * n // shard
    parts["AdamW moments"] = 8 * n // shard
    parts["fp32 gradient copy (step)"] = 4 * n // shard
    critic = lc.algorithm == "ppo" and lc.critic == "separate"
    if critic:  # its own backbone: weights, gradients, master weights and moments like the policy's (its
        # activations come in its own step, after the policy's are freed: no larger than the policy's)
        parts["separate critic"] = (parts["weights"] + parts["gradients"] + parts["reduce bucket (DeepSpeed)"]
                                    + parts["fp32 master weights"] + parts["AdamW moments"])
    parts["reference"] = n * b_ref if lc.kl_coef > 0 else 0  # kl_coef = 0 loads none
    autocast = lc.update_autocast == "bfloat16"
    per_token = arch.layer_activation_bytes(b_act, t, autocast)
    tokens = rows_mb * t
    if lc.gradient_checkpointing:  # each layer's input (its dtype: the residual stream's), one layer recomputed
        act = arch.layers * bw * arch.hidden * tokens + per_token * tokens
    else:
        act = arch.layers * per_token * tokens
    parts["activations"] = act + arch.head_activation_bytes(b_act, autocast) * tokens

    def chunk(rows: int) -> int:  # fp32: the upcast chunk, its softmax and its gradient (learner/ppo.py)
        return 3 * 4 * min(rows, max(1, LOGPROB_CHUNK_ELEMENTS // arch.vocab)) * arch.vocab

    # the logits (kept by the log-softmax for backward) and their gradient; lm_head's input at the response rows
    parts["logits (update)"] = 2 * rows_mb * r * arch.vocab * b_act + chunk(rows_mb * r) + \
        rows_mb * r * b_act * arch.hidden
    if autocast:  # bf16 casts of every projection's weight (not the norms'), kept for backward
        parts["autocast bf16 weight copies"] = 2 * (n - arch.layers * 2 * arch.hidden - arch.hidden)
    # the end of backward: the first layer's activations, and the embedding's dense [V, h] gradient (tied: summed
    # with the head's)
    parts["first layer (end of backward)"] = per_token * tokens
    parts["embedding gradient (end of backward)"] = (2 if arch.tied else 1) * arch.vocab * arch.hidden * bw
    # prepare: no activations kept; one layer's transient (MLP gate, up, product, and the [T, T] mask) and one
    # chunk's logits of the policy, then of the reference
    parts["scoring chunk (prepare)"] = rows_fwd * t * (3 * bw * arch.intermediate + bw * t) + \
        rows_fwd * r * arch.vocab * bw + chunk(rows_fwd * r)
    if on_gpu:
        parts["CUDA context, NCCL, fragmentation"] = RUNTIME_BYTES
    state = ["weights", "fp32 master weights", "AdamW moments"] + (["separate critic"] if critic else []) + \
        (["weights gathered (ZeRO-3)"] if stage == 3 else []) + (["CUDA context, NCCL, fragmentation"] if on_gpu else [])
    ref_update = [] if lc.ref_offload else ["reference"]
    casts = ["autocast bf16 weight copies"] if autocast else []
    # The gradient partition fills during backward; it is whole while the activations are when an optimizer step
    # accumulates several micro-batches (from the second on), else only at the end.
    accumulating = math.ceil(rows_rank / lc.num_minibatches) > lc.forward_batch_size
    bucket = ["reduce bucket (DeepSpeed)"]
    moments = {
        "prepare": state + ["reference", "scoring chunk (prepare)"],
        "backward": state + ref_update + bucket + (["gradients"] if accumulating else [])
        + ["activations", "logits (update)"] + casts,
        "end of backward": state + ref_update + bucket + ["gradients", "first layer (end of backward)",
                                                          "embedding gradient (end of backward)"],
        "optimizer step": state + ref_update + ["gradients", "fp32 gradient copy (step)"],
    }
    notes = []
    if lc.ref_offload:
        notes.append("reference in host memory outside prepare (learner.ref_offload)")
    return RolePlan("learner", g, "gpu" if on_gpu else "cpu", parts, moments, notes)


def rollout_plan(cfg: Any, arch: Architecture, device_bytes: int) -> RolePlan:
    """One vLLM engine's bytes: weights and KV cache (see the module docstring)."""
    rc = cfg.rollout
    bw = _bytes(cfg.model.dtype)
    on_gpu = rc.num_gpus > 0
    weights = arch.params() * bw
    per_seq = arch.kv_bytes_per_token(bw) * (cfg.data.max_prompt_tokens + rc.max_new_tokens)
    share = math.ceil(cfg.data.prompts_per_iteration / rc.num_engines) * rc.samples_per_prompt
    seqs = min(rc.max_num_seqs, share) if rc.max_num_seqs else share  # 0: sized to the engine's share
    notes = []
    if on_gpu:
        budget = int(rc.gpu_memory_utilization * device_bytes)
        kv = budget - weights - ENGINE_OVERHEAD_BYTES
        parts = {"weights": weights, "activations, CUDA graphs": ENGINE_OVERHEAD_BYTES,
                 "KV cache (what gpu_memory_utilization leaves)": max(kv, 0)}
        if kv < per_seq:
            parts["KV cache short of one sequence"] = per_seq - max(kv, 0)
        notes.append(f"vLLM takes rollout.gpu_memory_utilization={rc.gpu_memory_utilization:g} of the GPU: "
                     f"{budget / GIB:.1f} GiB")
    else:
        kv = int(rc.kv_cache_gib * GIB)
        parts = {"weights": weights, "KV cache (rollout.kv_cache_gib)": kv}
    held = max(kv, 0) // per_seq if per_seq else 0
    notes.append(f"KV cache holds {held} sequences of {cfg.data.max_prompt_tokens + rc.max_new_tokens} tokens "
                 f"({per_seq / 2**20:.0f} MiB each); the engine's share of a batch is {seqs} at once "
                 f"(rollout.max_num_seqs={rc.max_num_seqs or 'its share'})")
    return RolePlan("rollout", rc.num_engines, "gpu" if on_gpu else "cpu", parts, {"generate": list(parts)}, notes)


@dataclass
class ModelPlan:
    arch: Architecture
    source: str
    roles: list[RolePlan]
    device_bytes: int
    advice: list[str] = field(default_factory=list)

    def fits(self) -> bool:
        """Every GPU role within the device's memory (a CPU role's host memory is reported, not judged)."""
        return all(r.peak_bytes <= self.device_bytes for r in self.roles if r.device == "gpu")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.arch.name, "source": self.source, "params": self.arch.params(),
                "architecture": dataclasses.asdict(self.arch), "device_bytes": self.device_bytes,
                "fits": self.fits(), "advice": self.advice,
                "roles": [{"role": r.role, "count": r.count, "device": r.device, "parts_bytes": r.parts,
                           "moments_bytes": r.moment_bytes(), "peak_moment": r.peak_moment,
                           "peak_bytes": r.peak_bytes,
                           "fits": r.device == "cpu" or r.peak_bytes <= self.device_bytes,
                           "notes": r.notes} for r in self.roles]}


# Settings the plan tries, in order, when the learner does not fit: each is a dotted override and the reason.
LEARNER_REMEDIES = (
    ("learner.gradient_checkpointing", True, "recompute activations in backward (~30% more update time)"),
    ("learner.ref_offload", True, "keep the reference in host memory outside prepare"),
    ("learner.forward_batch_size", "halve", "fewer rows per micro-batch (activations and logits)"),
    ("learner.zero_stage", 3, "partition the weights too"),
)


def _override(cfg: Any, dotted: str, value: Any) -> Any:
    section, name = dotted.split(".")
    sub = getattr(cfg, section)
    if value == "halve":
        value = max(1, getattr(sub, name) // 2)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})


def learner_remedies(cfg: Any, arch: Architecture, device_bytes: int) -> tuple[list[str], bool]:
    """LEARNER_REMEDIES applied one after the other (each only while the rank does not fit, and kept only where it
    lowers the peak), then, if the rank still does not fit, more ZeRO-3 ranks or no reference: the settings, each
    with the peak it gives, and whether the last one fits."""
    trial, steps = cfg, []

    def peak(c: Any) -> int:
        return learner_plan(c, arch).peak_bytes

    def step(nxt: Any, dotted: str, why: str) -> None:
        section, name = dotted.split(".")
        steps.append(f"{dotted}={json.dumps(getattr(getattr(nxt, section), name)).strip(chr(34))} ({why}): "
                     f"{peak(nxt) / GIB:.1f} GiB")

    for dotted, value, why in LEARNER_REMEDIES:
        start = trial
        while peak(trial) > device_bytes:  # "halve" repeats: one step, its last value
            nxt = _override(trial, dotted, value)
            if nxt == trial or peak(nxt) >= peak(trial):  # already set, at one row, or no help
                break
            trial = nxt
            if value != "halve":
                break
        if trial is not start:
            step(trial, dotted, why)
    if peak(trial) > device_bytes:  # partition over more GPUs; the reference stays whole on every rank
        for g in (2, 4, 8, 16, 32, 64):
            if g <= trial.learner.num_ranks:
                continue
            nxt = _override(_override(trial, "learner.zero_stage", 3), "learner.num_ranks", g)
            if peak(nxt) <= device_bytes:
                trial = nxt
                step(trial, "learner.num_ranks", f"ZeRO-3 over {g} GPUs")
                break
    if peak(trial) > device_bytes and trial.learner.kl_coef > 0:
        nxt = _override(trial, "learner.kl_coef", 0.0)
        if peak(nxt) < peak(trial):
            trial = nxt
            step(trial, "learner.kl_coef",
                 f"no reference model: its {arch.params() * _bytes(cfg.model.dtype) / GIB:.0f} GiB are whole on "
                 "every rank")
    return steps, peak(trial) <= device_bytes


def plan_model(cfg: Any, arch: Architecture, device_bytes: int, source: str = "") -> ModelPlan:
    """Every role's plan for ``arch`` under ``cfg``; for a GPU role that does not fit, the settings to change."""
    plan = ModelPlan(arch, source, [learner_plan(cfg, arch), rollout_plan(cfg, arch, device_bytes)], device_bytes)
    learner, rollout = plan.roles
    if learner.device == "gpu" and learner.peak_bytes > device_bytes:
        steps, fits = learner_remedies(cfg, arch, device_bytes)
        plan.advice.append(f"learner: {learner.peak_bytes / GIB:.1f} GiB > {device_bytes / GIB:.0f} GiB; set "
                           + "; then ".join(steps)
                           + ("" if fits else "; still too big: GPUs with more memory"))
    if any(k.startswith("KV cache short") for k in rollout.parts):
        plan.advice.append(
            f"rollout: the weights ({rollout.parts['weights'] / GIB:.1f} GiB) leave no room for one sequence's KV "
            f"cache in rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization:g}; raise it (at most "
            "0.95 on a GPU of its own) or shorten data.max_prompt_tokens / rollout.max_new_tokens")
    return plan


def memory_plans(cfg: Any, device_bytes: int, models: list[str] | None = None) -> tuple[list[ModelPlan], list[str]]:
    """Plans for ``models`` (table names or HF folders), by default the config's model and TABLE; and notes."""
    notes: list[str] = []
    plans = []
    if not models:
        arch, source = config_architecture(cfg)
        if arch is None:
            notes.append(f"{source}; plan it with --model NAME|FOLDER")
        else:
            plans.append(plan_model(cfg, arch, device_bytes, f"the config's model ({source})"))
        models = list(TABLE)
        table = True
    else:
        table = False
    for spec in models:
        arch = resolve_architecture(spec)
        plans.append(plan_model(cfg, arch, device_bytes, "table" if table else spec))
    return plans, notes


def format_memory_plan(plans: list[ModelPlan], notes: list[str]) -> str:
    lines = []
    for p in plans:
        a = p.arch
        lines.append(f"{a.name}: {a.params() / 1e9:.2f} B params (hidden {a.hidden}, {a.layers} layers, "
                     f"{a.heads}/{a.kv_heads} heads x {a.head_dim}, intermediate {a.intermediate}, vocab {a.vocab}"
                     f"{', tied' if a.tied else ''}) [{p.source}]")
        for r in p.roles:
            where = "per GPU" if r.device == "gpu" else "host memory per process"
            lines.append(f"  {r.role} x{r.count} ({where}), GiB:")
            for name, size in r.parts.items():
                lines.append(f"    {name:<46} {size / GIB:9.2f}")
            for moment, size in r.moment_bytes().items():
                mark = "  <- peak" if moment == r.peak_moment else ""
                lines.append(f"    = {moment:<44} {size / GIB:9.2f}{mark}")
            for note in r.notes:
                lines.append(f"    ({note})")
            if r.device == "cpu":
                lines.append(f"    peak {r.peak_bytes / GIB:.1f} GiB of host memory (not judged)")
            else:
                verdict = "fits" if r.peak_bytes <= p.device_bytes else "DOES NOT FIT"
                lines.append(f"    {verdict}: {r.peak_bytes / GIB:.1f} of {p.device_bytes / GIB:.0f} GiB")
        for advice in p.advice:
            lines.append(f"  change: {advice}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)
