"""benchmarks/sync.py --quick, for real (tiny model, one learner rank, one vLLM engine): every transport has its
seconds beside the floor and the per-parameter baseline, the bytes are the model folder's, and the baseline loaded
the right weights (its canary matches the learner)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from oirl.config import REPO_ROOT
from tests.conftest import requires_loopback

pytestmark = [pytest.mark.slow, requires_loopback]


def test_quick_sync_benchmark_reports_floor_and_per_param_for_every_transport(tmp_path, tiny_model_path):
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "bench", "sync", "--quick", "--out", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "sync.json").read_text())
    sizes = result["sizes"]
    assert [e["transport"] for e in sizes] == ["shm", "object_store", "collective"]
    names, nbytes = 0, 0  # counted independently, from the model folder the engine loaded
    for f in Path(tiny_model_path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                names += 1
                nbytes += t.numel() * t.element_size()
    for e in sizes:
        assert e["bytes"] == nbytes and e["per_param_tensors"] == names
        assert e["seconds"] > 0 and 0 < e["floor_seconds"] and e["per_param_seconds"] > 0
        assert e["ratio_vs_floor"] == pytest.approx(e["seconds"] / e["floor_seconds"])
        assert e["per_param_canary_logprob_max_abs_diff"] < 1e-3 and e["canary_logprob_max_abs_diff"] < 1e-3
        assert {"pack_s", "engine_reload_s", "engine_verify_s"} <= set(e["breakdown_median"])
