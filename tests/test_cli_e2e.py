"""End to end: the real `oirl train` CLI as a subprocess on configs/smoke.yaml (real Ray, vLLM, DeepSpeed).

- the smoke run: >= 3 iterations, iteration k generates with version k, verified sync, the final HF folder loads in
  transformers and vLLM;
- learning on the synthetic task, and the same run with the advantage sign flipped must not learn;
- kill -9 of the driver mid-run, then --resume continues from the last checkpoint and reproduces the
  uninterrupted run exactly;
- bad config values and malformed dataset rows fail before any actor starts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import oirl_cmd, requires_loopback

from oirl.config import REPO_ROOT

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")
LEARN_ITERS = 12


def run_cli(out: Path, *overrides: str, resume: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [*oirl_cmd(), "train", "--config", SMOKE, "--out", str(out), "--no-progress", *overrides]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"oirl train failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    run_cli(out, f"iterations={LEARN_ITERS}", "checkpoint_every=0")
    return out


@pytest.mark.slow
@requires_loopback
def test_smoke_run_is_on_policy_and_verified(learning_run):
    from transformers import AutoModelForCausalLM

    rows = metrics(learning_run)
    assert [r["iteration"] for r in rows] == list(range(LEARN_ITERS))
    final = learning_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for k, r in enumerate(rows):
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == k
        assert r["sync/logprob_max_abs_diff"] < 1e-3
        assert r["sync/bytes"] == param_bytes
        assert r["sync/seconds"] > 0 and r["sync/gbps"] > 0
        assert r["rollout/engine_learner_logprob_max_abs_diff"] < 1e-3
        for phase in ("generate", "reward", "prepare", "update", "sync", "checkpoint", "iteration"):
            assert r[f"timing_s/{phase}"] >= 0
        for key in ("reward/mean", "kl/mean", "learner/policy_loss", "learner/value_loss", "perf/gen_tokens_per_s"):
            assert key in r
    assert (learning_run / "curves.png").stat().st_size > 10_000
    assert any((learning_run / "tensorboard").iterdir())
    # The final policy differs from the initial weights and vLLM serves it.
    probe = (
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(final)!r}, dtype='float32', enforce_eager=True, distributed_executor_backend='uni')\n"
        "out = llm.generate(['Say some digits: 1 2'], SamplingParams(max_tokens=4, temperature=0))\n"
        "print('GENERATED', len(out[0].outputs[0].token_ids))\n"
        "llm.llm_engine.engine_core.shutdown()\n"
    )
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert "GENERATED 4" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.slow
@requires_loopback
def test_ppo_learns_the_synthetic_task_and_flipped_sign_does_not(learning_run, tmp_path):
    def gain(rows):
        rewards = [r["reward/mean"] for r in rows]
        return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3

    learned = gain(metrics(learning_run))
    flipped_out = tmp_path / "flipped"
    run_cli(flipped_out, f"iterations={LEARN_ITERS}", "checkpoint_every=0", "learner.flip_advantage_sign=true")
    flipped = gain(metrics(flipped_out))
    assert learned > 0.1, f"reward rose by only {learned:.3f}"
    assert flipped < 0.02, f"a flipped advantage sign should not learn, but reward rose by {flipped:.3f}"


@pytest.mark.slow
@requires_loopback
def test_kill9_then_resume_continues_from_last_checkpoint(learning_run, tmp_path):
    out = tmp_path / "resume"
    overrides = ["iterations=6", "checkpoint_every=2"]
    cmd = [*oirl_cmd(), "train", "--config", SMOKE, "--out", str(out), "--no-progress", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            if latest.is_file() and latest.read_text().strip() >= "iter_000002":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint within 400 s")
        proc.send_signal(signal.SIGKILL)  # the driver dies without any cleanup
        proc.wait(timeout=30)
    finally:
        try:  # reap what the dead driver started (its embedded Ray), by process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ckpt_iter = int(latest.read_text().strip().split("_")[1])
    assert 2 <= ckpt_iter < 6
    assert len(metrics(out)) >= ckpt_iter
    run_cli(out, *overrides, resume=True)
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == list(range(6))
    # Same data position, optimizer state, weights and sampling seeds: the resumed run reproduces the
    # uninterrupted one iteration for iteration.
    reference = metrics(learning_run)[:6]
    for got, want in zip(rows, reference):
        assert got["reward/mean"] == pytest.approx(want["reward/mean"], abs=1e-6), got["iteration"]
        assert got["rollout/policy_version_min"] == got["iteration"]


def test_bad_config_value_fails_before_any_actor(tmp_path):
    t0 = time.time()
    proc = subprocess.run([*oirl_cmd(), "train", "--config", SMOKE, "--out", str(tmp_path), "learner.zero_stage=7"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "learner.zero_stage=7 must be 0, 1, 2 or 3" in proc.stderr
    assert "Ray" not in proc.stderr and time.time() - t0 < 60


def test_malformed_dataset_row_fails_before_any_actor(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "What is 1+1?", "answer": "#### 2"})
    data.write_text(good + "\n" + json.dumps({"question": "Missing answer"}) + "\n")
    proc = subprocess.run([*oirl_cmd(), "train", "--config", SMOKE, "--out", str(tmp_path / "out"),
                           "data.source=gsm8k", f"data.path={data}", "reward.kind=gsm8k"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{data}:2: field 'answer' is missing or empty" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr and "RolloutWorker" not in proc.stderr
