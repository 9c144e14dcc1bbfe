"""Does the mixed-precision update learn like the fp32 one? The default job (configs/demo.yaml) for N iterations,
each precision setting x each seed, one run after the other, and the reward and KL curves side by side.

    deploy/loopback.sh python -m benchmarks.precision_curve [--iterations 10] [--seeds 0 1] [--out /tmp/oirl-curve]

Writes benchmarks/results/precision_curve.json (+ .png). The comparison it reports:
- iteration 1 of a seed is the same rollout in every setting (same initial weights, same sampling seed), so its
  rewards must match exactly: this is what makes the later iterations a paired comparison;
- the mean reward of iterations 2..N per run, the difference between settings under the same seed, and the
  difference between seeds under the same setting (the run-to-run noise the first must be compared with);
- a Welch t statistic over the per-iteration reward means (iterations 2..N, all seeds) of each setting;
- KL to the reference per iteration (mixed precision that drifted would show here first) and seconds per iteration.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e import PRECISION
from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SETTINGS: dict[str, list[str]] = {"fp32": PRECISION["fp32"], "mixed": PRECISION["mixed_precision"]}


def run(name: str, seed: int, iterations: int, extra: list[str], out: Path) -> dict[str, Any]:
    run_dir = out / f"{name}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [f"seed={seed}", f"iterations={iterations}", *SETTINGS[name], *extra]
    cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--out", str(run_dir), "--no-progress", *overrides]
    print(f"[precision_curve] {name} seed {seed}: {' '.join(overrides)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed with exit code {proc.returncode}; its log is in {run_dir}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {
        "setting": name, "seed": seed, "overrides": overrides, "run_dir": str(run_dir), "wall_seconds": wall,
        "reward_mean_per_iteration": [r["reward/mean"] for r in rows],
        "reward_std_per_iteration": [r["reward/std"] for r in rows],
        "kl_mean_per_iteration": [r["kl/mean"] for r in rows],
        "response_tokens_mean_per_iteration": [r["rollout/response_tokens_mean"] for r in rows],
        "on_policy_max_abs_diff_per_iteration": [r.get("rollout/engine_learner_logprob_max_abs_diff") for r in rows],
        "iteration_seconds_per_iteration": [r["timing_s/iteration"] for r in rows],
        "phase_seconds_mean_after_first": {
            k.split("/", 1)[1]: statistics.fmean(r[k] for r in rows[1:])
            for k in rows[0] if k.startswith("timing_s/")} if len(rows) > 1 else {},
    }


def welch_t(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb) if va + vb > 0 else 0.0


def compare(runs: list[dict[str, Any]], names: list[str], seeds: list[int]) -> dict[str, Any]:
    by = {(r["setting"], r["seed"]): r for r in runs}
    late = {k: statistics.fmean(r["reward_mean_per_iteration"][1:]) for k, r in by.items()}
    out: dict[str, Any] = {
        "first_iteration_rewards_equal": {
            str(s): len({by[(n, s)]["reward_mean_per_iteration"][0] for n in names}) == 1 for s in seeds},
        "reward_mean_after_first": {f"{n}-s{s}": late[(n, s)] for n in names for s in seeds},
        "setting_difference_same_seed": {str(s): late[(names[1], s)] - late[(names[0], s)] for s in seeds},
        "kl_mean_last": {f"{n}-s{s}": by[(n, s)]["kl_mean_per_iteration"][-1] for n in names for s in seeds},
        "iteration_seconds_median_after_first": {
            n: statistics.median(x for s in seeds for x in by[(n, s)]["iteration_seconds_per_iteration"][1:])
            for n in names},
    }
    if len(seeds) > 1:
        out["seed_difference_same_setting"] = {n: late[(n, seeds[1])] - late[(n, seeds[0])] for n in names}
    pooled = {n: [x for s in seeds for x in by[(n, s)]["reward_mean_per_iteration"][1:]] for n in names}
    if all(len(v) > 1 for v in pooled.values()):
        out["welch_t_iteration_means"] = welch_t(pooled[names[1]], pooled[names[0]])
        out["welch_t_note"] = (f"{names[1]} minus {names[0]} over the per-iteration reward means of iterations 2..N, "
                               "all seeds; |t| < 2 is no detectable difference at this sample size (the iterations "
                               "of a run are not independent, so this overstates the evidence either way)")
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"fp32": "tab:blue", "mixed": "tab:orange"}
    for r in result["runs"]:
        style = "-" if r["seed"] == result["seeds"][0] else "--"
        its = range(1, len(r["reward_mean_per_iteration"]) + 1)
        label = f"{r['setting']} seed {r['seed']}"
        axes[0].plot(its, r["reward_mean_per_iteration"], style, color=colors.get(r["setting"]), label=label)
        axes[1].plot(its, r["kl_mean_per_iteration"], style, color=colors.get(r["setting"]), label=label)
    axes[0].set(xlabel="iteration", ylabel="reward mean (32 samples)", title="reward")
    axes[1].set(xlabel="iteration", ylabel="KL to reference (sum per sample)", title="KL")
    axes[0].legend(fontsize=8)
    fig.suptitle("default job: fp32 update vs mixed-precision update (bf16 autocast, fp32 master) + bf16 reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="/tmp/oirl-curve", help="run directories (large: not in git)")
    parser.add_argument("--results", default=str(RESULTS))
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for name in args.settings:
            runs.append(run(name, seed, args.iterations, extra, out))
            # after every run, so a stopped study keeps what it measured
            (out / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    result = {
        "config": "configs/demo.yaml", "iterations": args.iterations, "seeds": args.seeds,
        "settings": {n: SETTINGS[n] for n in args.settings}, "extra_overrides": extra,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "runs": runs, "comparison": compare(runs, args.settings, args.seeds) if len(args.settings) == 2 else {},
        "seconds_total": time.time() - t0,
    }
    (results / "precision_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, results / "precision_curve.png")
    print(json.dumps(result["comparison"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
