"""Weights & Biases and MLflow beside TensorBoard (logging.backends), offline: W&B in offline mode under --out/wandb,
MLflow in a SQLite store under --out/mlflow. Each test reads back what the tracker stored (W&B's run files, MLflow's
own client) and compares it with the rows oirl wrote to metrics.jsonl, through a resume; one runs `oirl train`."""

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oirl.config import REPO_ROOT, ConfigError, load_config
from oirl.metrics import MetricsLogger, read_metrics

pytest.importorskip("wandb", reason="W&B is the 'wandb' extra, installed by deploy/setup.sh (pip install '.[dev]')")
pytest.importorskip("mlflow", reason="MLflow is the 'mlflow' extra, installed by deploy/setup.sh")


# ---- reading back what each tracker stored ----------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-<id>.wandb). Its framing is LevelDB's log format after a 7-byte
    header: 32 KiB blocks of chunks, each [crc32c:4][length:2][type:1][data] (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_folders(out: Path, run_id: str) -> list[Path]:
    """The offline run folders of ``run_id``, oldest first: offline-run-<time>-<id>, and -<id>-<n> when a second
    process started within the same second."""
    def order(folder: Path):
        stamp, _, rest = folder.name[len("offline-run-"):].partition("-")
        return stamp, int(rest[len(run_id) + 1:] or 0)

    return sorted((f for f in (out / "wandb").glob(f"offline-run-*-{run_id}*") if f.is_dir()), key=order)


def wandb_readback(out: Path):
    """(run id, config, {step: {metric: value}}, number of run files) of the W&B run in out: every offline run
    folder of its id, oldest first, so a step a resumed run logged again takes the resumed run's values."""
    run_id = (out / "wandb" / "run_id").read_text().strip()
    folders = wandb_folders(out, run_id)
    config, steps = {}, {}
    for folder in folders:
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"})
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                steps[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, steps, len(folders)


def mlflow_readback(out: Path):
    """(run id, params, {step: {metric: value}}, runs in the experiment) from MLflow's own client; where a step
    holds several points (a resume logged it again), the latest."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("oirl")
    runs = client.search_runs([experiment.experiment_id])
    run_id = (out / "mlflow" / "run_id").read_text().strip()
    run = client.get_run(run_id)
    steps: dict[int, dict[str, tuple[int, float]]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            point = steps.setdefault(m.step, {})
            if key not in point or m.timestamp >= point[key][0]:
                point[key] = (m.timestamp, m.value)
    return run_id, run.data.params, {s: {k: v for k, (_, v) in p.items()} for s, p in steps.items()}, len(runs)


def expected_steps(out: Path):
    """What oirl computed: the numeric metrics of each row of the run's own metrics.jsonl, by iteration."""
    return {r["iteration"]: {k: float(v) for k, v in r.items() if k != "iteration" and isinstance(v, (int, float))}
            for r in read_metrics(out / "metrics.jsonl")}


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for key, value in want[step].items():
            assert (math.isnan(value) and math.isnan(got[step][key])) or got[step][key] == pytest.approx(value), \
                (step, key, got[step][key], value)


def leaves(tree):
    return sum(leaves(v) if isinstance(v, dict) else 1 for v in tree.values())


def rows(seed, iterations):
    rng = np.random.default_rng(seed)
    return [{"iteration": i, "reward/mean": float(rng.normal()), "kl/mean": float(rng.random()),
             "rollout/samples": int(rng.integers(1, 99)), "timing_s/generate": float(rng.random()),
             "rollout/on_policy_checked": float("nan") if i == 1 else 1.0} for i in iterations]


# ---- the metrics writer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_tracker_holds_the_config_and_every_metric_through_a_resume(tmp_path, backend, monkeypatch):
    """A run logs iterations 0-3 and dies; resumed from its checkpoint after iteration 1, it logs 2-4 again with
    other values. The tracker's run (the same one) ends holding, per iteration, what metrics.jsonl holds."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config("configs/smoke.yaml", [f"logging.backends=tensorboard,{backend}"])
    first = MetricsLogger(tmp_path, 0, None, cfg.logging, cfg.to_dict())
    for row in rows(0, range(4)):
        first.log(row)
    first.close()
    read = wandb_readback if backend == "wandb" else mlflow_readback
    run_id, config, steps, count = read(tmp_path)
    assert count == 1
    assert_same(steps, expected_steps(tmp_path))
    resumed = MetricsLogger(tmp_path, 2, read_metrics(tmp_path / "metrics.jsonl")[1], cfg.logging, cfg.to_dict())
    for row in rows(1, range(2, 5)):
        resumed.log(row)
    resumed.close()
    again, config, steps, count = read(tmp_path)
    assert again == run_id
    want = expected_steps(tmp_path)
    assert want[3] != {k: float(v) for k, v in rows(0, [3])[0].items() if k != "iteration"}  # values changed
    assert_same(steps, want)
    if backend == "wandb":
        assert count == 2  # the resumed process wrote its own offline folder of the same run
        assert config == json.loads(json.dumps(cfg.to_dict()))
    else:
        assert count == 1  # one MLflow run, continued
        assert config["learner.lr"] == str(cfg.learner.lr) and config["model.path"] == "tiny"
        assert config["logging.backends"] == f"tensorboard,{backend}"
        assert len(config) == leaves(cfg.to_dict())


def test_a_fresh_run_in_the_same_folder_starts_a_new_tracker_run(tmp_path):
    """Without --resume (start_iteration 0: the run died before its first checkpoint, or starts over) the tracker
    gets a new run; only a resume continues the old one."""
    cfg = load_config("configs/smoke.yaml", ["logging.backends=wandb"])
    ids = []
    for _ in range(2):
        log = MetricsLogger(tmp_path, 0, None, cfg.logging, cfg.to_dict())
        log.log(rows(0, [0])[0])
        log.close()
        ids.append((tmp_path / "wandb" / "run_id").read_text().strip())
    assert ids[0] != ids[1]


def test_a_run_that_failed_is_marked_so_and_its_resume_finishes_it(tmp_path):
    """The driver closes the trackers with failed=True on its way out of an error: MLflow's run is FAILED (not left
    RUNNING for ever) and W&B's has exit code 1; the resumed run ends FINISHED, exit code 0."""
    from mlflow.tracking import MlflowClient

    cfg = load_config("configs/smoke.yaml", ["logging.backends=wandb,mlflow"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}")

    def states():
        run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
        newest = wandb_folders(tmp_path, run_id)[-1]
        exits = [r.exit.exit_code for r in wandb_records(newest / f"run-{run_id}.wandb")
                 if r.WhichOneof("record_type") == "exit"]
        return client.get_run((tmp_path / "mlflow" / "run_id").read_text().strip()).info.status, exits

    log = MetricsLogger(tmp_path, 0, None, cfg.logging, cfg.to_dict())
    log.log(rows(0, [0])[0])
    log.close(failed=True)
    log.close(failed=True)  # the driver's second call on its way out does nothing
    assert states() == ("FAILED", [1])
    log = MetricsLogger(tmp_path, 1, None, cfg.logging, cfg.to_dict())
    log.log(rows(0, [1])[0])
    log.close()
    log.close(failed=True)  # after a clean close, the driver's call on its way out changes nothing
    assert states() == ("FINISHED", [0])


def test_only_the_named_backends_are_written(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["logging.backends="])
    log = MetricsLogger(tmp_path, 0, None, cfg.logging, cfg.to_dict())
    log.log(rows(0, [0])[0])
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, module, extra", [("wandb", "wandb", "oirl[wandb]"), ("mlflow", "mlflow", "oirl[mlflow]"),
                                                    ("mlflow", "sqlalchemy", "oirl[mlflow]")])
def test_a_tracker_whose_package_is_missing_is_a_config_error_naming_the_extra(monkeypatch, backend, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module that cannot be imported
    with pytest.raises(ConfigError, match=re.escape(f"logging.backends includes {backend}, but the package {module} "
                                                    f"is not installed; install it with `pip install '{extra}'`")):
        load_config("configs/smoke.yaml", [f"logging.backends=tensorboard,{backend}"])
    # A config meant for another machine (oirl plan) is not checked against this one's packages.
    assert load_config("configs/smoke.yaml", [f"logging.backends={backend}"], check_paths=False)


@pytest.mark.parametrize("override, fragment", [
    ("logging.backends=tensorboard,neptune", "logging.backends='tensorboard,neptune': unknown tracker 'neptune'"),
    ("logging.backends=mlflow,mlflow", "names a tracker twice"),
    ("logging.wandb_mode=disabled", "logging.wandb_mode='disabled' must be 'offline'"),
])
def test_logging_settings_are_checked(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/smoke.yaml", [override])


# ---- the real CLI -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_oirl_train_logs_to_wandb_and_mlflow(tmp_path):
    """`oirl train` on configs/smoke.yaml with every tracker: W&B's and MLflow's runs hold each iteration's metrics
    as metrics.jsonl has them, and the config."""
    if os.environ.get("OIRL_IN_LOOPBACK_NS") != "1":
        pytest.skip("starts Ray: run under deploy/loopback.sh")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "train", "--config", "configs/smoke.yaml", "--out",
                           str(out), "--no-progress", "iterations=2", "logging.backends=tensorboard,wandb,mlflow"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = expected_steps(out)
    assert sorted(want) == [0, 1] and len(want[0]) > 20
    _, config, steps, _ = wandb_readback(out)
    assert_same(steps, want)
    assert config["learner"]["lr"] == 0.003 and config["logging"]["backends"] == "tensorboard,wandb,mlflow"
    _, params, steps, _ = mlflow_readback(out)
    assert_same(steps, want)
    assert params["learner.lr"] == "0.003"
