"""The pieces that make a kill -9 harmless, without Ray: the OIRL_FAULT switch, the driver's atomic checkpoint
commit, the metrics log that a resume repairs, and the /dev/shm cleanup that tells dead runs from live ones."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from oirl import checkpoint, faults
from oirl.metrics import MetricsLogger
from oirl.weights import clean_stale_shm


def test_fault_spec_is_parsed_strictly():
    assert faults.parse("kill:sync:1, kill-actor:engine:2") == [faults.Fault("kill", "sync", 1),
                                                                faults.Fault("kill-actor", "engine", 2)]
    for bad in ("kill:teleport:1", "kill:sync", "kill-actor:sync:1", "explode:sync:1", "kill:sync:x"):
        with pytest.raises(ValueError, match="OIRL_FAULT"):
            faults.parse(bad)


def test_a_fault_fires_once_per_output_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("OIRL_FAULT", "kill-actor:reward:3")
    faults.configure(tmp_path)
    assert not faults.actor_to_kill("reward", 2) and not faults.actor_to_kill("engine", 3)
    assert faults.actor_to_kill("reward", 3)
    assert not faults.actor_to_kill("reward", 3), "a resumed run must run through the fault that killed it"
    assert json.loads((tmp_path / "faults_fired.json").read_text()) == ["kill-actor:reward:3"]


def test_fault_point_kills_the_process_with_sigkill(tmp_path):
    code = ("import sys; from oirl import faults; faults.configure(sys.argv[1]); faults.point('update', 1); "
            "faults.point('update', 2); print('survived')")
    env = dict(os.environ, OIRL_FAULT="kill:update:2")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout


def test_commit_is_what_resume_reads_and_prune_keeps_the_newest(tmp_path):
    assert checkpoint.read_commit(tmp_path) is None
    for k in (1, 2, 3, 4):
        (tmp_path / f"iter_{k:06d}").mkdir()
    (tmp_path / "latest").write_text("iter_000004")  # DeepSpeed's pointer: never trusted
    checkpoint.commit(tmp_path, "iter_000003", {"iteration": 3, "data": {"cursor": 24}})
    assert checkpoint.read_commit(tmp_path) == {"tag": "iter_000003", "iteration": 3, "data": {"cursor": 24}}
    assert checkpoint.prune(tmp_path, 2, "iter_000003") == ["iter_000001"]
    # iter_000004 is newer than the commit (an unfinished save): kept, and never read.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_000002", "iter_000003", "iter_000004"]
    (tmp_path / "iter_000003").rmdir()
    with pytest.raises(FileNotFoundError, match="iter_000003"):
        checkpoint.read_commit(tmp_path)


def test_metrics_log_restores_the_row_a_kill_lost_and_drops_rows_to_redo(tmp_path):
    rows = [{"iteration": i, "reward/mean": i / 10} for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"iteration": 2, "rew')
    # Committed after iteration 2 (resume at 3), killed before row 2 was complete; rows 3, 4 never happened.
    log = MetricsLogger(tmp_path, start_iteration=3, restored_row=rows[2])
    log.log(rows[3])
    log.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == rows[:4]
    # A resume from an earlier checkpoint rewrites the rows after it.
    MetricsLogger(tmp_path, start_iteration=1, restored_row=rows[0]).close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:1]


def tensorboard_points(out, tag="reward/mean"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_iteration_once_after_a_resume(tmp_path):
    """A run logs iterations 0-3 and dies; resumed from the checkpoint after iteration 1 it redoes 2 and 3 with
    other values. TensorBoard must show one point per iteration, the resumed run's (was: 2 and 3 twice)."""
    first = MetricsLogger(tmp_path)
    for i in range(4):
        first.log({"iteration": i, "reward/mean": i / 10})
    first.close()
    resumed = MetricsLogger(tmp_path, start_iteration=2, restored_row={"iteration": 1, "reward/mean": 0.1})
    for i in (2, 3):
        resumed.log({"iteration": i, "reward/mean": 1 + i})
    resumed.close()
    assert tensorboard_points(tmp_path) == [(0, 0.0), (1, 0.1), (2, 3.0), (3, 4.0)]


def test_tensorboard_gets_the_restored_row_a_kill_lost(tmp_path):
    first = MetricsLogger(tmp_path)
    first.log({"iteration": 0, "reward/mean": 0.0})
    first.close()  # committed after iteration 1, killed before its row was logged
    resumed = MetricsLogger(tmp_path, start_iteration=2, restored_row={"iteration": 1, "reward/mean": 0.5})
    resumed.log({"iteration": 2, "reward/mean": 0.7})
    resumed.close()
    assert tensorboard_points(tmp_path) == [(0, 0.0), (1, 0.5), (2, 0.7)]


HOLDER = """
import sys, time
from oirl.weights import claim_shm, shm_bucket_path
fd = claim_shm(sys.argv[1], sys.argv[2])
open(shm_bucket_path(sys.argv[1], sys.argv[2], 1, 0), "wb").write(b"x" * 64)
print("ready", flush=True)
time.sleep(600)
"""


def test_stale_shm_files_of_dead_runs_go_live_ones_stay(tmp_path):
    procs = {}
    for run in ("aaaalive", "bbbbdead"):
        procs[run] = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), run], stdout=subprocess.PIPE,
                                      text=True)
        assert procs[run].stdout.readline().strip() == "ready"
    (tmp_path / "oirl-ccorphan-v3-b0.bin").write_bytes(b"y")  # no lock at all: an older, dead run
    try:
        procs["bbbbdead"].send_signal(signal.SIGKILL)  # no cleanup of its own
        procs["bbbbdead"].wait(timeout=30)
        before = sorted(p.name for p in tmp_path.iterdir())
        assert "oirl-bbbbdead-v1-b0.bin" in before and "oirl-bbbbdead.lock" in before
        removed = clean_stale_shm(str(tmp_path), own_run_id="dddd0own")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == ["oirl-aaaalive-v1-b0.bin", "oirl-aaaalive.lock"], left
        assert sorted(os.path.basename(p) for p in removed) == ["oirl-bbbbdead-v1-b0.bin", "oirl-bbbbdead.lock",
                                                                "oirl-ccorphan-v3-b0.bin"]
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=30)
    time.sleep(0.1)
    clean_stale_shm(str(tmp_path))  # the live one is dead now: everything goes
    assert not list(tmp_path.iterdir())


FULL_DISK_SAVE = """
import sys, types, torch
from learner.learner_worker import LearnerWorker

def deepspeed_like_save(directory, tag, save_latest):  # what DeepSpeed's checkpoint engine does: torch.save
    import os
    os.makedirs(f"{directory}/{tag}", exist_ok=True)
    torch.save({"module": torch.zeros(1_000_000)}, f"{directory}/{tag}/mp_rank_00_model_states.pt")

worker = types.SimpleNamespace(rank=1, critic=None, engine=types.SimpleNamespace(save_checkpoint=deepspeed_like_save))
try:
    LearnerWorker.save_checkpoint(worker, sys.argv[1], "iter_000005")
except OSError as e:
    print(e)
"""


def test_a_checkpoint_write_on_a_full_disk_names_the_directory_and_the_space(tmp_path):
    """A 1 MiB tmpfs (private mount namespace) and a 4 MB save: torch.save's own error is a zip-container position
    mismatch; the learner's error says which rank, which checkpoint and directory, and that the filesystem is full."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "--mount", "bash", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace with tmpfs here: {probe.stderr.decode().strip()}")
    script = f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} -c \"$0\" {mnt}/checkpoints"
    proc = subprocess.run(["unshare", "--mount", "bash", "-c", script, FULL_DISK_SAVE], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = proc.stdout
    assert f"learner rank 1: writing checkpoint iter_000005 under {mnt}/checkpoints failed" in msg, msg
    assert "GiB free of 0 GiB" in msg and "it is full" in msg and "checkpoint_keep" in msg, msg


def test_save_failure_reports_the_space_of_the_nearest_existing_directory(tmp_path):
    msg = checkpoint.save_failure(tmp_path / "not" / "yet", "iter_1", OSError(28, "No space left on device"))
    assert f"under {tmp_path}/not/yet failed (OSError: [Errno 28] No space left on device)" in msg
    assert f"on the filesystem of {tmp_path}" in msg


# ---- --out on shared storage: every learner rank sees the file the driver wrote there --------------------------


def test_a_rank_that_does_not_see_the_drivers_file_names_itself_and_its_node(tmp_path):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    probe = checkpoint.write_storage_probe(out, "run-a")
    assert probe == out / checkpoint.STORAGE_PROBE and probe.read_text() == "run-a"
    checkpoint.check_storage_probe(str(probe), "run-a", rank=0)  # the driver's file, this run's id: passes
    # A rank whose --out is another directory (a node's local disk): the driver's file is not there.
    elsewhere = tmp_path / "node-local" / checkpoint.STORAGE_PROBE
    with pytest.raises(RuntimeError, match=rf"learner rank 3 on node {socket.gethostname()} does not see the file "
                                           rf"the driver wrote under --out: {elsewhere} does not exist there"):
        checkpoint.check_storage_probe(str(elsewhere), "run-a", rank=3)
    # The same path holding an earlier run's file (a local directory that a previous run wrote): not this run's.
    with pytest.raises(RuntimeError, match=r"learner rank 1 .* holds another run's id \('run-a', not 'run-b'\).*"
                                           r"ReadWriteMany claim oirl-checkpoints"):
        checkpoint.check_storage_probe(str(probe), "run-b", rank=1)
