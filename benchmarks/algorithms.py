"""Algorithm comparison on the synthetic task: reward curves of every learner.algorithm (and PPO one-step-off)
over several seeds, each run the real `oirl train` CLI on configs/smoke.yaml (tiny Llama, 2 ZeRO-2 ranks, 1 vLLM
engine), one run at a time. Writes benchmarks/results/algorithms.json (per-iteration mean and standard error of
reward/mean over seeds, the median seconds per iteration, and the reward gain: mean of the last 3 iterations minus
the first 3) and algorithms.png.

    deploy/loopback.sh python benchmarks/algorithms.py [--seeds 0 1 2] [--iterations 12]

GSM8K with SmolLM2-135M (held-out accuracy before/after) is not part of this script yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "ppo": [],
    "ppo_async": ["rollout.async_steps=1"],
    "grpo": ["learner.algorithm=grpo", "learner.kl_in_loss=true"],
    "dr_grpo": ["learner.algorithm=grpo", "learner.kl_in_loss=true", "learner.grpo_scale_by_std=false",
                "learner.loss_aggregation=seq_mean_token_sum"],
    "rloo": ["learner.algorithm=rloo", "learner.kl_in_loss=true"],
    "reinforce_pp": ["learner.algorithm=reinforce_pp"],
}


def run(variant: str, seed: int, iterations: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(REPO / "configs" / "smoke.yaml"), "--out",
           str(out), "--no-progress", f"iterations={iterations}", "checkpoint_every=0", f"seed={seed}",
           f"data.seed={seed}", *VARIANTS[variant]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            curves, iter_s, gains = [], [], []
            for seed in args.seeds:
                t0 = time.perf_counter()
                rows = run(variant, seed, args.iterations, Path(tmp) / f"{variant}-{seed}")
                rewards = [r["reward/mean"] for r in rows]
                curves.append(rewards)
                iter_s.append(statistics.median(r["timing_s/iteration"] for r in rows[1:]))
                gains.append(sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3)
                print(f"{variant:13s} seed {seed}: gain {gains[-1]:+.3f}, {iter_s[-1]:.2f} s/iteration "
                      f"({time.perf_counter() - t0:.0f} s run)", flush=True)
            n = len(curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(args.iterations)]
            sem = [statistics.stdev(c[i] for c in curves) / n**0.5 if n > 1 else 0.0 for i in range(args.iterations)]
            results[variant] = {
                "overrides": VARIANTS[variant], "reward_mean": mean, "reward_sem": sem, "per_seed": curves,
                "gain_mean": statistics.fmean(gains), "gain_sem": statistics.stdev(gains) / n**0.5 if n > 1 else 0.0,
                "seconds_per_iteration_median": statistics.median(iter_s),
            }
    out = REPO / "benchmarks" / "results"
    (out / "algorithms.json").write_text(json.dumps({
        "task": "configs/smoke.yaml: tiny random Llama, synthetic digit reward, 8 prompts x 4 samples per iteration",
        "seeds": args.seeds, "iterations": args.iterations, "machine": "2-core CPU box, one run at a time",
        "gain": "mean reward of the last 3 iterations minus the first 3, per seed; mean and standard error over seeds",
        "results": results}, indent=2))
    plot(results, out / "algorithms.png")
    return 0


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        it = range(len(r["reward_mean"]))
        ax.plot(it, r["reward_mean"], label=f"{name} (gain {r['gain_mean']:+.3f} ± {r['gain_sem']:.3f})")
        ax.fill_between(it, [m - s for m, s in zip(r["reward_mean"], r["reward_sem"])],
                        [m + s for m, s in zip(r["reward_mean"], r["reward_sem"])], alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward/mean (mean ± s.e. over seeds)")
    ax.set_title("synthetic digit task, configs/smoke.yaml")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
