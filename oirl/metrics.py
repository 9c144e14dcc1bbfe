"""Run metrics: one JSON object per iteration in metrics.jsonl, the same scalars in TensorBoard, and a PNG of the
reward / KL / throughput curves at the end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion: stays inside [0, 1] and is sane at 0 or n successes
    (where the normal approximation collapses to a point). (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class MetricsLogger:
    def __init__(self, out_dir: Path, start_iteration: int = 0, restored_row: dict[str, Any] | None = None):
        """A resumed run (start_iteration > 0) rewrites the iterations after its checkpoint: rows before it are
        kept, and ``restored_row`` (the committed checkpoint's copy of row start_iteration - 1) fills in that row
        when the driver died between committing the checkpoint and logging it."""
        self.path = out_dir / "metrics.jsonl"
        kept: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: it is rewritten below if it matters
                    continue
                if row["iteration"] < start_iteration:
                    kept.append(row)
        missing = restored_row is not None and all(r["iteration"] != restored_row["iteration"] for r in kept)
        if missing:
            kept.append(restored_row)
        if self.path.exists() or kept:
            kept.sort(key=lambda r: r["iteration"])
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            tmp.replace(self.path)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard's own resume: points at steps >= purge_step that an earlier process wrote (the rows this
            # run redoes, and a restored row it may have logged before it died) are hidden, not shown twice.
            purge = restored_row["iteration"] if missing else start_iteration
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge if start_iteration else None)
        except ImportError:  # tensorboard is a declared dependency; keep running if a user removed it
            logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        if missing and self.tb is not None:
            self._tensorboard(restored_row)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self.tb is not None:
            self._tensorboard(metrics)

    def _tensorboard(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["iteration"])
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "iteration":
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """Reward, KL, generation throughput and per-phase time per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    key = "reward/raw_mean" if all("reward/raw_mean" in r for r in rows) else "reward/mean"  # before normalisation
    axes[0].plot(it, [r[key] for r in rows], marker="o")
    axes[0].set_title(key)
    axes[1].plot(it, [r["kl/mean"] for r in rows], marker="o", color="tab:red")
    axes[1].set_title("kl/mean (per sequence)")
    axes[2].plot(it, [r.get("perf/gen_tokens_per_s", 0.0) for r in rows], marker="o", color="tab:green")
    axes[2].set_title("generation tokens/s")
    phases = sorted({k for r in rows for k in r if k.startswith("timing_s/") and k != "timing_s/iteration"})
    bottom = [0.0] * len(rows)
    for phase in phases:
        vals = [r.get(phase, 0.0) for r in rows]
        axes[3].bar(it, vals, bottom=bottom, label=phase.split("/", 1)[1])
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[3].set_title("seconds per phase")
    axes[3].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes:
        ax.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
