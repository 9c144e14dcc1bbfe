"""End to end: `oirl train --config configs/agent_smoke.yaml` (real Ray, vLLM, DeepSpeed): multi-turn episodes with
tool calls train under every check; the tool-call rate rises; the same run without the loss mask is stopped."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import oirl_cmd, requires_loopback

from oirl.config import REPO_ROOT

AGENT = str(REPO_ROOT / "configs" / "agent_smoke.yaml")
LEARN_ITERS = 16


def train(out: Path, *overrides: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [*oirl_cmd(), "train", "--config", AGENT, "--out", str(out), "--no-progress", *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("agent")
    proc = train(out, f"iterations={LEARN_ITERS}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.slow
@requires_loopback
def test_multi_turn_episodes_train_under_every_check(learning_run):
    rows = metrics(learning_run)
    assert [r["iteration"] for r in rows] == list(range(LEARN_ITERS))
    for r in rows:
        assert r["rollout/on_policy_checked"] == 1.0  # every policy token of every turn compared, and passed
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == r["iteration"]
        assert r["rollout/policy_tokens_mean"] > 0 and r["reward/raw_mean"] == pytest.approx(
            r["rollout/env_reward_mean"], abs=1e-6)  # reward.kind=none: the environment's rewards alone
    assert max(r["rollout/turns_mean"] for r in rows[:3]) > 1.0
    assert sum(r["rollout/tool_calls_mean"] for r in rows[:3]) > 0
    assert all(r["rollout/env_tokens_mean"] > 0 for r in rows if r["rollout/turns_mean"] > 1)
    assert (learning_run / "final" / "config.json").is_file()


@pytest.mark.slow
@requires_loopback
def test_the_tool_call_rate_rises(learning_run):
    """call_bonus rewards each turn that calls the tool: the rate of calls (and so the reward) must rise beyond its
    spread over the first iterations."""
    rows = metrics(learning_run)
    first = [r["rollout/tool_calls_mean"] for r in rows[:4]]
    last = [r["rollout/tool_calls_mean"] for r in rows[-4:]]
    spread = max(first) - min(first)
    assert sum(last) / 4 > max(first) + spread, (first, last)
    assert sum(r["rollout/turns_mean"] for r in rows[-4:]) > sum(r["rollout/turns_mean"] for r in rows[:4])


@pytest.mark.slow
@requires_loopback
def test_without_the_loss_mask_the_on_policy_check_stops_the_run(tmp_path):
    """OIRL_FAULT=no-loss-mask: the learner takes the environment's tokens for the policy's, as a trainer without
    the mask would; the engine never sampled them, so the on-policy check must refuse the batch."""
    proc = train(tmp_path, "iterations=2", env={"OIRL_FAULT": "no-loss-mask"})
    assert proc.returncode != 0
    assert "on-policy check failed" in proc.stderr, proc.stderr[-3000:]
