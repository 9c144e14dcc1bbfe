"""`oirl bench e2e --quick`, for real: `oirl train` (PPO and GRPO) and TRL's GRPOTrainer in its own environment (built
on first use) on the same prompts with completions forced to the cap, plus the compute floor, in one invocation."""

import json
import subprocess
import sys

import pytest
import torch

from oirl.config import REPO_ROOT
from tests.conftest import requires_loopback

pytestmark = [pytest.mark.slow, requires_loopback]


def test_quick_e2e_benchmark_compares_oirl_and_trl_on_equal_work(tmp_path):
    ready = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "trl_env.sh"), "--check"], capture_output=True,
                           text=True, timeout=120)
    if ready.returncode != 0:
        pytest.skip("TRL's venv is not built (deploy/setup.sh builds it from PyPI: bash benchmarks/trl_env.sh)")
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "bench", "e2e", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "e2e.json").read_text())
    w = r["workload"]
    per_iteration = w["prompts"] * w["samples"]
    cap = w["max_new_tokens"]

    for key in ("oirl_samples_per_s", "trl_samples_per_s", "ratio_vs_trl", "floor_seconds", "iteration_seconds",
                "matmul_gflops", "generate_seconds", "reward_seconds", "prepare_seconds", "update_seconds",
                "sync_seconds"):
        assert r[key] > 0, (key, r[key])
    assert r["algorithm"] == "ppo"
    assert r["ratio_vs_trl"] == pytest.approx(r["oirl_samples_per_s"] / r["trl_samples_per_s"])
    assert r["oirl_samples_per_s"] == pytest.approx(per_iteration / r["iteration_seconds"])
    assert r["sync_share"] == pytest.approx(r["sync_seconds"] / r["iteration_seconds"])
    assert r["trl_samples_per_s"] == max(t["samples_per_s"] for t in r["trl"].values())
    assert r["floor_seconds"] == pytest.approx(r["flops_per_iteration"]["total"] / (r["matmul_gflops"] * 1e9))

    # Both oirl algorithms ran the real CLI, every completion exactly at the cap.
    assert {r["oirl"][k]["algorithm"] for k in r["oirl"]} == {"ppo", "grpo"}
    assert r["ratio_vs_trl_grpo"] == pytest.approx(r["oirl_grpo_samples_per_s"] / r["trl_samples_per_s"])
    for run in r["oirl"].values():
        assert run["iterations"] == w["iterations"] and run["samples_per_iteration"] == per_iteration
        assert run["response_tokens_mean_per_iteration"] == [cap] * w["iterations"]
        assert run["prompt_tokens_mean_per_iteration"] == pytest.approx(r["tokens"]["prompt_tokens_mean_per_iteration"])

    # TRL: both layouts, same number of completions, all at the cap, on the same prompts.
    assert set(r["trl"]) == {"one_process", "ddp_two_processes"}
    oirl_prompt_mean = sum(r["tokens"]["prompt_tokens_mean_per_iteration"]) / w["iterations"]
    for layout in r["trl"].values():
        assert layout["steps"] == w["iterations"] and layout["samples_per_step"] == per_iteration
        assert layout["completions"] == per_iteration * w["iterations"]
        assert layout["completion_lengths_min_max"] == [cap, cap]
        assert layout["prompt_tokens_mean"] == pytest.approx(oirl_prompt_mean)
    assert r["trl"]["ddp_two_processes"]["processes"] == 2
    assert r["trl_ppo"]["ran"] is False and "PPO" in r["trl_ppo"]["why"]

    venv = r["versions"]["trl_venv"]
    assert venv["trl"] == "1.16.0" and venv["torch"] == torch.__version__ and venv["heavy_packages_present"] == []
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
