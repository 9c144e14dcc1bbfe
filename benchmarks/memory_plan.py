"""Memory plan vs measurement: the peak tensor memory of one learner rank, measured, beside what
oirl/memory_plan.py plans for the same config.

A rank is built in-process (world size 1, gloo; the class the Ray actor runs) and trained for two iterations on a
batch of the config's worst-case shape (every prompt data.max_prompt_tokens long, every response
rollout.max_new_tokens). Each phase (setup, prepare, update, twice) runs under torch's profiler with profile_memory:
every allocation and free of the CPU allocator is an event, so the tensors alive when the phase starts (every
tensor the interpreter reaches) plus the highest running sum of the events is the phase's peak of live tensor bytes,
the CPU counterpart of torch.cuda.max_memory_allocated (no libraries, interpreter or allocator caches, which RSS
would add). Beside it, the plan's moments (prepare, backward, optimizer step).

Variants (``VARIANTS``): the tiny model with a long sequence (activations and logits comparable to the state) and
SmolLM2-135M at the default job's shape per rank (16 rows of 200 + 128 tokens, forward_batch_size 4,
4 mini-batches) in fp32, with gradient checkpointing, and as the default job runs it (bf16 autocast update).
Writes benchmarks/results/memory_plan.json (after every variant, merged by name); tests/oirl/test_memory_plan.py measures the tiny variants
itself and checks the committed 135M numbers.

    python -m benchmarks.memory_plan [--variants tiny smollm2-fp32 ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10
"""The plan's peak must lie within this fraction of the measured peaks (the steady state's, the second
iteration's, and the whole run's), or the plan plus one reduce bucket must (tests/oirl/test_memory_plan.py): an
update sometimes allocates DeepSpeed's next reduce bucket while gradient views still hold the last (seen here in about
one update in six, in either iteration, for the tiny model, smaller than one bucket, in fp32: +190 MiB)."""

TINY_SHAPE = ["model.path=tiny", "model.tiny_hidden_size=128", "data.prompts_per_iteration=4",
              "rollout.samples_per_prompt=2", "data.max_prompt_tokens=896", "rollout.max_new_tokens=128",
              "learner.num_minibatches=2", "learner.forward_batch_size=4"]
SMOLLM2_SHAPE = ["model.path=smollm2-135m", "data.prompts_per_iteration=4", "rollout.samples_per_prompt=4",
                 "data.max_prompt_tokens=200", "rollout.max_new_tokens=128", "learner.num_minibatches=4",
                 "learner.forward_batch_size=4"]
COMMON = ["learner.num_ranks=1", "learner.zero_stage=2", "model.dtype=float32", "learner.update_autocast=",
          "learner.ref_dtype=", "learner.kl_coef=0.02", "learner.algorithm=ppo", "learner.old_logprobs=forward"]
VARIANTS: dict[str, list[str]] = {
    "tiny": COMMON + TINY_SHAPE,
    "tiny-grad-ckpt": COMMON + TINY_SHAPE + ["learner.gradient_checkpointing=true"],
    "tiny-bf16": COMMON + TINY_SHAPE + ["model.dtype=bfloat16", "sync.on_policy_tolerance=0.1",
                                        "sync.canary_tolerance=0.05"],
    "smollm2-fp32": COMMON + SMOLLM2_SHAPE,
    "smollm2-grad-ckpt": COMMON + SMOLLM2_SHAPE + ["learner.gradient_checkpointing=true"],
    "smollm2-default": COMMON + SMOLLM2_SHAPE + ["learner.update_autocast=bfloat16"],
}


def variant_config(name: str) -> Any:
    from oirl.config import load_config

    return load_config(REPO / "configs" / "smoke.yaml", VARIANTS[name], check_paths=False)


def worst_case_batch(cfg: Any, vocab: int) -> Any:
    """A RolloutBatch of cfg.batch_size rows, every prompt and response at its budget, with rewards; the last
    prompt is one token shorter, so that the batch has padding as real ones do (transformers skips the attention
    mask of a batch without any, and keeps less for backward)."""
    import numpy as np

    from oirl.batch import add_column, make_rollout_batch

    rng = np.random.default_rng(0)
    n, p, r = cfg.batch_size, cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    prompts = [rng.integers(3, vocab, p - (i == n - 1)).tolist() for i in range(n)]
    responses = [rng.integers(3, vocab, r).tolist() for _ in range(n)]
    groups = [i // cfg.rollout.samples_per_prompt for i in range(n)]
    batch = make_rollout_batch(groups, [i % cfg.rollout.samples_per_prompt for i in range(n)], prompts, responses,
                               [[-1.0] * r for _ in range(n)], ["length"] * n, 0)
    return add_column(batch, "reward", rng.normal(size=n).astype(np.float32))


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor the interpreter can reach (at a phase boundary nothing else holds
    any: no autograd graph is alive)."""
    import gc

    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def phase_peak(call: Any) -> tuple[int, int, float]:
    """Run ``call`` under the profiler: (live tensor bytes before, peak bytes during, seconds). The peak is the
    bytes before plus the highest running sum of the allocator's events during the call."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # garbage of the last phase (a DeepSpeed bucket in a reference cycle) is not live: free it now
    before = live_tensor_bytes()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    seconds = time.perf_counter() - t0
    live = high = 0
    for e in prof.profiler.kineto_results.events():  # recorded in order, one thread
        if e.name() == "[memory]":
            live += e.nbytes()
            high = max(high, live)
    return before, before + high, seconds


def measure_rank(cfg: Any, iterations: int = 2) -> dict[str, Any]:
    """Peak live tensor bytes of one in-process learner rank per phase (setup, prepare<i>, update<i>)."""
    import torch

    from learner.learner_worker import LearnerWorker
    from oirl.models import resolve_model

    path = str(resolve_model(cfg.model))
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    batch = worst_case_batch(cfg, vocab)
    lc = cfg.learner
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    micro = max(1, min(lc.forward_batch_size, cfg.batch_size // lc.num_minibatches))
    rank = LearnerWorker(lc, 0, path, cfg.model.dtype, cfg.seed, cfg.rollout.temperature, f"memplan{os.getpid()}")
    phases = [("setup", lambda: rank.setup("127.0.0.1", port, micro))]
    for it in range(iterations):
        phases += [(f"prepare{it}", lambda it=it: rank.prepare(batch, it, 1e9)), (f"update{it}", rank.update)]
    out: dict[str, Any] = {"before_bytes": {}, "peak_bytes": {}, "seconds": {}, "model_path": path}
    for name, call in phases:
        out["before_bytes"][name], out["peak_bytes"][name], out["seconds"][name] = phase_peak(call)
    torch.distributed.destroy_process_group()
    return out


def planned(cfg: Any) -> dict[str, Any]:
    """The plan's learner rank for this config's own model (its folder's config.json)."""
    from oirl.memory_plan import GIB, config_architecture, learner_plan

    arch, _ = config_architecture(cfg)
    assert arch is not None, f"{cfg.model.path}: no config.json (build the model first)"
    plan = learner_plan(cfg, arch)
    return {"parts_bytes": plan.parts, "moments_bytes": plan.moment_bytes(), "peak_bytes": plan.peak_bytes,
            "peak_moment": plan.peak_moment, "peak_gib": plan.peak_bytes / GIB}


def compare(name: str, measured: dict[str, Any]) -> dict[str, Any]:
    """The plan for the variant beside what was measured: the whole run's peak and the steady state's (the
    second iteration: prepare1, update1)."""
    plan = planned(variant_config(name))
    peaks = measured["peak_bytes"]
    steady = max(peaks["prepare1"], peaks["update1"])
    return {"variant": name, "overrides": VARIANTS[name], "measured": measured, "plan": plan,
            "measured_peak_bytes": max(peaks.values()), "measured_steady_peak_bytes": steady,
            "plan_over_steady": plan["peak_bytes"] / steady}


def run_variant(name: str) -> dict[str, Any]:
    return compare(name, measure_rank(variant_config(name)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_plan.json"))
    ap.add_argument("--replan", action="store_true",
                    help="recompute the plan beside the measurements already in --out (measures nothing)")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # one variant per process: a rank's process group and allocator start clean
        Path(args.worker[1]).write_text(json.dumps(run_variant(args.worker[0])))
        return 0
    out_file = Path(args.out)
    previous = json.loads(out_file.read_text())["results"] if out_file.is_file() else []
    results = {r["variant"]: r for r in previous if r["variant"] in VARIANTS}
    if args.replan:
        results = {name: compare(name, r["measured"]) for name, r in results.items()}
    failed = []
    for name in [] if args.replan else args.variants:
        out = out_file.with_suffix(f".{name}.tmp")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--worker", name, str(out)],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-4000:]}", flush=True)
            failed.append(name)
            continue
        results[name] = json.loads(out.read_text())
        out.unlink()
        write(out_file, results)  # after every variant: a later failure keeps what was measured
    write(out_file, results)
    for r in results.values():
        print(f"{r['variant']:20s} measured {r['measured_steady_peak_bytes'] / 2**20:8.0f} MiB (whole run "
              f"{r['measured_peak_bytes'] / 2**20:6.0f})  plan {r['plan']['peak_bytes'] / 2**20:8.0f} MiB "
              f"({r['plan']['peak_moment']})  plan/measured {r['plan_over_steady']:.3f}", flush=True)
    print(f"wrote {args.out}")
    return 1 if failed else 0


def write(out_file: Path, results: dict[str, Any]) -> None:
    out_file.write_text(json.dumps({
        "what": "peak bytes of live CPU tensors of one learner rank (torch profiler allocator events), and the "
                "memory plan's peak for the same config (oirl/memory_plan.py)",
        "tolerance": TOLERANCE, "machine": f"{os.cpu_count()} CPUs",
        "results": [results[v] for v in VARIANTS if v in results]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
