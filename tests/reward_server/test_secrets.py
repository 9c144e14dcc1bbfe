"""The reward server's token is never a config value: it is never written (out/config.json comes from
cfg.to_dict()), printed (`oirl show-config`) or put into a job's entrypoint (`oirl submit`)."""

import json
import os
import subprocess
import sys

import pytest

from oirl.config import REPO_ROOT, ConfigError, load_config
from oirl.submit import build_entrypoint, secret_overrides, submit

SECRET = "sk-Very5ecretValue"


def test_a_token_in_the_config_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"reward.url_token={SECRET}"], check_paths=False)
    assert "reward.url_token" in str(e.value) and "reward.url_token_env" in str(e.value)
    assert SECRET not in str(e.value)


def test_url_token_env_must_name_a_variable_not_hold_the_token():
    with pytest.raises(ConfigError, match="NAME of an environment variable") as e:
        load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"reward.url_token_env={SECRET}"], check_paths=False)
    assert SECRET not in str(e.value)
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["reward.url_token_env=MY_TOKEN_2"], check_paths=False)
    assert cfg.reward.url_token_env == "MY_TOKEN_2"


def test_config_dict_and_show_config_hold_no_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    overrides = ["reward.url=http://127.0.0.1:9", f"reward.url_token_file={token_file}"]
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", overrides, check_paths=False)
    written = json.dumps(cfg.to_dict())  # what the driver writes to out/config.json
    assert SECRET not in written and "url_token" not in cfg.to_dict()["reward"]
    assert cfg.to_dict()["reward"]["url_token_env"] == "OIRL_REWARD_TOKEN"
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "show-config", "--config", "configs/smoke.yaml",
                           *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OIRL_REWARD_TOKEN=SECRET))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["reward"]["url_token_file"] == str(token_file)


@pytest.mark.parametrize("overrides, refused", [
    ([f"reward.url_token={SECRET}"], ["reward.url_token"]),
    (["--reward.url_token", SECRET], ["reward.url_token"]),
    ([f"reward.api_key={SECRET}", "learner.lr=1e-6"], ["reward.api_key"]),
    ([f"foo.password={SECRET}"], ["foo.password"]),
    (["rollout.max_new_tokens=64", "data.max_prompt_tokens=128", "reward.url_token_env=MY_TOKEN",
      "reward.url_token_file=/var/run/secrets/oirl/token"], []),
])
def test_secret_overrides_are_found_by_key(overrides, refused):
    assert secret_overrides(overrides) == refused


class RecordingClient:
    """Stands in for Ray's JobSubmissionClient: records what would be sent to the cluster."""

    created: list = []
    submitted: list = []

    def __init__(self, address):
        RecordingClient.created.append(address)

    def submit_job(self, entrypoint, runtime_env=None):
        RecordingClient.submitted.append((entrypoint, runtime_env))
        return "raysubmit_test"


def test_submit_refuses_a_token_before_contacting_the_cluster(monkeypatch, capsys):
    import ray.job_submission

    RecordingClient.created, RecordingClient.submitted = [], []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RecordingClient)
    rc = submit("http://127.0.0.1:8265", "configs/gpu.yaml", "/checkpoints/x", [f"reward.url_token={SECRET}"], None,
                False, 10)
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to put reward.url_token on the job's command line" in err
    assert "reward.url_token_env" in err and SECRET not in err
    assert RecordingClient.created == [] and RecordingClient.submitted == []


def test_submit_entrypoint_has_no_secret(monkeypatch, capsys):
    import ray.job_submission

    RecordingClient.created, RecordingClient.submitted = [], []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", RecordingClient)
    monkeypatch.setenv("OIRL_REWARD_TOKEN", SECRET)
    overrides = ["reward.url=http://reward:8000", "reward.url_token_file=/var/run/secrets/oirl/token"]
    assert submit("http://127.0.0.1:8265", "configs/gpu.yaml", "/checkpoints/x", overrides, None, False, 10) == 0
    (entrypoint, runtime_env), = RecordingClient.submitted
    assert entrypoint == build_entrypoint("configs/gpu.yaml", "/checkpoints/x", overrides)
    assert entrypoint.startswith("oirl train --config configs/gpu.yaml") and SECRET not in entrypoint
    assert SECRET not in json.dumps(runtime_env) and SECRET not in capsys.readouterr().out
