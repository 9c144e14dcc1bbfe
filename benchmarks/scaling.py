"""Scaling: iteration time and rollout throughput against engines x learner ranks, measured on this machine, and a
cost model's projection to 7B and 70B models on 8-64 GPUs, checked against published refit figures.

    deploy/loopback.sh python -m benchmarks.scaling --out DIR [--quick] [--iterations 3] [--grid 1x1,2x2]
                                                    [--keep-measured] [overrides]

Measured. For each (engines, ranks) of the grid, the real `oirl train` on the default job (configs/demo.yaml,
SmolLM2-135M; `--quick`: configs/smoke.yaml, the tiny model) with rollout.ignore_eos=true (every sample runs to
max_new_tokens, so all grid points do the same work) and no checkpoints but the final one. Each point runs
`--iterations` iterations in a fresh Ray cluster; the medians over the iterations after the first are reported:
`iteration_seconds` (timing_s/iteration), `tokens_per_s` (generated tokens / seconds of the generate phase, i.e.
rollout throughput), the per-phase seconds and samples/s. The embedded cluster advertises max(the placement plan's
CPUs, the machine's cores) logical CPUs, so every point is placed as configured (2 engines + 2 ranks with one CPU
each ask 4 logical CPUs of a 2-core machine: they share the cores). With more than one engine,
rollout.cpu_threads_bind=nobind: vLLM's 'auto' binding gives every engine (each the local rank 0 of its own world)
the same core, 'nobind' lets the OS spread them (MULTI_ENGINE_OVERRIDES; extra overrides on the command line apply
to every point and win).

Projected. benchmarks/cost_model.py (pure functions; every assumption in the JSON) for 7B and 70B on 8, 16, 32 and
64 H100s, on the GPU recipe's workload (configs/gpu.yaml: 64 prompts x 8 samples, 512 prompt + 512 response tokens,
PPO, 1 epoch, 4 mini-batches, KL to a reference), each on the split of GPUs between engines and learner that
minimises its iteration. Calibrated from this machine where the quantity transfers: the sync's overhead over its
floor and its fixed latency (benchmarks/results/sync.json, collective transport); the learner's MFU from
benchmarks/results/gpu_check_*.json when a GPU run exists (else assumed, and the JSON says so). What does not
transfer is not used: CPU matmul efficiency, CPU decode speed, the gloo all-reduce.

Peer checks. The same sync function evaluated at the setting of each published refit figure:
{source, figure (seconds, the range's middle), our_projection, ratio = ours / theirs}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import cost_model as cm
from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GRID = ((1, 1), (1, 2), (2, 1), (2, 2))
QUICK_GRID = ((1, 1), (2, 2))
MULTI_ENGINE_OVERRIDES = ["rollout.cpu_threads_bind=nobind", "rollout.cpu_threads=1"]  # two engines share 2 cores
PROJECTED_GPUS = (8, 16, 32, 64)
H800 = replace(cm.Gpu(), name="NVIDIA H800 SXM 80GB", nvlink_bytes_per_s=200e9)  # NVLink 400 GB/s both directions

# Published weight-refit times (trainer -> inference engines). learner/total: the GPUs of the trainer and of the whole
# setting; gather: the trainer's weights are sharded (FSDP/ZeRO-3/Megatron) and must be gathered first.
PEERS: list[dict[str, Any]] = [
    {"source": "NeMo-RL nccl_reshard refit, as quoted in issue 10 "
               "(https://docs.nvidia.com/nemo/rl/latest/design-docs/nccl-reshard-refit.html)",
     "setting": "4B dense, H100, non-colocated (taken as 8 train + 8 generation GPUs)",
     "params": 4e9, "seconds": (0.21, 0.34), "learner": 8, "total": 16, "gather": True, "gpu": "H100"},
    {"source": "NeMo-RL nccl_reshard refit, as quoted in issue 10",
     "setting": "30B, H100, non-colocated (taken as 16 train + 16 generation GPUs)",
     "params": 30e9, "seconds": (0.74, 1.0), "learner": 16, "total": 32, "gather": True, "gpu": "H100"},
    {"source": "NeMo-RL PR #2413, NCCL xfer refit test table (https://github.com/NVIDIA-NeMo/RL/pull/2413)",
     "setting": "4B, Megatron DP8 -> vLLM DP8", "params": 4e9, "seconds": (0.07, 0.08), "learner": 8,
     "total": 16, "gather": False, "gpu": "H100"},
    {"source": "NeMo-RL PR #2413, NCCL xfer refit test table",
     "setting": "30B MoE, Megatron EP4xTP2xDP2 -> vLLM TP4xDP4", "params": 30e9, "seconds": (0.54, 0.67),
     "learner": 16, "total": 32, "gather": True, "gpu": "H100"},
    {"source": "veRL checkpoint engine benchmark, NCCL backend "
               "(https://github.com/volcengine/verl/blob/main/verl/checkpoint_engine/README.md)",
     "setting": "Qwen3-30B-A3B, 4x8 H100, ConnectX-7 400 Gb/s InfiniBand, FSDP trainer world 2, 30 rollouts",
     "params": 30.5e9, "seconds": (7.0, 7.0), "learner": 2, "total": 32, "gather": True, "gpu": "H100"},
    {"source": "veRL PR #7263, stock nccl checkpoint engine (https://github.com/verl-project/verl/pull/7263)",
     "setting": "27B bf16, 8-GPU FSDP2 trainer -> 8-GPU vLLM (TP4), 2 nodes, AWS EFA; 3.01 +- 0.25 s over 20 refits",
     "params": 27e9, "seconds": (3.01, 3.01), "learner": 8, "total": 16, "gather": True, "gpu": "H100"},
    {"source": "MoonshotAI checkpoint-engine README, broadcast (https://github.com/MoonshotAI/checkpoint-engine)",
     "setting": "Qwen3-235B-A22B bf16, 8xH800 TP8, one node, weights broadcast from the trainer's shards",
     "params": 235e9, "seconds": (6.22, 6.22), "learner": 8, "total": 8, "gather": False, "gpu": "H800"},
    {"source": "veRL checkpoint engine, as quoted in issue 10 (setting not verified here; a colocated CUDA IPC "
               "update would explain it)",
     "setting": "7B", "params": 7e9, "seconds": (0.02, 0.02), "learner": 8, "total": 8, "gather": False,
     "gpu": "H100"},
]
KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


# ---- measured ----------------------------------------------------------------------------------------------------


def run_point(config: Path, engines: int, ranks: int, iterations: int, extra: list[str],
              timeout_s: float) -> dict[str, Any]:
    """One grid point: `oirl train` in its own Ray cluster; medians over the iterations after the first."""
    overrides = [f"iterations={iterations}", "checkpoint_every=0", "rollout.ignore_eos=true",
                 f"rollout.num_engines={engines}", f"learner.num_ranks={ranks}",
                 *(MULTI_ENGINE_OVERRIDES if engines > 1 else []), *extra]
    from oirl.config import load_config
    from oirl.plan import placement_plan

    cfg = load_config(str(config), overrides)
    logical_cpus = sum(p.count * p.num_cpus for p in placement_plan(cfg))
    run_dir = Path(tempfile.mkdtemp(prefix="oirl-bench-scaling-"))
    t0 = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(config), "--out", str(run_dir),
               "--no-progress", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
        rows = read_metrics(run_dir / "metrics.jsonl")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    warm = rows[1:] or rows
    phases = sorted({k.split("/", 1)[1] for r in warm for k in r if k.startswith("timing_s/")})
    tokens = [r["rollout/response_tokens_mean"] * r["rollout/samples"] for r in warm]
    return {
        "engines": engines, "ranks": ranks,
        "iteration_seconds": statistics.median(r["timing_s/iteration"] for r in warm),
        "tokens_per_s": statistics.median(r["perf/gen_tokens_per_s"] for r in warm),
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in warm),
        "iteration_tokens_per_s": statistics.median(t / r["timing_s/iteration"] for t, r in zip(tokens, warm)),
        "phase_seconds": {p: statistics.median(r[f"timing_s/{p}"] for r in warm) for p in phases},
        "generated_tokens_per_iteration": statistics.median(tokens),
        "iterations": len(rows), "iterations_used": len(warm),
        "iteration_seconds_all": [r["timing_s/iteration"] for r in rows],
        "logical_cpus_asked": logical_cpus, "overrides": overrides,
        "wall_seconds": time.perf_counter() - t0,
    }


# ---- calibration and projection ----------------------------------------------------------------------------------


def calibrate(results: Path) -> tuple[cm.Efficiency, dict[str, Any]]:
    """The assumed efficiencies with what this machine's (and a GPU check's) results can set."""
    eff, notes = cm.Efficiency(), {}
    sync_path = results / "sync.json"
    entries = [s for s in json.loads(sync_path.read_text())["sizes"] if s["transport"] == "collective"] \
        if sync_path.is_file() else []
    if entries:
        big, small = max(entries, key=lambda s: s["params"]), min(entries, key=lambda s: s["params"])
        eff = replace(eff, sync_overhead=big["seconds"] / big["floor_seconds"], sync_latency_s=small["seconds"])
        notes["sync_overhead"] = (f"sync.json, collective transport at {big['params'] / 1e6:.0f}M parameters: "
                                  f"{big['seconds']:.2f} s over a floor (memcpy + in-place reload) of "
                                  f"{big['floor_seconds']:.2f} s; the ratio is taken to hold on GPUs")
        notes["sync_latency_s"] = (f"sync.json, collective transport at {small['params'] / 1e3:.0f}k parameters: "
                                   "a sync of almost no bytes (RPCs, version and fingerprint checks)")
    else:
        notes["sync_overhead"] = "absent: benchmarks/results/sync.json not found; 1.0 assumed"
    checks = []
    for path in sorted(glob.glob(str(results / "gpu_check_*.json"))):
        for m in json.loads(Path(path).read_text()).get("models", []):
            peak = next((v for k, v in KNOWN_PEAKS.items() if k in str(m.get("device_name", ""))), None)
            if peak and m.get("approx_tflops") and not m.get("error"):
                checks.append((m.get("params", 0), m["approx_tflops"] * 1e12 / peak, path, m))
    if checks:
        params, mfu, path, m = max(checks, key=lambda c: c[0])
        eff = replace(eff, learner_mfu=mfu)
        notes["learner_mfu"] = (f"{Path(path).name}: {m['approx_tflops']:.0f} TFLOP/s on {m['device_name']} "
                                f"({params / 1e9:.2f}B parameters, one rank) = MFU {mfu:.3f}")
    else:
        notes["learner_mfu"] = (f"absent: no benchmarks/results/gpu_check_*.json with a GPU run; {eff.learner_mfu} "
                                "assumed (the CPU learner's MFU measured here does not transfer to GPUs)")
    notes["not_calibrated"] = ("prefill_mfu, decode_hbm_efficiency, collective_efficiency, zero_overlap, "
                               "host_adam_params_per_s and memory_headroom are assumed: the CPU runs here measure "
                               "none of them in a way that transfers (CPU matmul efficiency, CPU decode speed and "
                               "the gloo all-reduce are different machines' properties)")
    return eff, notes


def gpu_workload() -> cm.Workload:
    """The GPU recipe's batch as the cost model's workload (every sample runs to max_new_tokens)."""
    from oirl.config import load_config
    from oirl.plan import engine_config

    cfg = load_config(str(REPO / "configs" / "gpu.yaml"), check_paths=False)
    lr = cfg.learner
    return cm.Workload(samples=cfg.batch_size, prompt_tokens=cfg.data.max_prompt_tokens,
                       response_tokens=cfg.rollout.max_new_tokens, epochs=lr.ppo_epochs,
                       num_minibatches=lr.num_minibatches, policy_forward=True, reference=lr.kl_coef > 0,
                       max_num_seqs=engine_config(cfg).max_num_seqs)  # as the engines are built


def missing_features(layout: dict[str, Any], reference: bool) -> list[str]:
    """What oirl lacks today to run a projected layout (the projection assumes it is there)."""
    missing = []
    if layout["tp"] > 1:
        missing.append("tensor-parallel engines: RolloutConfig has no tensor_parallel_size and the collective "
                       "transport assumes one worker per engine")
    if layout["zero_stage"] == 3 and reference:
        missing.append("a reference model sharded like the policy: the learner loads a full reference on every rank")
    if layout["offload"]:
        missing.append("ZeRO optimizer offload: no learner setting turns it on")
    return missing


def projected(eff: cm.Efficiency, notes: dict[str, Any], w: cm.Workload) -> list[dict[str, Any]]:
    gpu = cm.Gpu()
    out = []
    for model in (cm.MODEL_7B, cm.MODEL_70B):
        for gpus in PROJECTED_GPUS:
            r = cm.best_layout(model, gpu, eff, w, gpus)
            out.append({"model_params": model.params, "gpus": gpus, "fits": r["fits"],
                        "iteration_seconds": r["iteration_seconds"], "sync_seconds": r["sync_seconds"],
                        "oirl_lacks": missing_features(r["layout"], w.reference) if r["fits"] else [],
                        **{k: r[k] for k in ("generate_seconds", "learner_seconds", "learner_breakdown",
                                             "sync_breakdown", "layout", "why") if k in r},
                        "assumptions": {"gpu": asdict(gpu), "model": asdict(model), "workload": asdict(w),
                                        "efficiency": asdict(eff), "calibration": notes,
                                        "model_rules": "benchmarks/cost_model.py (top-level assumptions.model_rules)"}})
    return out


def peer_checks(eff: cm.Efficiency) -> list[dict[str, Any]]:
    out = []
    for p in PEERS:
        gpu = H800 if p["gpu"] == "H800" else cm.Gpu()
        sync = cm.sync_seconds(p["params"] * 2, gpu, eff, p["learner"], p["total"], p["gather"])
        figure = sum(p["seconds"]) / 2
        lo, hi = p["seconds"]
        out.append({"source": p["source"], "setting": p["setting"], "params": p["params"],
                    "figure": figure, "figure_text": f"{lo:g} s" if lo == hi else f"{lo:g}-{hi:g} s",
                    "our_projection": sync["seconds"], "our_raw_transfer": sync["raw"],
                    "ratio": sync["seconds"] / figure,
                    "our_setting": {"gpu": gpu.name, "learner_gpus": p["learner"], "total_gpus": p["total"],
                                    "gather": p["gather"]}})
    return out


# ---- main --------------------------------------------------------------------------------------------------------


def parse_grid(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() == "none":  # no point: recompute the projection (with --keep-measured: keep the points)
        return []
    try:
        return [(int(e), int(r)) for e, r in (item.lower().split("x") for item in text.split(","))]
    except ValueError as e:
        raise SystemExit(f"--grid {text!r}: expected ENGINESxRANKS items separated by commas, e.g. 1x1,2x2") from e


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matrix-multiply throughput of this process (all its threads): context for the CPU numbers."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml (the tiny model), 1x1 and 2x2")
    parser.add_argument("--iterations", type=int, default=None, help="per grid point (default 3; --quick 2)")
    parser.add_argument("--grid", help="ENGINESxRANKS,... (default 1x1,1x2,2x1,2x2; --quick 1x1,2x2); 'none': only "
                                       "the projection (with --keep-measured, the measured points are kept)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="longest wait for one grid point, seconds")
    parser.add_argument("--keep-measured", action="store_true",
                        help="keep the points of an existing DIR/scaling.json that --grid does not rerun (run the "
                             "grid one point at a time, e.g. each under its own lock)")
    args, extra = parser.parse_known_args()
    config = REPO / "configs" / ("smoke.yaml" if args.quick else "demo.yaml")
    grid = parse_grid(args.grid) if args.grid else list(QUICK_GRID if args.quick else GRID)
    iterations = args.iterations or (2 if args.quick else 3)
    if iterations < 2:
        raise SystemExit("--iterations must be >= 2: the first iteration is warm-up and is not reported")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scaling.json"
    kept = []
    if args.keep_measured and path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("config") != str(config.relative_to(REPO)):
            raise SystemExit(f"--keep-measured: {path} holds points of {previous.get('config')}, not of "
                             f"{config.relative_to(REPO)}; use another --out")
        kept = [m for m in previous["measured"] if (m["engines"], m["ranks"]) not in grid]
    t0 = time.perf_counter()
    eff, notes = calibrate(RESULTS)
    result = {
        "measured": kept,
        "projected": projected(eff, notes, gpu_workload()),
        "peer_checks": peer_checks(eff),
        "calibration": notes,
        "assumptions": {"gpu": asdict(cm.Gpu()), "efficiency": asdict(eff), "workload": asdict(gpu_workload()),
                        "model_rules": cm.__doc__.strip()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "fp32_matmul_gflops": matmul_gflops()},
        "config": str(config.relative_to(REPO)), "extra_overrides": extra, "quick": args.quick,
        "multi_engine_overrides": MULTI_ENGINE_OVERRIDES,
    }
    for point in [None, *grid]:  # written first and after every point: a run cut short keeps what it measured
        if point is not None:
            result["measured"].append(run_point(config, *point, iterations, extra, args.timeout))
        result["measured"].sort(key=lambda m: (m["engines"], m["ranks"]))
        result["seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(result, indent=2) + "\n")
    measured = result["measured"]
    for m in measured:
        print(f"{m['engines']} engine(s) x {m['ranks']} rank(s): {m['iteration_seconds']:6.1f} s/iteration, "
              f"{m['tokens_per_s']:6.1f} generated tokens/s")
    for p in result["projected"]:
        it = f"{p['iteration_seconds']:7.1f} s" if p["fits"] else "does not fit"
        sync = f"sync {p['sync_seconds']:.2f} s" if p["fits"] else p["why"]
        print(f"{p['model_params'] / 1e9:4.0f}B on {p['gpus']:2d} GPUs: {it}  {sync}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
