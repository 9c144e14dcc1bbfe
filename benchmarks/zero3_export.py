"""ZeRO-3 export memory: what publishing the weights (export_weights) and saving the final policy (save_hf) cost
each learner rank beyond its partition, before and after they gathered the parameters one layer at a time.

Two ZeRO-3 ranks (world size 2, gloo, one process each: the class the Ray actor runs) hold SmolLM2-135M in fp32
(538 MB, half on each rank). Each rank exports the weights twice (transport ``collective``: rank 0 keeps the
buckets in memory, no Ray needed) and saves the HF folder once. Measured per rank and call: the peak RSS above the
RSS before the call (a 5 ms sampler) and the peak of live tensor bytes above those before it (torch's profiler,
benchmarks/memory_plan.py), for

- ``before``: the code of BEFORE_COMMIT (extracted with git archive): every parameter gathered at once;
- ``after``: this tree: one gather unit at a time (learner/weight_export.py _gather_units: a decoder layer, or one
  embedding / norm / head tensor), so the extra is set by the largest unit (here the 108 MiB embedding; a layer is
  14 MiB).

Measured here (benchmarks/results/zero3_export.json): rank 1's live tensors during the export rise by 626 MiB before
(the 513 MiB model plus a staging copy of its largest tensor) and by 216 MiB after (twice the embedding: the gathered
tensor and DeepSpeed's all-gather buffer); its RSS by 449 and 215 MiB. Rank 0's RSS also holds the buckets it packs
(numpy, the whole model's bytes with either code), and save_hf's host copies of every tensor (513 MiB) stay.
Writes benchmarks/results/zero3_export.json.

    python -m benchmarks.zero3_export [--variants before after]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "6ca097a"
MODEL = "smollm2-135m"


def rank_main(code: str, rank: int, port: int, out: str) -> None:
    """One rank, in this process: set up, then export twice and save once, each measured."""
    sys.path.insert(0, code)
    import torch

    from benchmarks.learner_memory import PeakRSS
    from benchmarks.memory_plan import phase_peak
    from learner.learner_worker import LearnerConfig, LearnerWorker
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path=MODEL)))
    cfg = LearnerConfig(num_ranks=2, zero_stage=3, lr=1e-5, kl_coef=0.0, algorithm="grpo", timeout_s=600)
    worker = LearnerWorker(cfg, rank, path, "float32", 0, 1.0, f"z3export{port}")
    worker.setup("127.0.0.1", port, 1)
    result: dict[str, Any] = {"rank": rank, "code": code,
                              "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                                                     for p in worker.module.parameters())}
    tmp = tempfile.mkdtemp(prefix="z3save-")
    calls = {"export": lambda v: worker.export_weights(v, "collective", 512),
             "save_hf": lambda v: worker.save_hf(f"{tmp}/v{v}")}
    for name, call in calls.items():
        with PeakRSS() as m:
            call(1)
        result[f"{name}_rss_before_bytes"] = m.start
        result[f"{name}_rss_peak_extra_bytes"] = m.peak - m.start
        worker.collective_buffers = {}  # the buckets of version 1 are not kept: each export starts alike
        before, peak, seconds = phase_peak(lambda call=call: call(2))
        result[f"{name}_tensor_before_bytes"] = before
        result[f"{name}_tensor_peak_extra_bytes"] = peak - before
        result[f"{name}_s"] = seconds
        worker.collective_buffers = {}
    torch.distributed.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def run_variant(code: Path, tmp: Path, name: str) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{code}:{REPO}")
    outs = [tmp / f"{name}-rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.zero3_export", "--rank", str(code), str(r),
                               str(port), str(outs[r])], cwd=code, env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [p.communicate()[1] for p in procs]
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"{name} rank failed:\n{err[-4000:]}")
    return [{**json.loads(o.read_text()), "variant": name} for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["before", "after"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "zero3_export.json"))
    ap.add_argument("--rank", nargs=4, metavar=("CODE", "RANK", "PORT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank[0], int(args.rank[1]), int(args.rank[2]), args.rank[3])
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.variants:
            code = REPO
            if name == "before":
                code = tmp / "before"
                code.mkdir()
                archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_COMMIT], check=True,
                                         capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
                # the measuring helpers are this tree's (they did not exist at BEFORE_COMMIT)
                for helper in ("learner_memory.py", "memory_plan.py", "zero3_export.py"):
                    (code / "benchmarks" / helper).write_bytes((REPO / "benchmarks" / helper).read_bytes())
            for r in run_variant(code, tmp, name):
                results.append(r)
                print(f"{name:7s} rank {r['rank']}: export +{r['export_rss_peak_extra_bytes'] / 2**20:6.0f} MiB RSS "
                      f"(+{r['export_tensor_peak_extra_bytes'] / 2**20:6.0f} MiB tensors), save_hf "
                      f"+{r['save_hf_rss_peak_extra_bytes'] / 2**20:6.0f} MiB RSS "
                      f"(+{r['save_hf_tensor_peak_extra_bytes'] / 2**20:6.0f} MiB tensors)", flush=True)
    Path(args.out).write_text(json.dumps({
        "what": "extra memory of a ZeRO-3 rank during export_weights (transport collective) and save_hf: peak RSS "
                "above the RSS before the call (5 ms sampler) and peak live tensor bytes above those before it",
        "model": MODEL, "dtype": "float32", "ranks": 2, "before_commit": BEFORE_COMMIT,
        "machine": f"{os.cpu_count()} CPUs", "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
