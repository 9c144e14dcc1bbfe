"""`oirl bench memory --quick` and `oirl bench scaling --quick` for real (configs/smoke.yaml, the tiny model, real
Ray, vLLM and DeepSpeed): every role's peak memory, one entry per learner rank; the measured grid point and the
projections with their assumptions and peer checks. Values are checked for sense, never for speed."""

import glob
import json
import subprocess
import sys

import pytest

from oirl.config import REPO_ROOT, load_config
from tests.conftest import requires_loopback

pytestmark = [pytest.mark.slow, requires_loopback]
SMOKE = load_config(str(REPO_ROOT / "configs" / "smoke.yaml"))


def bench(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "bench", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_quick_memory_benchmark_reports_every_role(tmp_path):
    bench("memory", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "memory.json").read_text())
    roles = result["roles"]
    ranks = sorted(r for r in roles if r.startswith("learner_rank"))
    engines = sorted(r for r in roles if r.startswith("engine"))
    assert ranks == [f"learner_rank{r}" for r in range(SMOKE.learner.num_ranks)]
    assert engines == [f"engine{i}" for i in range(SMOKE.rollout.num_engines)]
    assert set(roles) == {"driver", "reward", *ranks, *engines}
    assert all(100 < v < 64 * 1024 for v in roles.values()), roles  # each holds Python + torch at least
    assert result["total_mib"] == pytest.approx(sum(roles.values()))
    # the whole tree sampled at one instant holds at least the largest single process
    assert result["sampled"]["samples"] > 0 and result["sampled"]["total_peak_mib"] >= 0.9 * max(roles.values())
    assert result["iterations"] == 2 and result["config"] == "configs/smoke.yaml"
    assert result["machine"]["cpus"] >= 1


def test_quick_scaling_benchmark_measures_and_projects(tmp_path):
    bench("scaling", "--quick", "--grid", "2x2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "scaling.json").read_text())
    (point,) = result["measured"]
    assert (point["engines"], point["ranks"]) == (2, 2)
    assert point["logical_cpus_asked"] == 2 * SMOKE.rollout.num_cpus + 2 * SMOKE.learner.num_cpus + SMOKE.reward.num_cpus
    assert point["iteration_seconds"] > 0 and point["tokens_per_s"] > 0 and point["iterations"] == 2
    # ignore_eos: every sample runs to max_new_tokens, so the generated tokens are known exactly
    assert point["generated_tokens_per_iteration"] == SMOKE.batch_size * SMOKE.rollout.max_new_tokens
    assert point["phase_seconds"]["generate"] < point["iteration_seconds"]

    projected = result["projected"]
    assert {(p["model_params"], p["gpus"]) for p in projected} == {(m, g) for m in (7e9, 70e9) for g in (8, 16, 32, 64)}
    for p in projected:
        a = p["assumptions"]
        assert a["gpu"]["peak_flops"] > 0 and a["gpu"]["hbm_bytes_per_s"] > 0 and a["gpu"]["network_bytes_per_s"] > 0
        assert 0 < a["efficiency"]["learner_mfu"] <= 1 and a["workload"]["samples"] > 0
        if p["fits"]:
            assert 0 < p["sync_seconds"] < p["iteration_seconds"]
            assert p["iteration_seconds"] == pytest.approx(p["generate_seconds"] + p["learner_seconds"]
                                                           + p["sync_seconds"])
        else:
            assert p["iteration_seconds"] is None and p["why"]
    fits = {(p["model_params"], p["gpus"]): p for p in projected if p["fits"]}
    assert fits[(70e9, 64)]["iteration_seconds"] > fits[(7e9, 64)]["iteration_seconds"]
    if not glob.glob(str(REPO_ROOT / "benchmarks" / "results" / "gpu_check_*.json")):
        assert result["calibration"]["learner_mfu"].startswith("absent")
    assert result["peer_checks"]
    for c in result["peer_checks"]:
        assert c["source"] and c["figure"] > 0 and c["ratio"] == pytest.approx(c["our_projection"] / c["figure"])
