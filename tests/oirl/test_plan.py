"""What a config asks of a cluster, checked without launching anything, and the start-up check that the cluster
has it (issue 17, section 4): the engines' vLLM sizing from the config alone, and pinned node groups that no node
advertises failing at start-up instead of after the learner's placement timeout."""

import subprocess
from pathlib import Path

import pytest
from conftest import oirl_cmd, requires_loopback

from actors.rollout_worker import MAX_NUM_SEQS, engine_kwargs
from oirl.checkpoint import STORAGE_PROBE
from oirl.config import REPO_ROOT, load_config
from oirl.plan import engine_config, missing_node_groups


def _cfg(name, *overrides):
    return load_config(REPO_ROOT / "configs" / name, list(overrides), check_paths=False)


def _kwargs(cfg, window=None):
    return engine_kwargs(engine_config(cfg, window), "/models/policy", cfg.model.dtype, cfg.seed)


def test_engines_hold_the_prompt_and_response_budget_and_the_batch():
    gpu = _kwargs(_cfg("gpu.yaml"), window=32768)  # a 32k-context model: vLLM would otherwise reserve all of it
    assert gpu["max_model_len"] == 512 + 512  # data.max_prompt_tokens + rollout.max_new_tokens
    assert gpu["max_num_seqs"] == 64 // 2 * 8  # 64 prompts over 2 engines x 8 samples: one shard at once
    demo = _kwargs(_cfg("demo.yaml"))
    assert (demo["max_model_len"], demo["max_num_seqs"]) == (384 + 128, 8 * 4)
    uneven = _kwargs(_cfg("smoke.yaml", "data.prompts_per_iteration=5", "rollout.num_engines=2",
                          "rollout.samples_per_prompt=4", "learner.num_minibatches=1"))
    assert uneven["max_num_seqs"] == 3 * 4  # engine 0 gets prompts 0, 2, 4


def test_engine_sizing_is_capped_and_explicit_values_win():
    big = _kwargs(_cfg("gpu.yaml", "data.prompts_per_iteration=512"))
    assert big["max_num_seqs"] == MAX_NUM_SEQS == 1024
    explicit = _kwargs(_cfg("gpu.yaml", "rollout.max_num_seqs=48", "rollout.max_model_len=700"))
    assert (explicit["max_num_seqs"], explicit["max_model_len"]) == (48, 700)
    # A budget beyond the model's context window is cut to it (those tokens could not be generated anyway).
    assert _kwargs(_cfg("gpu.yaml"), window=800)["max_model_len"] == 800
    # A RolloutConfig built by hand (not resolved by the driver) leaves vLLM's own defaults.
    hand = engine_kwargs(_cfg("gpu.yaml").rollout, "/m", "bfloat16", 0)
    assert "max_model_len" not in hand and "max_num_seqs" not in hand


def test_missing_node_groups_names_each_short_resource():
    cfg = _cfg("gpu.yaml")  # pin_node_groups: true; 2 engines, 4 ranks, 1 reward actor
    assert missing_node_groups(cfg, {"CPU": 64.0, "GPU": 8.0}) == [
        "oirl_rollout (2 needed, 0 advertised)", "oirl_learner (4 needed, 0 advertised)",
        "oirl_reward (1 needed, 0 advertised)"]
    assert missing_node_groups(cfg, {"oirl_rollout": 1000.0, "oirl_learner": 3.0, "oirl_reward": 1000.0}) == [
        "oirl_learner (4 needed, 3 advertised)"]
    assert missing_node_groups(cfg, {"oirl_rollout": 2.0, "oirl_learner": 4.0, "oirl_reward": 1.0}) == []
    assert missing_node_groups(_cfg("gpu.yaml", "pin_node_groups=false"), {}) == []


@pytest.mark.slow
@requires_loopback
def test_pinned_groups_on_a_cluster_without_them_fail_at_start_up(tmp_path):
    """The smoke run with pin_node_groups=true on an embedded local cluster (one node, no oirl_* resources): a
    config error naming every missing resource and the fix, before any actor is spawned (the file the driver writes
    just before the learner ranks start is not there). Before the check the engine and the ranks waited for the
    resources until learner.timeout_s (30 minutes by default; 60 s here), then reported missing CPUs/GPUs."""
    out = tmp_path / "run"
    proc = subprocess.run([*oirl_cmd(), "train", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--out",
                           str(out), "--no-progress", "pin_node_groups=true", "learner.timeout_s=60",
                           "rollout.timeout_s=60"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    err = proc.stderr
    assert "pin_node_groups=true, but the Ray cluster does not advertise what the actors ask for: oirl_rollout (1 " \
           "needed, 0 advertised); oirl_learner (2 needed, 0 advertised); oirl_reward (1 needed, 0 advertised)" in err
    assert "--resources='{\"oirl_rollout\": 1000}'" in err and "set pin_node_groups=false" in err
    assert "placement group" not in err
    assert not Path(out / STORAGE_PROBE).exists()
