"""Peak memory per role of the default job: `oirl bench memory [--quick] --out DIR` writes DIR/memory.json.

    deploy/loopback.sh python -m benchmarks.memory --out DIR [--quick] [--iterations 2] [overrides ...]

Runs the real `oirl train` (configs/demo.yaml: SmolLM2-135M, 1 in-process vLLM engine, 2 ZeRO-2 ranks, the reward
actor; `--quick`: configs/smoke.yaml, the tiny model) for a few iterations and reads the peaks the driver logs every
iteration (memory/<role>_peak_rss_mib: each process's getrusage high-water mark; an engine's includes vLLM's own
processes when it runs them). The last row holds each role's peak over the run.

Beside the per-role peaks, this process samples the run's whole process tree once a second (the driver, Ray's own
processes, every actor): `sampled.total_peak_mib` is the largest simultaneous sum, and `sampled.ray_system_peak_mib`
that of Ray's processes that are not actors (GCS, raylet, idle workers, agents), which no role reports. RSS counts
shared pages (/dev/shm weight files, the object store) in every process that maps them, so sums over-count them.

DIR/memory.json: roles {name: peak_rss_mib}, total_mib (sum of the role peaks: an upper bound of the simultaneous
total), sampled, machine, config, overrides, iterations, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from oirl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def run_job(config: str, overrides: list[str], run_dir: Path, timeout_s: float) -> tuple[list[dict], dict[str, Any]]:
    """`oirl train` as a child process; returns its metrics rows and the sampled process-tree peaks."""
    import psutil

    cmd = [sys.executable, "-m", "oirl.cli", "train", "--config", config, "--out", str(run_dir), "--no-progress",
           *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO)
    peaks = {"total_peak_mib": 0.0, "ray_system_peak_mib": 0.0, "samples": 0, "interval_s": 1.0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.wait(peaks["interval_s"]):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = system = 0
            for p in procs:
                try:
                    rss, title = p.memory_info().rss, " ".join(p.cmdline()[:1])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if p.pid != proc.pid and not (title.startswith("ray::") and not title.startswith("ray::IDLE")):
                    system += rss
            peaks["total_peak_mib"] = max(peaks["total_peak_mib"], total / 2**20)
            peaks["ray_system_peak_mib"] = max(peaks["ray_system_peak_mib"], system / 2**20)
            peaks["samples"] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        done.set()
        sampler.join(timeout=10)
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {rc}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    return rows, peaks


def role_peaks(rows: list[dict]) -> dict[str, float]:
    """{role: peak MiB} from the memory/<role>_peak_rss_mib columns (the max over rows: high-water marks)."""
    keys = sorted({k for r in rows for k in r if k.startswith("memory/") and k.endswith("_peak_rss_mib")})
    if not keys:
        raise RuntimeError("the run logged no memory/<role>_peak_rss_mib metrics")
    return {k[len("memory/"):-len("_peak_rss_mib")]: max(r[k] for r in rows if k in r) for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml (the tiny model)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="longest wait for the run, seconds")
    args, overrides = parser.parse_known_args()
    config = REPO / "configs" / ("smoke.yaml" if args.quick else "demo.yaml")
    overrides = [f"iterations={args.iterations}", "checkpoint_every=0", *overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="oirl-bench-memory-"))  # checkpoints are large: never under --out
    t0 = time.perf_counter()
    try:
        rows, sampled = run_job(str(config), overrides, run_dir, args.timeout)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    roles = role_peaks(rows)
    result = {
        "roles": roles,
        "total_mib": sum(roles.values()),
        "sampled": sampled,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30},
        "config": str(config.relative_to(REPO)),
        "overrides": overrides,
        "quick": args.quick,
        "iterations": len(rows),
        "seconds": time.perf_counter() - t0,
        "note": "peak RSS per process (getrusage ru_maxrss; engines: + their vLLM processes' VmHWM), logged by the "
                "driver every iteration; total_mib sums peaks reached at different times (an upper bound); sampled "
                "sums RSS of the whole process tree once a second; RSS counts shared pages in every process",
    }
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"roles": {k: round(v) for k, v in roles.items()}, "total_mib": round(result["total_mib"]),
                      "sampled_total_peak_mib": round(sampled["total_peak_mib"])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
