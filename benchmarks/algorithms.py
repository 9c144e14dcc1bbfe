"""Algorithm comparison, and what a critic costs.

1. The synthetic task: reward curves of every learner.algorithm (PPO with its critic shared with the policy or
   separate, PPO one-step-off, GRPO, Dr. GRPO, RLOO, REINFORCE++) over several seeds, each run the real
   `oirl train` CLI on configs/smoke.yaml (tiny Llama, 2 ZeRO-2 ranks, 1 vLLM engine), one run at a time. Per
   variant: per-iteration mean and standard error of reward/mean over seeds, the reward gain (mean of the last 3
   iterations minus the first 3), the median seconds of the prepare and update phases and of the iteration, and
   the learner ranks' peak RSS (learner/peak_rss_mib, the max over ranks of getrusage's ru_maxrss).
2. The cost of the critic at the default job's model size (SmolLM2-135M fp32), where the tiny model cannot show
   it: one LearnerWorker rank in-process (world size 1, gloo), each variant in its own process, two iterations of
   prepare and update on the same random batch; seconds of the second iteration and the process's peak RSS.
   Critic-free GRPO is compared with PPO's shared and separate critic (all with a reference model, kl_coef > 0).

Writes benchmarks/results/algorithms.json and algorithms.png.

    deploy/loopback.sh python -m benchmarks.algorithms [--seeds 0 1 2] [--iterations 12] [--variants ...]
        [--cost-variants ...]   # --variants / --cost-variants with no names skip that part; results of variants
                                # not run are kept from the existing JSON (each records its seeds and run)
    python -m benchmarks.algorithms --replot   # savings and PNG again from the JSON

GSM8K with SmolLM2-135M (held-out accuracy before/after) is not part of this script yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {
    "ppo": ["learner.critic=shared"],
    "ppo_separate_critic": ["learner.critic=separate"],
    "ppo_async": ["learner.critic=shared", "rollout.async_steps=1"],
    "grpo": ["learner.algorithm=grpo", "learner.kl_in_loss=true"],
    "dr_grpo": ["learner.algorithm=grpo", "learner.kl_in_loss=true", "learner.grpo_scale_by_std=false",
                "learner.loss_aggregation=seq_mean_token_sum"],
    "rloo": ["learner.algorithm=rloo", "learner.kl_in_loss=true"],
    "reinforce_pp": ["learner.algorithm=reinforce_pp"],
}
# The critic's cost at SmolLM2-135M: LearnerConfig fields per variant, and the batch shape (one rank).
COST_VARIANTS = {
    "ppo_shared_critic": {"algorithm": "ppo", "critic": "shared"},
    "ppo_separate_critic": {"algorithm": "ppo", "critic": "separate"},
    "grpo": {"algorithm": "grpo", "kl_in_loss": True},
}
COST_ROWS, COST_PROMPT, COST_RESPONSE = 8, 96, 64
RUN = time.strftime("%Y-%m-%dT%H:%M:%S")  # which invocation measured a variant: timings compare within one run
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def run(variant: str, seed: int, iterations: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(REPO / "configs" / "smoke.yaml"), "--out",
           str(out), "--no-progress", f"iterations={iterations}", "checkpoint_every=0", f"seed={seed}",
           f"data.seed={seed}", *VARIANTS[variant]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return read_metrics(out / "metrics.jsonl")


def sem(xs: list[float]) -> float:
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def synthetic(variants: list[str], seeds: list[int], iterations: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            curves, gains, phases, rss = [], [], {"prepare": [], "update": [], "iteration": []}, []
            for seed in seeds:
                t0 = time.perf_counter()
                rows = run(variant, seed, iterations, Path(tmp) / f"{variant}-{seed}")
                rewards = [r["reward/mean"] for r in rows]
                curves.append(rewards)
                gains.append(sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3)
                for phase, values in phases.items():  # the first iteration pays one-off costs: left out
                    values.append(statistics.median(r[f"timing_s/{phase}"] for r in rows[1:]))
                rss.append(max(r["learner/peak_rss_mib"] for r in rows))
                print(f"{variant:20s} seed {seed}: gain {gains[-1]:+.3f}, {phases['iteration'][-1]:.2f} s/iteration "
                      f"(prepare {phases['prepare'][-1]:.3f}, update {phases['update'][-1]:.3f}), peak RSS "
                      f"{rss[-1]:.0f} MiB ({time.perf_counter() - t0:.0f} s run)", flush=True)
            results[variant] = {
                "overrides": VARIANTS[variant], "seeds": seeds, "run": RUN, "per_seed": curves,
                "reward_mean": [statistics.fmean(c[i] for c in curves) for i in range(iterations)],
                "reward_sem": [sem([c[i] for c in curves]) for i in range(iterations)],
                "gain_mean": statistics.fmean(gains), "gain_sem": sem(gains), "gain_per_seed": gains,
                **{f"seconds_{phase}_median": statistics.median(v) for phase, v in phases.items()},
                "seconds_per_iteration_median": statistics.median(phases["iteration"]),
                "learner_peak_rss_mib_mean": statistics.fmean(rss), "learner_peak_rss_mib_sem": sem(rss),
            }
    return results


def cost_worker(variant: str, out: str) -> None:
    """One variant of part 2, in this process: a world-size-1 rank, two iterations, the numbers to ``out``."""
    import numpy as np

    from learner.learner_worker import LearnerConfig, LearnerWorker
    from oirl.batch import add_column, make_rollout_batch
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path="smollm2-135m")))
    cfg = LearnerConfig(num_ranks=1, zero_stage=2, lr=5e-6, num_minibatches=2, kl_coef=0.02, forward_batch_size=4,
                        max_new_tokens=COST_RESPONSE, **COST_VARIANTS[variant])
    rank = LearnerWorker(cfg, 0, path, "float32", 0, 0.7, f"cost{os.getpid()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    rank.setup("127.0.0.1", port, COST_ROWS // cfg.num_minibatches)
    result = {"variant": variant, "learner": COST_VARIANTS[variant], "setup_s": time.perf_counter() - t0,
              "built": rank.built()}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, COST_PROMPT).tolist() for _ in range(COST_ROWS)]
    responses = [rng.integers(100, 40000, COST_RESPONSE).tolist() for _ in range(COST_ROWS)]
    batch = make_rollout_batch([i // 4 for i in range(COST_ROWS)], [0] * COST_ROWS, prompts, responses,
                               [[-1.0] * COST_RESPONSE for _ in range(COST_ROWS)], ["length"] * COST_ROWS, 0)
    batch = add_column(batch, "reward", rng.normal(size=COST_ROWS).astype(np.float32))
    for it, prefix in ((0, "first_"), (1, "")):  # the first update also allocates the optimizer state
        for phase, call in (("prepare", lambda it=it: rank.prepare(batch, it)), ("update", rank.update)):
            t0 = time.perf_counter()
            call()
            result[f"{prefix}{phase}_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rank.close_shm()
    Path(out).write_text(json.dumps(result))


def critic_cost(variants: list[str]) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, "-m", "benchmarks.algorithms", "--cost-worker", variant, str(out)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"critic cost {variant} failed:\n{proc.stderr[-4000:]}")
            r = results[variant] = json.loads(out.read_text())
            print(f"{variant:20s} prepare {r['prepare_s']:5.2f} s, update {r['update_s']:5.2f} s, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB (trainable: policy {r['built']['trainable_params']:,}, critic "
                  f"{r['built']['critic_params']:,})", flush=True)
    return results


def savings(synth: dict[str, dict], cost: dict[str, dict]) -> dict:
    """What critic-free training saves against PPO with each kind of critic (positive = saved)."""
    out: dict = {"synthetic": {}, "smollm2_135m": {}}
    for base in ("ppo", "ppo_separate_critic"):
        for name in CRITIC_FREE:
            b, r = synth.get(base, {}), synth.get(name, {})
            if "seconds_prepare_median" in b and "seconds_prepare_median" in r:
                out["synthetic"][f"{name}_vs_{base}"] = {
                    **{f"seconds_{p}": b[f"seconds_{p}_median"] - r[f"seconds_{p}_median"]
                       for p in ("prepare", "update", "iteration")},
                    "peak_rss_mib": b["learner_peak_rss_mib_mean"] - r["learner_peak_rss_mib_mean"],
                    "runs": [b.get("run"), r.get("run")]}  # different runs: machine load differs too
    for base in ("ppo_shared_critic", "ppo_separate_critic"):
        if base in cost and "grpo" in cost:
            b, r = cost[base], cost["grpo"]
            out["smollm2_135m"][f"grpo_vs_{base}"] = {
                "seconds_prepare": b["prepare_s"] - r["prepare_s"], "seconds_update": b["update_s"] - r["update_s"],
                "peak_rss_mib": b["peak_rss_mib"] - r["peak_rss_mib"],
                "fraction_of_prepare_plus_update": 1 - (r["prepare_s"] + r["update_s"])
                / (b["prepare_s"] + b["update_s"])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--cost-variants", nargs="*", default=list(COST_VARIANTS))
    ap.add_argument("--cost-worker", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="recompute savings and the PNG from the JSON; run nothing")
    args = ap.parse_args()
    if args.cost_worker:
        cost_worker(*args.cost_worker)
        return 0
    path = RESULTS / "algorithms.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if args.replot:
        old["savings"] = savings(old["results"], old["critic_cost"]["results"])
        path.write_text(json.dumps(old, indent=2))
        plot(old["results"], old["critic_cost"]["results"], RESULTS / "algorithms.png")
        return 0
    for kept in old.get("results", {}).values():  # written before seeds were recorded per variant
        if isinstance(old.get("seeds"), list):
            kept.setdefault("seeds", old["seeds"])
    synth = {**old.get("results", {}), **synthetic(args.variants, args.seeds, args.iterations)}
    cost = {**old.get("critic_cost", {}).get("results", {}), **critic_cost(args.cost_variants)}
    path.write_text(json.dumps({
        "task": "configs/smoke.yaml: tiny random Llama, synthetic digit reward, 8 prompts x 4 samples per iteration",
        "seeds": "per variant, results[<variant>]['seeds']", "iterations": args.iterations, "machine": "2-core CPU box, one run at a time",
        "gain": "mean reward of the last 3 iterations minus the first 3, per seed; mean and standard error over seeds",
        "timing": "median over iterations 1.. of timing_s/<phase>, then median over seeds; peak RSS: max over "
                  "iterations of learner/peak_rss_mib (max over the learner ranks), mean over seeds",
        "results": synth,
        "critic_cost": {
            "what": "one LearnerWorker rank in-process, SmolLM2-135M fp32, kl_coef 0.02 (reference loaded), "
                    f"{COST_ROWS} rows of {COST_PROMPT} prompt + {COST_RESPONSE} response tokens, 2 mini-batches; "
                    "seconds of the second iteration, peak RSS of the process (ru_maxrss)",
            "results": cost},
        "savings": savings(synth, cost)}, indent=2))
    plot(synth, cost, RESULTS / "algorithms.png")
    print(f"wrote {path}")
    return 0


def plot(results: dict[str, dict], cost: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 2, 1.3]})
    for name, r in results.items():
        it = range(len(r["reward_mean"]))
        seeds = f", {len(r['seeds'])} seeds" if "seeds" in r else ""
        ax.plot(it, r["reward_mean"], label=f"{name} (gain {r['gain_mean']:+.3f} ± {r['gain_sem']:.3f}{seeds})")
        ax.fill_between(it, [m - s for m, s in zip(r["reward_mean"], r["reward_sem"])],
                        [m + s for m, s in zip(r["reward_mean"], r["reward_sem"])], alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward/mean (mean ± s.e. over seeds)")
    ax.set_title("synthetic digit task, configs/smoke.yaml")
    ax.legend(fontsize=7)
    timed = [n for n, r in results.items() if "seconds_prepare_median" in r]
    x = range(len(timed))
    prep = [results[n]["seconds_prepare_median"] for n in timed]
    upd = [results[n]["seconds_update_median"] for n in timed]
    bx.bar(x, prep, label="prepare")
    bx.bar(x, upd, bottom=prep, label="update")
    for i, n in enumerate(timed):
        bx.text(i, prep[i] + upd[i], f"{results[n]['learner_peak_rss_mib_mean']:.0f}\nMiB", ha="center",
                va="bottom", fontsize=7)
    bx.set_xticks(list(x), timed, rotation=30, ha="right", fontsize=7)
    bx.set_ylabel("seconds per iteration (median)")
    bx.set_title("learner time per phase; peak learner RSS above bars", fontsize=9)
    bx.margins(y=0.2)
    bx.legend(fontsize=7)
    names = list(cost)
    prep = [cost[n]["prepare_s"] for n in names]
    upd = [cost[n]["update_s"] for n in names]
    cx.bar(range(len(names)), prep, label="prepare")
    cx.bar(range(len(names)), upd, bottom=prep, label="update")
    for i, n in enumerate(names):
        cx.text(i, prep[i] + upd[i], f"{cost[n]['peak_rss_mib'] / 1024:.1f}\nGiB", ha="center", va="bottom",
                fontsize=7)
    cx.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    cx.set_ylabel("seconds (second iteration)")
    cx.set_title("SmolLM2-135M, 1 rank: the critic's cost;\npeak RSS above bars", fontsize=9)
    cx.margins(y=0.2)
    cx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
