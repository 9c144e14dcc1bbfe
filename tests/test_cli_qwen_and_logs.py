"""End to end with a second and a third architecture, and what the terminal shows (real CLI, Ray, vLLM, DeepSpeed).

- a tiny random Qwen3 (q_norm/k_norm, separate lm_head) and a tiny random Qwen2 (q/k/v biases, tied head) go
  through the whole loop: vLLM loads them and reloads every published tensor at each sync, the tensor count, the
  fingerprints, the strict on-policy check and the canary compare tokens and pass, and final/ loads in transformers
  and vLLM with equal logprobs;
- the Qwen3 run is the default, quiet one: no vLLM line on the terminal, each role's output in --out/logs; the Qwen2
  run has --verbose: vLLM's lines are on the terminal as before, and no actor writes a file.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oirl_cmd, requires_loopback

from oirl.config import REPO_ROOT, ModelConfig
from oirl.models import resolve_model

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")
ITERATIONS = 2
STRICT = ("sync.on_policy_action=error", "sync.on_policy_max_frac=0", "sync.on_policy_tolerance=1e-3",
          "sync.canary_every=1")
# vLLM's own log lines ("INFO 12-03 17:27:32 [inplace.py:91] Reloading weights inplace...") and the reload's
# harmless warning: rotary embeddings have no weights, and vLLM says so at every sync.
VLLM_LINE = re.compile(r"(INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+:\d+\]")
NOISE = "Failed to load weights"


def _run(out: Path, arch: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [*oirl_cmd(), "train", "--config", SMOKE, "--out", str(out), *flags, f"iterations={ITERATIONS}",
           "checkpoint_every=0", "model.path=tiny", f"model.tiny_architecture={arch}", *STRICT]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"oirl train failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def qwen3_quiet(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3")
    return out, _run(out, "qwen3")  # the progress bar on, as a user runs it


@pytest.fixture(scope="module")
def qwen2_verbose(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    return out, _run(out, "qwen2", "--verbose", "--no-progress")


def _rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _engine_logprobs(folder: Path, ids: list[int]) -> np.ndarray:
    """vLLM's logprob of every token after the first, from a fresh engine on ``folder`` (in its own process)."""
    probe = (
        "import json\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm.inputs import TokensPrompt\n"
        f"llm = LLM(model={str(folder)!r}, dtype='float32', enforce_eager=True, distributed_executor_backend='uni')\n"
        f"ids = {ids!r}\n"
        "out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))\n"
        "lps = out[0].prompt_logprobs\n"
        "print('LOGPROBS', json.dumps([lps[i][ids[i]].logprob for i in range(1, len(ids))]))\n"
        "llm.llm_engine.engine_core.shutdown()\n"
    )
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("LOGPROBS ")]
    assert line, proc.stderr[-4000:]
    import json

    return np.array(json.loads(line[0][len("LOGPROBS "):]))


def _assert_through_the_loop(out: Path, arch: str, own_tensors: tuple[str, ...]) -> None:
    """Every sync's checks compared something and passed; final/ holds trained weights of ``arch`` (its own
    tensors among them: a strict on-policy check can pass after training them only if the engine reloaded them),
    and vLLM serves final/ with the logprobs transformers computes from it."""
    from transformers import AutoModelForCausalLM

    rows = _rows(out)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert final.config.model_type == arch
    param_bytes = sum(p.numel() * p.element_size() for p in final.parameters())
    for k, r in enumerate(rows):
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == k
        # the strict on-policy check over every response token of both ranks: compared, within tolerance
        assert r["rollout/on_policy_checked"] == 1
        checked = r["rollout/engine_learner_logprob_tokens_checked"]
        assert checked > 0 and checked == pytest.approx(r["rollout/samples"] * r["rollout/response_tokens_mean"])
        assert r["rollout/engine_learner_logprob_frac_over_tol"] == 0.0
        assert r["rollout/engine_learner_logprob_max_abs_diff"] < 1e-3
        # the sync: every checkpoint tensor published once (the byte count from the checkpoint), the canary
        assert r["sync/bytes"] == r["sync/expected_bytes"] == param_bytes
        assert r["sync/canary_tokens"] > 0 and r["sync/logprob_max_abs_diff"] < 1e-3
        assert r["sync/canary_frac_over_tol"] == 0.0
    initial = AutoModelForCausalLM.from_pretrained(
        resolve_model(ModelConfig(path="tiny", tiny_architecture=arch)), dtype=torch.float32)
    before, after = dict(initial.named_parameters()), dict(final.named_parameters())
    assert before.keys() == after.keys()
    for name in own_tensors:
        assert name in after, name
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"
    ids = [1, 40, 7, 99, 200, 13, 250, 5, 77, 120, 31, 2]
    with torch.no_grad():
        lp = torch.log_softmax(final(torch.tensor([ids])).logits[0].float(), -1)
    hf = np.array([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    engine = _engine_logprobs(out / "final", ids)
    assert np.abs(engine - hf).max() < 1e-4, np.abs(engine - hf).max()
    with torch.no_grad():
        lp0 = torch.log_softmax(initial(torch.tensor([ids])).logits[0].float(), -1)
    assert np.abs(np.array([lp0[i - 1, ids[i]].item() for i in range(1, len(ids))]) - hf).max() > 1e-3


@pytest.mark.slow
@requires_loopback
def test_a_tiny_qwen3_trains_through_the_loop(qwen3_quiet):
    out, _ = qwen3_quiet
    _assert_through_the_loop(out, "qwen3", ("model.layers.0.self_attn.q_norm.weight",
                                            "model.layers.1.self_attn.k_norm.weight", "lm_head.weight"))


@pytest.mark.slow
@requires_loopback
def test_a_tiny_qwen2_trains_through_the_loop(qwen2_verbose):
    out, _ = qwen2_verbose
    _assert_through_the_loop(out, "qwen2", ("model.layers.0.self_attn.q_proj.bias",
                                            "model.layers.1.self_attn.k_proj.bias",
                                            "model.layers.1.self_attn.v_proj.bias"))


@pytest.mark.slow
@requires_loopback
def test_the_terminal_is_quiet_and_each_role_has_its_file(qwen3_quiet):
    out, proc = qwen3_quiet
    terminal = proc.stdout + proc.stderr
    assert not VLLM_LINE.search(terminal), VLLM_LINE.search(terminal)
    assert NOISE not in terminal and "Reloading and processing weights" not in terminal
    # What a user does see: the progress bar, oirl's own messages, the summary.
    assert "PPO: 100%" in proc.stderr
    assert re.search(r"INFO oirl\.driver: run \w+: 1 engines, 2 learner ranks", proc.stderr), proc.stderr[-3000:]
    assert f"final policy in {out}/final" in proc.stdout
    logs = out / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["driver.log", "learner-0.log", "learner-1.log",
                                                      "reward.log", "rollout-0.log"]
    engine = (logs / "rollout-0.log").read_text()
    # vLLM's lines are all there: its start-up, and one in-place reload per sync
    assert "Resolved architecture: Qwen3ForCausalLM" in engine
    syncs = sum("sync/seconds" in r for r in _rows(out))
    assert syncs >= ITERATIONS - 1 and engine.count("Reloading and processing weights took") == syncs
    assert NOISE in engine
    assert len(VLLM_LINE.findall(engine)) > 10
    for rank in (0, 1):
        assert f"learner-{rank}.log: pid" in (logs / f"learner-{rank}.log").read_text()
    assert "reward.log: pid" in (logs / "reward.log").read_text()
    driver = (logs / "driver.log").read_text()
    assert "Started a local Ray instance" in driver and "Started a local Ray instance" not in terminal
    assert "1 engines, 2 learner ranks" in driver


@pytest.mark.slow
@requires_loopback
def test_verbose_shows_vllm_on_the_terminal_and_writes_no_actor_files(qwen2_verbose):
    out, proc = qwen2_verbose
    terminal = proc.stdout + proc.stderr
    assert VLLM_LINE.search(terminal) and "Reloading and processing weights took" in terminal
    assert "Resolved architecture: Qwen2ForCausalLM" in terminal
    assert "Started a local Ray instance" in terminal
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["driver.log"]
