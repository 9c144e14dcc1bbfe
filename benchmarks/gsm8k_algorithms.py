"""Algorithms on GSM8K with SmolLM2-135M: held-out accuracy before and after training, seconds per iteration.

    deploy/loopback.sh python -m benchmarks.gsm8k_algorithms --out DIR [--iterations 8] [--variants ppo,grpo]

The base model is evaluated once (benchmarks/gsm8k_eval.py: greedy, last 200 GSM8K rows, Wilson 95% intervals);
then each variant trains `oirl train --config configs/demo.yaml` for the same iterations and seed, with the held-out
rows removed from its data (data.max_rows), and its final HF folder is evaluated the same way. Writes
DIR/gsm8k_algorithms.json: per variant its overrides, reward curve, median seconds per iteration and per phase,
any peak-memory metric the learner logs, and the held-out evaluation (rates, intervals; records kept in
DIR/<variant>/heldout_eval.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gsm8k_eval import heldout_overrides
from oirl.metrics import read_metrics

VARIANTS: dict[str, list[str]] = {
    "ppo": ["learner.algorithm=ppo"],
    "ppo_separate_critic": ["learner.algorithm=ppo", "learner.critic=separate"],
    "grpo": ["learner.algorithm=grpo", "learner.kl_in_loss=true"],  # one advantage per sample: KL in the loss
    "rloo": ["learner.algorithm=rloo", "learner.kl_in_loss=true"],
    "reinforce_pp": ["learner.algorithm=reinforce_pp"],
}
SUMMARY_KEYS = ("n", "accuracy", "accuracy_ci95", "format_rate", "format_rate_ci95", "seconds", "generated_tokens")


def run_eval(model: str, out_file: Path, n: int, max_new_tokens: int) -> dict[str, Any]:
    """One evaluation in its own process (a vLLM engine per process, released when it exits)."""
    subprocess.run([sys.executable, "-m", "benchmarks.gsm8k_eval", "--model", model, "--out", str(out_file), "--n",
                    str(n), "--max-new-tokens", str(max_new_tokens)], check=True, timeout=3600)
    full = json.loads(out_file.read_text())
    return {k: full[k] for k in SUMMARY_KEYS}


def summarise_run(run_dir: Path) -> dict[str, Any]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    phases = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("timing_s/")})
    peaks = {k: max(r[k] for r in rows if k in r) for k in {k for r in rows for k in r if "peak" in k}}
    return {
        "iterations": len(rows),
        "reward_mean_per_iteration": [r["reward/mean"] for r in rows],
        "seconds_per_iteration_median": statistics.median(r["timing_s/iteration"] for r in rows),
        "phase_seconds_median": {p: statistics.median(r[f"timing_s/{p}"] for r in rows if f"timing_s/{p}" in r)
                                 for p in phases},
        "peak_memory": peaks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--variants", default="ppo,grpo", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--n", type=int, default=200, help="held-out questions")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="evaluation budget per question")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--model", default="smollm2-135m", help="model.path of the runs and the base evaluation")
    parser.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every run")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"config": args.config, "model": args.model, "iterations": args.iterations, "heldout_n": args.n,
                              "eval_max_new_tokens": args.max_new_tokens,
                              "heldout_overrides": heldout_overrides(args.n), "variants": {}}
    previous = out / "gsm8k_algorithms.json"
    if previous.is_file():  # a rerun into the same folder keeps what is done (same settings only)
        done = json.loads(previous.read_text())
        if all(done.get(k) == result[k] for k in ("config", "model", "iterations", "heldout_n", "eval_max_new_tokens")):
            result["before"], result["variants"] = done.get("before"), done["variants"]
    if not result.get("before"):
        result["before"] = run_eval(args.model, out / "base_heldout_eval.json", args.n, args.max_new_tokens)
    for name in args.variants.split(","):
        if name in result["variants"]:
            continue
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short before its result was recorded starts over
        overrides = [*heldout_overrides(args.n), f"iterations={args.iterations}", "checkpoint_every=0",
                     f"model.path={args.model}", *args.set, *VARIANTS[name]]
        subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", args.config, "--out", str(run_dir),
                        "--no-progress", *overrides], check=True, timeout=6 * 3600)
        entry = {"overrides": overrides, **summarise_run(run_dir)}
        entry["after"] = run_eval(str(run_dir / "final"), run_dir / "heldout_eval.json", args.n, args.max_new_tokens)
        result["variants"][name] = entry
        (out / "gsm8k_algorithms.json").write_text(json.dumps(result, indent=1))  # partial results survive a stop
    result["seconds_total"] = time.perf_counter() - t0
    (out / "gsm8k_algorithms.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
