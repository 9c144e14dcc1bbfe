"""Run the default job (configs/demo.yaml: SmolLM2-135M on GSM8K) and record its reward curve and per-phase time
breakdown under benchmarks/results/ (demo.json + demo_curves.png).

    deploy/loopback.sh python -m benchmarks.run_demo [--out /tmp/oirl-demo] [overrides ...]
    python -m benchmarks.run_demo --from-run DIR --wall-seconds S -- [the overrides DIR ran with]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def summarize(out: Path, overrides: list[str], wall: float) -> dict:
    """demo.json's content from a finished run directory of the default job."""
    rows = read_metrics(out / "metrics.jsonl")
    phases = sorted(k for k in rows[0] if k.startswith("timing_s/"))
    return {
        "config": "configs/demo.yaml",
        "overrides": overrides,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "wall_seconds_total": wall,
        "iterations": len(rows),
        "reward_mean_per_iteration": [r["reward/mean"] for r in rows],
        "kl_mean_per_iteration": [r["kl/mean"] for r in rows],
        "gen_tokens_per_s_per_iteration": [r["perf/gen_tokens_per_s"] for r in rows],
        "phase_seconds_mean": {p.split("/", 1)[1]: sum(r[p] for r in rows) / len(rows) for p in phases},
        "phase_seconds_per_iteration": {p.split("/", 1)[1]: [r[p] for r in rows] for p in phases},
        "sync": {"bytes": rows[-1]["sync/bytes"],
                 "seconds_mean": sum(r["sync/seconds"] for r in rows) / len(rows),
                 "gbps_mean": sum(r["sync/gbps"] for r in rows) / len(rows),
                 # the canary runs at the syncs sync.canary_every picks
                 "canary_syncs": sum("sync/logprob_max_abs_diff" in r for r in rows),
                 "logprob_max_abs_diff_max": max((r["sync/logprob_max_abs_diff"] for r in rows
                                                  if "sync/logprob_max_abs_diff" in r), default=None)},
        "on_policy_max_abs_diff_max": max(r["rollout/engine_learner_logprob_max_abs_diff"] for r in rows),
        "policy_versions": [[r["rollout/policy_version_min"], r["rollout/policy_version_max"]] for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/oirl-demo", help="run directory (checkpoints are large: not in git)")
    parser.add_argument("--from-run", metavar="DIR",
                        help="summarize this finished run of the default job instead of running one (with --wall-seconds "
                             "its wall time and the overrides it ran with after --)")
    parser.add_argument("--wall-seconds", type=float, default=0.0)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.from_run:
        out, wall = Path(args.from_run), args.wall_seconds
    else:
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        t0 = time.time()
        cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
               "--out", str(out), "--no-progress", *overrides]
        proc = subprocess.run(cmd, cwd=REPO)
        wall = time.time() - t0
        if proc.returncode != 0:
            print(f"demo run failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
    summary = summarize(out, overrides, wall)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.copy(out / "curves.png", RESULTS / "demo_curves.png")
    print(json.dumps({k: summary[k] for k in ("iterations", "wall_seconds_total", "phase_seconds_mean")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
