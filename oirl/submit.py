"""`oirl submit`: run `oirl train` as a Ray job on a running cluster (a local head or a remote one reached through
``kubectl port-forward svc/oirl-head-svc 8265``), with the image's code or an uploaded working directory.

It is `ray job submit` with the entrypoint filled in and a bounded wait; the README has the raw recipe.

No secret goes into the entrypoint: Ray stores it and shows it to everyone who can list jobs (`ray job list`, the
dashboard). Overrides that would carry one (a key naming a token, secret, password or key, other than the
``*_env``/``*_file`` fields that name where a secret lives) are refused before anything is sent. A reward server's
token reaches the reward actor through the environment variable named by ``reward.url_token_env`` or the file
``reward.url_token_file``, e.g. a Kubernetes Secret mounted into the worker pods.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import time

logger = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def secret_overrides(overrides: list[str]) -> list[str]:
    """Dotted keys of the overrides that would put a secret value on the job's command line."""
    from oirl.config import parse_overrides

    secrets = []
    for key in _flat_keys(parse_overrides(overrides)):
        words = re.split(r"[._-]", key.lower())  # word by word: 'max_new_tokens' is no secret
        named = bool(_SECRET_WORDS & set(words)) or "api_key" in key.lower()
        if named and words[-1] not in ("env", "file"):  # a variable's name or a file's path is not the secret
            secrets.append(key)
    return secrets


def build_entrypoint(config: str, out: str, overrides: list[str], resume: list[str] | None = None) -> str:
    """The job's command line; raises ValueError (naming the key, never the value) for a secret override."""
    secrets = secret_overrides(overrides)
    if secrets:
        raise ValueError(
            f"refusing to put {', '.join(secrets)} on the job's command line: Ray stores a job's entrypoint and shows "
            "it to everyone who can list jobs. Give a reward server's token to the reward actor through the "
            "environment variable named by reward.url_token_env (default OIRL_REWARD_TOKEN) or a file "
            "(reward.url_token_file), e.g. a Kubernetes Secret mounted into the worker pods")
    return shlex.join(["oirl", "train", "--config", config, "--out", out, "--no-progress", *(resume or []),
                       *overrides])


def submit(address: str, config: str, out: str, overrides: list[str], working_dir: str | None, wait: bool,
           timeout_s: float, resume: list[str] | None = None) -> int:
    from ray.job_submission import JobSubmissionClient

    try:
        entrypoint = build_entrypoint(config, out, overrides, resume)
    except ValueError as e:  # a secret override, or a malformed one (ConfigError)
        print(f"oirl: {e}", file=sys.stderr)
        return 2
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
