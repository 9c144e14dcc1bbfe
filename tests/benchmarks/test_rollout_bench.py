"""benchmarks/rollout.py --quick, for real: the RolloutWorker path, raw vLLM and transformers generate on the same
prompts with EOS ignored, so each did exactly prompts x samples x max_new_tokens tokens per round."""

import json
import subprocess
import sys

import pytest

from oirl.config import REPO_ROOT
from tests.conftest import requires_loopback

pytestmark = [pytest.mark.slow, requires_loopback]


def test_quick_rollout_benchmark_compares_equal_work(tmp_path, tiny_model_path):
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "bench", "rollout", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "rollout.json").read_text())
    w = r["workload"]
    per_round = w["prompts"] * w["samples"] * w["max_new_tokens"]
    for key in ("oirl_rounds", "vllm_rounds", "hf_rounds"):
        assert r[key] and all(x["tokens"] == per_round and x["tokens_per_s"] > 0 for x in r[key]), r[key]
    assert len(r["oirl_rounds"]) == len(r["vllm_rounds"]) == r["rounds"]
    assert r["ratio_vs_vllm"] == pytest.approx(r["oirl_tokens_per_s"] / r["vllm_tokens_per_s"])
