"""benchmarks/gpu_check.py: its CPU run, for real, as a bare GPU machine would run it (no Ray).

- `python -m benchmarks.gpu_check --device cpu --tiny --out DIR` exits 0 and its JSON has every phase timed,
  tokens/s, peak memory, export bytes equal to the model's parameter bytes, an update that changed every
  tensor; it runs with `import ray` made to fail, and leaves no export file behind;
- the shapes it builds hold exactly the parameters that transformers instantiates, and a random model folder
  it writes loads back with the tiny model's tokenizer;
- the 'largest' memory rule picks the biggest shape that fits and says why;
- MFU: the peak table matches device names (H100 PCIe is not an H100 SXM, an A10G not an A10);
- the engine-vs-learner agreement (vLLM importable here): fp32 agrees to rounding, bf16 visibly less, over real
  sampled tokens; the statistics are the on-policy check's (hand-computed case);
- the time budget: jobs that would start too late are listed as skipped and the JSON is still written.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from oirl.config import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root off the path
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, gpu_check.HIDE_RAY_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--out",
                           str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_cpu_tiny_run_reports_every_phase(report):
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["torch"] and report["deepspeed"]
    assert "ru_maxrss" in report["peak_memory_kind"]
    (model,) = report["models"]
    assert model["name"] == "tiny" and "error" not in model, model.get("traceback")
    assert model["params"] > 0
    assert set(model["phases"]) == {"setup", "prepare", "update", "export"}
    assert all(v > 0 for v in model["phases"].values()), model["phases"]
    assert set(model["first_iteration"]) == {"prepare", "update", "export"}
    assert model["tokens_per_s"] > 0 and model["export_gbps"] > 0 and model["approx_tflops"] > 0
    assert model["update_tflops"] > 0 and model["mfu"] is None and model["peak_bf16_tflops"] is None  # CPU
    assert model["peak_memory_bytes"] > 0
    assert model["tokens"]["total"] == model["tokens"]["prompt"] + model["tokens"]["response"] > 0


def test_export_is_the_whole_policy_and_the_update_moved_every_tensor(report):
    (model,) = report["models"]
    assert model["export_bytes"] == model["param_bytes"] == 4 * model["params"]  # float32, no value head
    assert model["export_buckets"] >= 1 and len(model["export_fingerprint"]) == 32
    changed = model["weights_changed"]
    assert changed["tensors"] > 0 and changed["tensors_changed"] == changed["tensors"], changed
    assert model["update_stats"]["learner/grad_norm"] > 0


def test_runs_without_ray_and_leaves_no_export_files(report):
    (model,) = report["models"]  # this run had `import ray` failing (HIDE_RAY_ENV), as on a bare GPU box
    assert any(n.startswith("ray absent:") for n in model["notes"]), model["notes"]
    assert os.path.isdir(model["export_dir"])  # the folder it exported into, still there; its files are not
    assert not glob.glob(os.path.join(model["export_dir"], f"oirl-{model['run_id']}*"))


@pytest.mark.parametrize("shape", [gpu_check.SMOLLM2_135M, gpu_check.LLAMA_1B, gpu_check.LLAMA_3B,
                                   gpu_check.LLAMA_8B.with_layers(2)])
def test_shape_params_match_transformers(shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape.llama_config()))
    assert shape.params() == sum(p.numel() for p in model.parameters())


def test_random_model_folder_loads_with_the_tiny_tokenizer(tmp_path, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = gpu_check.LlamaShape(hidden=64, intermediate=96, layers=2, heads=2, kv_heads=1, head_dim=32,
                                 vocab=700, tied=False)
    gpu_check._build_random(shape, tmp_path / "m", gpu_check.Path(tiny_model_path), torch.device("cpu"),
                            torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == shape.params()
    assert AutoTokenizer.from_pretrained(tmp_path / "m").pad_token_id == 0


def test_largest_rule_picks_the_biggest_shape_that_fits():
    batch, mbs, fwd = gpu_check.GPU_BATCH, 4, 16
    gib = gpu_check.GIB
    h100, why = gpu_check.largest_shape(int(0.9 * 79 * gib), batch, mbs, fwd)
    assert gpu_check.estimate_peak_bytes(h100, batch, mbs, fwd) <= 0.9 * 79 * gib
    assert gpu_check.estimate_peak_bytes(h100.with_layers(h100.layers + 1), batch, mbs, fwd) > 0.9 * 79 * gib
    assert 2e9 < h100.params() < gpu_check.LLAMA_3B.params() and "26 B/param" in why and "budget" in why
    h200, _ = gpu_check.largest_shape(int(0.9 * 139 * gib), batch, mbs, fwd)
    assert h200.params() > h100.params() and h200.hidden == gpu_check.LLAMA_8B.hidden
    small, _ = gpu_check.largest_shape(20 * gib, batch, mbs, fwd)
    assert small.hidden == gpu_check.LLAMA_1B.hidden and small.layers < gpu_check.LLAMA_1B.layers
    with pytest.raises(RuntimeError, match="fits"):
        gpu_check.largest_shape(gib, batch, mbs, fwd)
    assert gpu_check.estimate_peak_bytes(gpu_check.LLAMA_1B, batch, mbs, fwd) < 40 * gib


@pytest.mark.parametrize("name, entry", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"), ("Tesla T4", None), ("cpu", None)])
def test_peak_table_matches_device_names(name, entry):
    found = gpu_check.peak_bf16_tflops(name)
    assert (found[0] if found else None) == entry
    if entry == "H100 SXM":
        assert found[1] == 989.0 and gpu_check.peak_bf16_tflops("NVIDIA A10G")[1] < gpu_check.peak_bf16_tflops(
            "NVIDIA A10")[1]


def test_agreement_statistics_hand_computed():
    import math

    stats = gpu_check.agreement_stats([[-1.0, -2.0], [-0.5]], [[-1.05, -2.3], [-0.5]])
    log_r = [-0.05, -0.3, 0.0]
    assert stats["tokens"] == 3
    assert stats["frac_over"]["0.1"] == pytest.approx(1 / 3) and stats["frac_over"]["0.01"] == pytest.approx(2 / 3)
    assert stats["max_abs_diff"] == pytest.approx(0.3)
    assert stats["mismatch_k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in log_r) / 3)
    assert stats["mismatch_ppl_ratio"] == pytest.approx(math.exp(0.35 / 3))


def test_engine_and_learner_agreement_fp32_vs_bf16(report):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not importable here: gpu_check skips the agreement (see report['skipped'])")
    runs = {r["name"]: r for r in report["agreement"]}
    assert set(runs) == {"agreement-float32", "agreement-bfloat16"}, report["skipped"]
    for r in runs.values():
        assert "error" not in r, r.get("traceback")
        a = r["agreement"]
        assert a["tokens"] > 0 and a["mismatch_k3_kl"] >= 0 and r["samples"] > 0
        fracs = [a["frac_over"][k] for k in ("0.001", "0.01", "0.05", "0.1", "0.2", "0.5")]
        assert fracs == sorted(fracs, reverse=True) and all(0 <= f <= 1 for f in fracs)
    fp32, bf16 = runs["agreement-float32"]["agreement"], runs["agreement-bfloat16"]["agreement"]
    assert fp32["max_abs_diff"] < 1e-3  # the same weights in fp32: kernel rounding only
    assert bf16["mean_abs_diff"] > 10 * fp32["mean_abs_diff"]  # bf16's noise is measured, not a self-comparison


def test_time_budget_skips_what_would_start_too_late(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--time-budget-s", "1"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and report["models"] == [] and report["agreement"] == []
    assert any(s.startswith("tiny:") for s in report["skipped"]), report["skipped"]
