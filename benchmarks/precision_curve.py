"""Does the mixed-precision update learn like the fp32 one? The default job (configs/demo.yaml) for N iterations,
each precision setting x each seed, one run after the other, and the reward and KL curves side by side.

    deploy/loopback.sh python -m benchmarks.precision_curve [--iterations 10] [--seeds 0 1] [--out /tmp/oirl-curve]
    deploy/loopback.sh python -m benchmarks.precision_curve --seeds 2 3 --add-to benchmarks/results/precision_curve.json

Writes benchmarks/results/precision_curve.json (+ .png). The comparison it reports:
- iteration 1 of a seed is the same rollout in every setting (same initial weights, same sampling seed), so its
  rewards must match exactly: this is what makes the later iterations a paired comparison;
- the mean reward of iterations 2..N per run, the difference between settings under the same seed, and the
  difference between seeds under the same setting (the run-to-run noise the first must be compared with);
- with more than one seed: the paired difference's mean over seeds, its standard error and a paired t (the seeds
  are the independent units), and the seed-to-seed spread of each setting;
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

from benchmarks.e2e import BF16, PRECISION
from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# mixed: today's default job (bf16 autocast in the update over fp32 weights; engine and reference fp32); bf16: bf16
# end to end, with the rollout correction and the bf16 checks (benchmarks/e2e.py's BF16).
SETTINGS: dict[str, list[str]] = {"fp32": PRECISION["fp32"], "mixed": PRECISION["mixed_precision"], "bf16": BF16}
DEFAULT_SETTINGS = ["fp32", "mixed"]  # the pair a study compares unless --settings names another


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
        "mismatch_k3_kl_per_iteration": [r.get("rollout/mismatch_k3_kl") for r in rows],
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
    diffs = [late[(names[1], s)] - late[(names[0], s)] for s in seeds]
    out: dict[str, Any] = {
        "first_iteration_rewards_equal": {
            str(s): len({by[(n, s)]["reward_mean_per_iteration"][0] for n in names}) == 1 for s in seeds},
        "reward_mean_after_first": {f"{n}-s{s}": late[(n, s)] for n in names for s in seeds},
        "setting_difference_same_seed": {str(s): d for s, d in zip(seeds, diffs)},
        "kl_mean_last": {f"{n}-s{s}": by[(n, s)]["kl_mean_per_iteration"][-1] for n in names for s in seeds},
        "iteration_seconds_median_after_first": {
            n: statistics.median(x for s in seeds for x in by[(n, s)]["iteration_seconds_per_iteration"][1:])
            for n in names},
    }
    if len(seeds) > 1:
        # seeds are the independent units: a run's iterations share its weights, so only the per-seed numbers are
        # independent draws. The paired difference (same seed, both settings) is set against the seed-to-seed
        # spread of one setting, which is the noise any real difference must exceed.
        out["seed_spread_same_setting"] = {n: statistics.stdev(late[(n, s)] for s in seeds) for n in names}
        mean_d, sd_d = statistics.fmean(diffs), statistics.stdev(diffs)
        out["setting_difference_mean"] = mean_d
        out["setting_difference_stderr"] = sd_d / math.sqrt(len(diffs))
        out["paired_t"] = mean_d / (sd_d / math.sqrt(len(diffs))) if sd_d > 0 else math.copysign(math.inf, mean_d)
        out["paired_t_dof"] = len(diffs) - 1
        out["paired_t_note"] = (f"{names[1]} minus {names[0]}, one difference per seed (mean reward of iterations "
                                f"2..N); two-sided 5% critical value for {len(diffs) - 1} degrees of freedom: "
                                f"{T_CRIT_95.get(len(diffs) - 1, 2.0):.2f}")
        out["sign_of_differences"] = {"negative": sum(d < 0 for d in diffs), "positive": sum(d > 0 for d in diffs)}
    pooled = {n: [x for s in seeds for x in by[(n, s)]["reward_mean_per_iteration"][1:]] for n in names}
    if all(len(v) > 1 for v in pooled.values()):
        out["welch_t_iteration_means"] = welch_t(pooled[names[1]], pooled[names[0]])
        out["welch_t_note"] = (f"{names[1]} minus {names[0]} over the per-iteration reward means of iterations 2..N, "
                               "all seeds; |t| < 2 is no detectable difference at this sample size (the iterations "
                               "of a run are not independent, so this overstates the evidence either way)")
    return out


# two-sided 95% critical values of Student's t (from the table), by degrees of freedom
T_CRIT_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"fp32": "tab:blue", "mixed": "tab:orange", "bf16": "tab:green"}
    for r in result["runs"]:
        style = ["-", "--", ":", "-."][result["seeds"].index(r["seed"]) % 4]
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
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS),
                        help="two settings to compare (default fp32 mixed; mixed bf16 for bf16 end to end)")
    parser.add_argument("--out", default="/tmp/oirl-curve", help="run directories (large: not in git)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--name", default="precision_curve",
                        help="results file stem: <results>/<name>.json and .png (e.g. precision_curve_bf16)")
    parser.add_argument("--add-to", default=None, metavar="JSON",
                        help="an earlier precision_curve.json: its runs are kept and these seeds are added to them "
                             "(same iterations and settings required), so a study grows one seed at a time")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    seconds_before = 0.0
    if args.add_to:
        earlier = json.loads(Path(args.add_to).read_text())
        if earlier["iterations"] != args.iterations or sorted(earlier["settings"]) != sorted(args.settings) \
                or earlier["extra_overrides"] != extra:
            raise SystemExit(f"--add-to {args.add_to}: it ran {earlier['iterations']} iterations of "
                             f"{sorted(earlier['settings'])} with extra overrides {earlier['extra_overrides']}; "
                             f"this study asks for {args.iterations} of {sorted(args.settings)} with {extra}. "
                             "Match them, or start a new study without --add-to")
        if set(earlier["seeds"]) & set(args.seeds):
            raise SystemExit(f"--add-to {args.add_to}: seeds {sorted(set(earlier['seeds']) & set(args.seeds))} "
                             "are already in it; pass only new seeds")
        runs = list(earlier["runs"])
        seconds_before = earlier["seconds_total"]
    seeds = [*sorted({r["seed"] for r in runs}), *args.seeds]
    for seed in args.seeds:
        for name in args.settings:
            runs.append(run(name, seed, args.iterations, extra, out))
            # after every run, so a stopped study keeps what it measured
            (out / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    result = {
        "config": "configs/demo.yaml", "iterations": args.iterations, "seeds": seeds,
        "settings": {n: SETTINGS[n] for n in args.settings}, "extra_overrides": extra,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "runs": runs, "comparison": compare(runs, args.settings, seeds) if len(args.settings) == 2 else {},
        "seconds_total": seconds_before + time.time() - t0,
    }
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, results / f"{args.name}.png")
    print(json.dumps(result["comparison"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
