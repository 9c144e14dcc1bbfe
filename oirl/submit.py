"""`oirl submit`: run `oirl train` as a Ray job on a running cluster (a local head or a remote one reached through
``kubectl port-forward svc/oirl-head-svc 8265``), with the image's code or an uploaded working directory.

It is `ray job submit` with the entrypoint filled in and a bounded wait; the README has the raw recipe.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time

logger = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit(address: str, config: str, out: str, overrides: list[str], working_dir: str | None, wait: bool,
           timeout_s: float) -> int:
    from ray.job_submission import JobSubmissionClient

    entrypoint = shlex.join(["oirl", "train", "--config", config, "--out", out, "--no-progress", *overrides])
    runtime_env = {"working_dir": working_dir, "excludes": [".git", "runs", "*.egg-info"]} if working_dir else None
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"oirl: submitted {job_id}: {entrypoint}")
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while str(status.value if hasattr(status, "value") else status) not in TERMINAL:
        if time.monotonic() > deadline:
            print(f"oirl: job {job_id} still {status} after {timeout_s}s; stopping it", file=sys.stderr)
            client.stop_job(job_id)
            return 3
        time.sleep(2)
        status = client.get_job_status(job_id)
    final = str(status.value if hasattr(status, "value") else status)
    print(f"oirl: job {job_id} {final}")
    if final != "SUCCEEDED":
        print(client.get_job_logs(job_id)[-4000:], file=sys.stderr)
        return 1
    return 0
