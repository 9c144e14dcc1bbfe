"""`oirl submit` for real: a Ray head started with `ray start --head` inside the loopback-only namespace, then
the smoke recipe submitted as a job that SUCCEEDS, a bad job reported FAILED (exit 1, with its log), and a job past
`--timeout` stopped on the cluster (exit 3)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import requires_loopback

from oirl.config import REPO_ROOT

pytestmark = [pytest.mark.slow, requires_loopback]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp_dir = f"/tmp/oirl-head-{os.getpid()}"
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    # Ray renames its processes (setproctitle), so mark them through the environment they inherit.
    head_env = dict(env, OIRL_TEST_RAY_HEAD=temp_dir)
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=4",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=head_env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        # The job API answers before the head's job agent is up ("No available agent"): wait until a trivial
        # job really runs.
        deadline = time.time() + 180
        while True:
            try:
                client = JobSubmissionClient(address)
                probe = client.submit_job(entrypoint="true")
                while str(getattr(s := client.get_job_status(probe), "value", s)) not in ("SUCCEEDED", "FAILED"):
                    assert time.time() < deadline, "probe job did not finish"
                    time.sleep(0.5)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield address, env
    finally:
        # Never `ray stop` (it kills every Ray process on the machine): stop only what this head started.
        procs = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("OIRL_TEST_RAY_HEAD") == temp_dir:
                    procs.append(p)
                    procs.extend(p.children(recursive=True))  # agents get a cleaned environment
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        procs = list({p.pid: p for p in procs}.values())
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            p.kill()


def job_status(address, env, job_id):
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    return str(getattr(status, "value", status))


def test_smoke_job_succeeds(head, tmp_path):
    address, env = head
    out = tmp_path / "job-out"
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "submit", "--address", address, "--config",
                           "configs/smoke.yaml", "--out", str(out), "--working-dir", str(REPO_ROOT),
                           "--timeout", "600", "--auto-resume", "iterations=3"],  # a fresh --out: it starts
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCEEDED" in proc.stdout and "--no-progress --auto-resume iterations=3" in proc.stdout
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3


def oirl_submit(address, env, out, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "oirl.cli", "submit", "--address", address, "--config",
                           "configs/smoke.yaml", "--out", str(out), "--working-dir", str(REPO_ROOT), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_failing_job_is_reported_failed_with_its_log(head, tmp_path):
    """`oirl submit` waits, sees the job FAILED, exits 1 and prints the end of the job's log (the reason)."""
    address, env = head
    proc = oirl_submit(address, env, tmp_path, "--timeout", "240", "learner.zero_stage=9")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job_id = re.search(r"raysubmit_\w+", proc.stdout).group(0)
    assert f"oirl: job {job_id} FAILED" in proc.stdout
    assert job_status(address, env, job_id) == "FAILED"
    assert "learner.zero_stage=9 must be 0, 1, 2 or 3" in proc.stderr


def test_a_job_past_the_timeout_is_stopped(head, tmp_path):
    """`oirl submit --timeout`: a job still running when it runs out is stopped on the cluster, exit code 3."""
    address, env = head
    proc = oirl_submit(address, env, tmp_path, "--timeout", "8", "iterations=1000")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    job_id = re.search(r"raysubmit_\w+", proc.stdout).group(0)
    assert f"oirl: job {job_id} still" in proc.stderr and "after 8.0s; stopping it" in proc.stderr
    deadline = time.time() + 90
    while (status := job_status(address, env, job_id)) != "STOPPED":
        assert time.time() < deadline, f"job still {status} after oirl submit stopped it"
        time.sleep(1)
