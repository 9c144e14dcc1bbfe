"""Learner memory benchmark: peak host memory of one learner rank during prepare() and update() at the default
job's shape (SmolLM2-135M fp32, 16 rows per rank = 8 prompts x 4 samples over 2 ranks, forward_batch_size 4,
4 mini-batches, prompts of 200 and responses of 128 tokens), for several variants of the learner, each in its own
process, one after the other:

- ``before``: the learner as it was before chunked scoring (git commit BEFORE_COMMIT, checked out into a temporary
  worktree): prepare() kept the full-vocabulary logits of the whole local shard for policy and reference;
- ``chunked``: the current learner (logprobs, values and entropy reduced chunk by chunk, [B, R] kept);
- ``chunked+ref_bf16``, ``chunked+grad_ckpt``: the options for larger models.

A rank is built in-process (world size 1, gloo), exactly the class the Ray actor runs. Memory is the process's RSS
sampled every 5 ms; reported as the peak during the phase minus the RSS just before it, for the second iteration
(``first_*``: the first, whose update also allocates the optimizer state) and as the process's peak RSS. Writes
benchmarks/results/learner_memory.json.

    python benchmarks/learner_memory.py [--variants before chunked ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "9a43c6c"
VARIANTS = {
    "before": {},
    "chunked": {},
    "chunked+ref_bf16": {"ref_dtype": "bfloat16"},
    "chunked+grad_ckpt": {"gradient_checkpointing": True},
}
ROWS, PROMPT, RESPONSE = 16, 200, 128


class PeakRSS:
    """Highest RSS of this process seen by a 5 ms sampler while the block runs."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def worker(code: str, variant: str, out: str) -> None:
    """One variant, in this process: build the rank, run prepare and update once, write the numbers."""
    sys.path.insert(0, code)
    import numpy as np

    from learner.learner_worker import LearnerConfig, LearnerWorker
    from oirl.batch import add_column, make_rollout_batch
    from oirl.config import ModelConfig
    from oirl.models import resolve_model

    path = str(resolve_model(ModelConfig(path="smollm2-135m")))
    cfg = LearnerConfig(num_ranks=1, zero_stage=2, lr=5e-6, num_minibatches=4, kl_coef=0.02, forward_batch_size=4,
                        **VARIANTS[variant])
    rank = LearnerWorker(cfg, 0, path, "float32", 0, 0.7, f"mem{os.getpid()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    rank.setup("127.0.0.1", port, ROWS // cfg.num_minibatches)
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, PROMPT).tolist() for _ in range(ROWS)]
    responses = [rng.integers(100, 40000, RESPONSE).tolist() for _ in range(ROWS)]
    batch = make_rollout_batch(list(range(ROWS)), [0] * ROWS, prompts, responses,
                               [[-1.0] * RESPONSE for _ in range(ROWS)], ["length"] * ROWS, 0)
    batch = add_column(batch, "reward", rng.normal(size=ROWS).astype(np.float32))
    result = {"variant": variant, "code": code, "setup_s": setup_s}
    # Two iterations: the first update also allocates the optimizer state; the second shows the steady state.
    for it, prefix in ((0, "first_"), (1, "")):
        for phase, call in (("prepare", lambda it=it: rank.prepare(batch, it)), ("update", rank.update)):
            t0 = time.perf_counter()
            with PeakRSS() as m:
                call()
            result[f"{prefix}{phase}_s"] = time.perf_counter() - t0
            result[f"{prefix}{phase}_rss_before_bytes"] = m.start
            result[f"{prefix}{phase}_peak_extra_bytes"] = m.peak - m.start
            result[f"{prefix}{phase}_peak_rss_bytes"] = m.peak
    Path(out).write_text(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learner_memory.json"))
    ap.add_argument("--worker", nargs=3, metavar=("CODE", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        if "before" in args.variants:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before), BEFORE_COMMIT],
                           check=True)
        try:
            for variant in args.variants:
                code = str(before if variant == "before" else REPO)
                out = Path(tmp) / f"{variant}.json"
                proc = subprocess.run([sys.executable, __file__, "--worker", code, variant, str(out)], cwd=code,
                                      capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
                if proc.returncode != 0:
                    raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
                results.append(json.loads(out.read_text()))
                r = results[-1]
                print(f"{variant:20s} prepare +{r['prepare_peak_extra_bytes'] / 2**20:7.0f} MiB in "
                      f"{r['prepare_s']:5.1f}s   update +{r['update_peak_extra_bytes'] / 2**20:7.0f} MiB in "
                      f"{r['update_s']:5.1f}s   peak RSS {r['update_peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
        finally:
            if "before" in args.variants:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    Path(args.out).write_text(json.dumps({
        "what": "peak host RSS of one learner rank above its RSS before the phase (5 ms sampler)",
        "shape": {"model": "smollm2-135m", "dtype": "float32", "rows_per_rank": ROWS, "prompt_tokens": PROMPT,
                  "response_tokens": RESPONSE, "forward_batch_size": 4, "num_minibatches": 4},
        "machine": f"{os.cpu_count()} CPUs", "before_commit": BEFORE_COMMIT, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
