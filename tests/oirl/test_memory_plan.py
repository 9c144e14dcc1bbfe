"""oirl/memory_plan.py (`oirl plan --memory`): the architectures count what transformers builds, the activation
formula counts what autograd saves, the whole plan holds against the measured peak of real learner ranks (the tiny
model here, SmolLM2-135M from benchmarks/results/memory_plan.json), and configs/gpu.yaml fits 7B and 8B at 80 GiB
with the settings the plan chose (and does not without them)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from oirl.config import REPO_ROOT, load_config
from oirl.memory_plan import (
    ARCHITECTURES,
    GIB,
    Architecture,
    config_architecture,
    learner_plan,
    learner_remedies,
    plan_model,
)

if str(REPO_ROOT) not in sys.path:  # plain `pytest` leaves the root off the path
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import memory_plan as bench  # noqa: E402


def hf_model(arch: Architecture, device: str = "meta"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if arch.qkv_bias else (LlamaForCausalLM, LlamaConfig)
    config = cfg_cls(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                     num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                     head_dim=arch.head_dim, tie_word_embeddings=arch.tied)
    with torch.device(device):
        return cls(config)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_table_architectures_hold_what_transformers_builds(name):
    arch = ARCHITECTURES[name]
    assert arch.params() == sum(p.numel() for p in hf_model(arch).parameters())
    published = {"qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9, "qwen2.5-32b": 32.76e9, "llama-3.1-8b": 8.03e9,
                 "llama-3.2-1b": 1.24e9, "smollm2-135m": 0.135e9}[name]
    assert arch.params() == pytest.approx(published, rel=0.01)


def test_the_config_s_model_is_read_from_its_config_json(tiny_model_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", [], check_paths=False)
    arch, source = config_architecture(cfg)
    assert source == tiny_model_path
    assert arch.params() == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_path).parameters())
    gpu = load_config(REPO_ROOT / "configs" / "gpu.yaml", [], check_paths=False)
    assert config_architecture(gpu)[0] is None  # /models/policy is on the cluster's volume, not here


def saved_bytes_per_token_layer(arch: Architecture, dtype, seq: int, checkpointing: bool,
                                autocast: bool = False) -> float:
    """Bytes autograd saves per token for one decoder layer: a 2-layer minus a 1-layer model, storages counted
    once, with a padding mask as the learner's batches have; under autocast, per token (two batch sizes apart:
    the bf16 weight casts it also keeps do not grow with the batch)."""
    def saved(layers: int, rows: int = 2) -> int:
        model = hf_model(dataclasses.replace(arch, layers=layers), "cpu").to(dtype)
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}
        kept = []  # every saved tensor stays alive until counted: no address is reused for another one

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                kept.append(t)
            return t

        ids = torch.randint(0, arch.vocab, (rows, seq))
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[1, seq // 2:] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.model(input_ids=ids, attention_mask=mask)
        return sum(storages.values())

    if autocast:
        return ((saved(2, 4) - saved(1, 4)) - (saved(2, 2) - saved(1, 2))) / (2 * seq)
    return (saved(2) - saved(1)) / (2 * seq)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activation_formula_is_what_autograd_saves(dtype, qkv_bias):
    arch = Architecture("probe", hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=300,
                        tied=True, qkv_bias=qkv_bias)
    b = 4 if dtype == torch.float32 else 2
    for seq in (48, 96):
        assert saved_bytes_per_token_layer(arch, dtype, seq, False) == arch.layer_activation_bytes(b, seq)
    assert saved_bytes_per_token_layer(arch, dtype, 64, True) == b * arch.hidden  # checkpointing: the layer input
    if dtype == torch.float32:  # learner.update_autocast=bfloat16: fp32 weights, bf16 compute
        assert saved_bytes_per_token_layer(arch, dtype, 48, False, True) == arch.layer_activation_bytes(2, 48, True)


def within(plan_bytes: float, measured: float, tolerance: float) -> bool:
    return abs(plan_bytes - measured) <= tolerance * measured


def holds(r: dict) -> None:
    """The plan within the tolerance of the steady-state peak and of the whole run's, or of the plan plus one more
    reduce bucket: an update sometimes allocates DeepSpeed's next reduce bucket before the last one is freed (seen
    in about one update in six here, in either iteration: 316 or 506 MiB for the tiny rank, a 190 MiB bucket)."""
    plan = r["plan"]["peak_bytes"]
    bucket = r["plan"]["parts_bytes"]["reduce bucket (DeepSpeed)"]
    for measured in (r["measured_steady_peak_bytes"], r["measured_peak_bytes"]):
        assert within(plan, measured, bench.TOLERANCE) or within(plan + bucket, measured, bench.TOLERANCE), \
            (r["variant"], plan / 2**20, bucket / 2**20, measured / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "tiny-grad-ckpt", "tiny-bf16"])
def test_plan_holds_against_the_measured_peak_of_a_tiny_rank(variant, tmp_path):
    """A real rank (DeepSpeed ZeRO-2 over gloo, in a process of its own as the benchmark runs it) trained twice on
    a worst-case batch; the peak of live tensor bytes over setup, prepare and update against the plan's peak."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--worker", variant, str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    holds(r)
    assert r["plan"]["peak_moment"] == "backward"
    peaks = r["measured"]["peak_bytes"]
    assert max(peaks, key=peaks.get).startswith("update")


def test_plan_holds_against_the_committed_135m_measurements():
    """benchmarks/results/memory_plan.json measured SmolLM2-135M ranks (too slow to repeat in the suite); the plan
    recomputed now for the same configs must still lie within the tolerance of each measured peak."""
    results = {r["variant"]: r for r in json.loads(
        (REPO_ROOT / "benchmarks" / "results" / "memory_plan.json").read_text())["results"]}
    assert {"smollm2-fp32", "smollm2-grad-ckpt", "smollm2-default"} <= set(results)
    for name in ("smollm2-fp32", "smollm2-grad-ckpt", "smollm2-default"):
        r = bench.compare(name, results[name]["measured"])  # the plan of today's code beside the measurement
        assert r["plan"]["peak_bytes"] == learner_plan(bench.variant_config(name),
                                                       ARCHITECTURES["smollm2-135m"]).peak_bytes
        holds(r)
    # and checkpointing's saving, planned and measured alike
    saved = (results["smollm2-fp32"]["measured_steady_peak_bytes"]
             - results["smollm2-grad-ckpt"]["measured_steady_peak_bytes"])
    planned = (learner_plan(bench.variant_config("smollm2-fp32"), ARCHITECTURES["smollm2-135m"]).peak_bytes
               - learner_plan(bench.variant_config("smollm2-grad-ckpt"), ARCHITECTURES["smollm2-135m"]).peak_bytes)
    assert saved > 0 and within(planned, saved, 0.25), (planned / GIB, saved / GIB)


def plan_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "oirl.cli", "plan", "--memory", "--json", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else proc.stderr


def test_gpu_yaml_fits_7b_and_8b_on_80_gib_and_would_not_without_its_settings():
    rc, out = plan_cli("--config", "configs/gpu.yaml", "--gpu-memory-gib", "80", "--model", "qwen2.5-7b",
                       "--model", "llama-3.1-8b")
    assert rc == 0, out
    for model in out["models"]:
        assert model["fits"] and not model["advice"], model["model"]
        learner = model["roles"][0]
        assert learner["role"] == "learner" and learner["peak_bytes"] <= 80 * GIB
    rc, out = plan_cli("--config", "configs/gpu.yaml", "--model", "qwen2.5-7b", "learner.gradient_checkpointing=false")
    assert rc == 1
    (model,) = out["models"]
    assert not model["fits"] and "learner.gradient_checkpointing=true" in model["advice"][0]


def test_the_table_is_planned_beside_the_config_s_model(tiny_model_path):
    rc, out = plan_cli("--config", "configs/gpu.yaml")
    assert rc == 0  # the table is for reading; only a model asked for by name decides
    names = [m["model"] for m in out["models"]]
    assert names == ["qwen2.5-1.5b", "llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b", "qwen2.5-32b"]
    assert any("no config.json" in n for n in out["notes"])
    big = out["models"][-1]
    assert not big["fits"] and "learner" in big["advice"][0]
    rc, out = plan_cli("--config", "configs/smoke.yaml")
    assert rc == 0 and out["models"][0]["source"].startswith("the config's model")


def test_remedies_are_applied_until_the_rank_fits():
    cfg = load_config(REPO_ROOT / "configs" / "gpu.yaml", ["learner.gradient_checkpointing=false",
                                                            "learner.ref_offload=false"], check_paths=False)
    arch = ARCHITECTURES["qwen2.5-7b"]
    limit = 48 * GIB
    assert learner_plan(cfg, arch).peak_bytes > limit
    steps, fits = learner_remedies(cfg, arch, limit)
    assert fits and steps[0].startswith("learner.gradient_checkpointing=true")
    overrides = [s.split(" ")[0] for s in steps]
    fixed = load_config(REPO_ROOT / "configs" / "gpu.yaml", ["learner.gradient_checkpointing=false",
                                                              "learner.ref_offload=false", *overrides],
                        check_paths=False)
    assert learner_plan(fixed, arch).peak_bytes <= limit
    plan = plan_model(cfg, arch, limit)
    assert plan.advice and all(s in plan.advice[0] for s in steps)
