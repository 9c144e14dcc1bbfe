"""Run metrics: one JSON object per iteration in metrics.jsonl, the same scalars in the trackers that
logging.backends names (TensorBoard, Weights & Biases, MLflow), and a PNG of the reward / KL / throughput curves at
the end.

Every tracker gets each numeric metric of a row with step = the row's iteration; W&B and MLflow also get the run's
config (nested for W&B, flattened to 'learner.lr'-style parameters for MLflow). Nothing leaves the machine unless the
user asks: W&B runs offline under --out/wandb (logging.wandb_mode), MLflow writes a SQLite store under --out/mlflow
(logging.mlflow_tracking_uri), and MLflow's usage telemetry is off unless MLFLOW_DISABLE_TELEMETRY says otherwise.

--resume continues the same tracker run: W&B's run id and MLflow's are kept in --out (wandb/run_id, mlflow/run_id).
The iterations a resumed run redoes (logged by the process that died after its last checkpoint) are logged again:
TensorBoard hides the earlier points (purge_step); MLflow keeps both, the resumed run's with the later timestamp;
offline W&B writes them into a new offline-run folder of the same run id (when synced, W&B keeps a step's first value).
A run that stops on an error is closed as failed (MLflow status FAILED, W&B exit code 1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from oirl.config import LoggingConfig

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


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row, without its iteration (the step)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'learner': {'lr': 0.003}} -> {'learner.lr': '0.003'}: the config as MLflow parameters."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None \
                else str(value)
    return out


def _run_id(path: Path, resume: bool, new_id: str) -> str:
    """The tracker run id kept in ``path``: reused by a resumed run, else ``new_id`` (written there)."""
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_id + "\n")
    return new_id


class WandbTracker:
    """One W&B run per oirl run, offline by default: files under out/wandb, the id in out/wandb/run_id."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, config: dict[str, Any], resume: bool):
        if cfg.wandb_mode == "offline":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # crash reports would go to W&B's servers
        import wandb

        run_id = _run_id(out_dir / "wandb" / "run_id", resume, uuid.uuid4().hex[:12])
        self.run = wandb.init(project=cfg.project, name=cfg.run_name or out_dir.resolve().name, id=run_id,
                              resume="allow", dir=str(out_dir), mode=cfg.wandb_mode, config=config,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      save_code=False, disable_git=True))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["iteration"]))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """One MLflow run per oirl run, in a SQLite store under out/mlflow unless logging.mlflow_tracking_uri names one;
    its id in out/mlflow/run_id."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, config: dict[str, Any], resume: bool):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # usage reports would leave the machine
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = out_dir.resolve() / "mlflow"
        local.mkdir(parents=True, exist_ok=True)
        uri = cfg.mlflow_tracking_uri or f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.project)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            cfg.project, artifact_location=(local / "artifacts").as_uri() if not cfg.mlflow_tracking_uri else None)
        id_file = local / "run_id"
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return  # parameters are set once: MLflow refuses to change one (a resume may change only RESUMABLE)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or out_dir.resolve().name)
        self.run_id = _run_id(id_file, False, run.info.run_id)
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row["iteration"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(row).items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MetricsLogger:
    def __init__(self, out_dir: Path, start_iteration: int = 0, restored_row: dict[str, Any] | None = None,
                 logging_cfg: LoggingConfig | None = None, config: dict[str, Any] | None = None):
        """A resumed run (start_iteration > 0) rewrites the iterations after its checkpoint: rows before it are
        kept, and ``restored_row`` (the committed checkpoint's copy of row start_iteration - 1) fills in that row
        when the driver died between committing the checkpoint and logging it. ``logging_cfg`` names the trackers
        (default: TensorBoard alone); ``config``, the run's config as a dict, is given to W&B and MLflow."""
        logging_cfg = logging_cfg or LoggingConfig()
        backends = logging_cfg.backend_list()
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
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard's own resume: points at steps >= purge_step that an earlier process wrote (the rows
                # this run redoes, and a restored row it may have logged before it died) are hidden, not shown twice.
                purge = restored_row["iteration"] if missing else start_iteration
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge if start_iteration else None)
            except ImportError:  # tensorboard is a declared dependency; keep running if a user removed it
                logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        resume = start_iteration > 0
        self.closed = False
        self.trackers: list[WandbTracker | MlflowTracker] = []
        if "wandb" in backends:
            self.trackers.append(WandbTracker(out_dir, logging_cfg, config or {}, resume))
        if "mlflow" in backends:
            self.trackers.append(MlflowTracker(out_dir, logging_cfg, config or {}, resume))
        if missing:
            self._trackers(restored_row)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._trackers(metrics)

    def _trackers(self, metrics: dict[str, Any]) -> None:
        if self.tb is not None:
            self._tensorboard(metrics)
        for tracker in self.trackers:
            tracker.log(metrics)

    def _tensorboard(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["iteration"])
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "iteration":
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker; ``failed``: the run stopped on an error (MLflow's run is marked FAILED,
        W&B's gets exit code 1). A second call does nothing, so the driver may call it again on its way out."""
        if self.closed:
            return
        self.closed = True
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception:  # closing must not hide the error that ended the run
                if not failed:
                    raise
                logger.warning("could not close the %s run", type(tracker).__name__, exc_info=True)


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
