"""End to end: the real `oirl train` CLI as a subprocess on configs/smoke.yaml (real Ray, vLLM, DeepSpeed).

- the smoke run: >= 3 iterations, iteration k generates with version k, verified sync, the final HF folder loads in
  transformers and vLLM;
- learning on the synthetic task, and the same run with the advantage sign flipped must not learn;
- kill -9 of the driver in each phase (OIRL_FAULT), then --resume: every metrics row exactly once, the
  uninterrupted run's rewards, no /dev/shm leftovers; killed actors recover or fail clearly;
- bad config values and malformed dataset rows fail before any actor starts.
"""

import glob
import json
import os
import re
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
        assert r["sync/bytes"] == r["sync/expected_bytes"] == param_bytes
        assert r["sync/seconds"] > 0 and r["sync/gbps"] > 0
        # The on-policy check, over every response token of both ranks, every iteration.
        assert r["rollout/engine_learner_logprob_max_abs_diff"] < 1e-3 and r["rollout/on_policy_checked"] == 1
        assert 0 <= r["rollout/engine_learner_logprob_mean_abs_diff"] <= r["rollout/engine_learner_logprob_max_abs_diff"]
        assert r["rollout/engine_learner_logprob_frac_over_tol"] == 0.0
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


# What a run computes (as opposed to how long it took or how much memory it used): equal to the bit on one machine.
TIMING = ("timing_s/", "perf/", "memory/", "sync/seconds", "sync/gbps", "sync/export_s", "sync/pack_s",
          "sync/engine_", "sync/served_check_s", "sync/canary_s", "rollout/engine_generate_s", "learner/peak_rss_mib")


@pytest.mark.slow
@requires_loopback
def test_two_identical_runs_give_identical_rows(learning_run, tmp_path):
    """Same config, same machine, same thread count: every computed value of every row is equal (the README's
    reproducibility statement). A shorter run reproduces the longer run's first rows: nothing depends on the
    number of iterations."""
    run_cli(tmp_path, "iterations=3", "checkpoint_every=0")
    for got, want in zip(metrics(tmp_path), metrics(learning_run)[:3]):
        computed = {k: v for k, v in want.items() if not k.startswith(TIMING)}
        assert len(computed) > 30
        assert {k: got.get(k) for k in computed} == computed, got["iteration"]


@pytest.mark.slow
@requires_loopback
def test_every_iteration_logs_the_peak_memory_of_every_process(learning_run):
    from oirl.config import load_config

    cfg = load_config(SMOKE)
    roles = (["driver", "reward"] + [f"engine{i}" for i in range(cfg.rollout.num_engines)]
             + [f"learner_rank{r}" for r in range(cfg.learner.num_ranks)])
    rows = metrics(learning_run)
    for r in rows:
        logged = sorted(k for k in r if k.startswith("memory/"))
        assert logged == sorted(f"memory/{role}_peak_rss_mib" for role in roles)
        # Every process holds at least its Python interpreter and torch (well over 100 MiB); none is unbounded.
        assert all(100 < r[k] < 64 * 1024 for k in logged), {k: r[k] for k in logged}
        # The per-rank values are the ones the learner's max over ranks was taken from (at update time, so <=).
        assert r["learner/peak_rss_mib"] <= max(r[f"memory/learner_rank{i}_peak_rss_mib"]
                                                for i in range(cfg.learner.num_ranks))
    # High-water marks of processes that live through the run never go down.
    for key in rows[0]:
        if key.startswith("memory/"):
            series = [r[key] for r in rows]
            assert series == sorted(series), (key, series)


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


def run_with_fault(out: Path, fault: str, *overrides: str, resume: bool | str = False,
                   timeout: int = 600, config: str = SMOKE) -> subprocess.CompletedProcess:
    """The CLI under OIRL_FAULT, in its own session; whatever the driver started is reaped by process group.
    resume: True for --resume, or the flag itself (--auto-resume)."""
    cmd = [*oirl_cmd(), "train", "--config", config, "--out", str(out), "--no-progress", *overrides]
    flag = [resume if isinstance(resume, str) else "--resume"] if resume else []
    proc = subprocess.Popen(cmd + flag, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OIRL_FAULT=fault))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def shm_files_of(out: Path) -> list[str]:
    """/dev/shm files of every run that wrote into ``out`` (run ids from the drivers' logs)."""
    run_ids = set(re.findall(r"run ([0-9a-f]{8}): \d+ engines", (out / "driver.log").read_text()))
    assert run_ids
    return [f for r in run_ids for f in glob.glob(f"/dev/shm/oirl-{r}*")]


PHASE_FAULTS = [f"kill:{phase}:{i + 1}" for i, phase in
                enumerate(("generate", "reward", "prepare", "update", "sync", "checkpoint"))]


@pytest.mark.slow
@requires_loopback
def test_kill9_in_every_phase_then_resume_loses_nothing(learning_run, tmp_path):
    """SIGKILL of the driver in the middle of each phase (one after the other, in the same run directory; each
    fault fires once), every time followed by the same command with --resume: in the end every metrics row exactly
    once, the rewards of the uninterrupted run, and no /dev/shm file of any of the killed runs."""
    out = tmp_path / "faults"
    overrides = ("iterations=7", "checkpoint_every=1")
    spec = ",".join(PHASE_FAULTS)
    log = out / "driver.log"
    out.mkdir()
    for attempt, fault in enumerate(PHASE_FAULTS):
        proc = run_with_fault(out, spec, *overrides, resume=attempt > 0)
        log.write_text(log.read_text() + proc.stderr if log.exists() else proc.stderr)
        assert proc.returncode == -signal.SIGKILL, f"{fault}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        assert f"killing the driver (SIGKILL) during {fault.split(':')[1]} of iteration {fault.split(':')[2]}" \
            in proc.stderr
        if fault.startswith("kill:sync"):
            left = shm_files_of(out)
            assert any(f.endswith(".bin") for f in left), "a kill mid-sync should leave bucket files behind"
    proc = run_with_fault(out, spec, *overrides, resume=True)
    log.write_text(log.read_text() + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == list(range(7))
    reference = metrics(learning_run)[:7]
    for got, want in zip(rows, reference):
        assert got["reward/mean"] == pytest.approx(want["reward/mean"], abs=1e-6), got["iteration"]
        assert got["rollout/policy_version_min"] == got["rollout/policy_version_max"] == got["iteration"]
    assert json.loads((out / "faults_fired.json").read_text()) == PHASE_FAULTS
    assert not shm_files_of(out), "the next start must remove a dead run's /dev/shm files"


@pytest.mark.slow
@requires_loopback
def test_actor_faults_recover_or_fail_clearly(tmp_path):
    """Engine killed mid-generate: replaced, synced and its shard regenerated (same samples). Reward actor killed
    mid-score: restarted, call retried. A learner rank killed mid-update: a prompt error naming the rank and
    --resume, after which the run completes as if nothing happened. Rewards are normalised with running moments:
    a restarted reward actor or a resume that lost them would change every later reward."""
    overrides = ("iterations=5", "checkpoint_every=1", "reward.normalize=true")
    reference = tmp_path / "reference"
    run_cli(reference, *overrides)
    first = metrics(reference)[0]  # normalised: the first batch's mean is 0 by construction; the raw one is logged
    assert abs(first["reward/mean"]) < 1e-5 and 0 < first["reward/raw_mean"] <= 1 and first["reward/raw_std"] > 0
    out = tmp_path / "actors"
    spec = "kill-actor:engine:1,kill-actor:reward:2,kill-actor:learner:3"
    proc = run_with_fault(out, spec, *overrides)  # a hang would end in TimeoutExpired, a failed test
    assert proc.returncode == 1, proc.stderr[-6000:]
    assert re.search(r"learner rank 1 \(oirl-learner-\w+-rank1\) died \(\w+\) \(its log: \S+/logs/learner-1\.log\)",
                     proc.stderr), proc.stderr[-4000:]
    assert "last committed checkpoint is iteration 3: continue with the same command plus --resume" in proc.stderr
    assert "replacing it (1/" in proc.stderr
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["rollout/engine_restarts"] for r in rows] == [0, 1, 1]
    # Without a resume flag the CLI refuses to start afresh over the committed run, before starting anything.
    proc = run_with_fault(out, spec, *overrides)
    assert proc.returncode == 2 and "holds a run with a committed checkpoint of iteration 3" in proc.stderr
    assert [r["iteration"] for r in metrics(out)] == [0, 1, 2]
    proc = run_with_fault(out, spec, *overrides, resume="--auto-resume")  # as a retried RayJob does
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resumed from" in proc.stderr
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == list(range(5))
    assert [r["rollout/engine_restarts"] for r in rows] == [0, 1, 1, 1, 1]  # the count survives the resume
    want_rows = metrics(reference)
    assert len({round(r["reward/mean"], 6) for r in want_rows}) > 1  # normalised, but not trivially 0
    for got, want in zip(rows, want_rows):
        for key in ("reward/mean", "reward/std"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["iteration"], key)


@pytest.mark.slow
@requires_loopback
def test_one_step_off_async_is_one_version_behind_learns_and_resumes_exactly(tmp_path):
    """rollout.async_steps=1: batch k+1 is generated with version k while the learner trains on batch k. Every
    batch after the first is exactly one version behind, importance weights are logged, it learns; and kill -9 in
    generate (a batch in flight) and in checkpoint, each followed by --resume, reproduce the uninterrupted run: the
    in-flight batch is stored with the checkpoint.

    An engine killed while batch `replaced` is in flight is replaced after the previous iteration's update,
    so it samples from version `replaced`: its rows must say so and pass the strict on-policy check."""
    full = tmp_path / "async"
    replaced = 8  # after the rows the resume below is compared with
    proc = run_with_fault(full, f"kill-actor:engine:{replaced}", f"iterations={LEARN_ITERS}", "checkpoint_every=0",
                          "rollout.async_steps=1")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "replacing it (1/" in proc.stderr
    rows = metrics(full)
    assert [r["iteration"] for r in rows] == list(range(LEARN_ITERS))
    assert rows[0]["rollout/staleness_max"] == 0 and rows[0]["rollout/policy_version_max"] == 0
    checked = "rollout/engine_learner_logprob_tokens_checked"
    # Generated inside its own phase, the first batch's engine time fits in it; the later ones were generated during
    # the previous iteration: their rate is over the engines' time, not over this iteration's near-empty phase.
    assert 0 < rows[0]["rollout/engine_generate_s"] <= rows[0]["timing_s/generate"]
    for prev, r in zip(rows, rows[1:]):
        assert 3 * r["timing_s/generate"] < r["rollout/engine_generate_s"] < prev["timing_s/iteration"]
        tokens = r["rollout/response_tokens_mean"] * r["rollout/samples"]
        assert r["perf/gen_tokens_per_s"] == pytest.approx(tokens / r["rollout/engine_generate_s"])
        assert 0 < r["learner/is_weight_mean"] <= 2.0 and r["learner/is_ratio_max"] > 0
        assert 0 <= r["learner/is_truncated_frac"] <= 1
        assert r["sync/logprob_max_abs_diff"] < 1e-3  # every sync still verified
        if r["iteration"] == replaced:  # sampled from the learner's weights: on-policy, checked, ratio 1
            assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == replaced
            assert r["rollout/staleness_max"] == 0 and r["rollout/engine_restarts"] == 1
            assert r[checked] == r["learner/tokens"] > 0 and r["rollout/on_policy_checked"] == 1
            assert r["rollout/engine_learner_logprob_max_abs_diff"] < 1e-3
            assert r["learner/is_ratio_max"] == pytest.approx(1.0, abs=2e-3)
        else:
            assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == r["iteration"] - 1
            # Nothing compared is reported as such, not as a difference of 0; the canary compared this version.
            assert r["rollout/staleness_max"] == 1 and r[checked] == 0 and r["rollout/on_policy_checked"] == 0
            assert "rollout/engine_learner_logprob_max_abs_diff" not in r
            assert r["sync/canary_tokens"] > 0
    rewards = [r["reward/mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3 > 0.1, rewards

    out = tmp_path / "faults"
    spec = "kill:generate:2,kill:checkpoint:3"
    overrides = ("iterations=5", "checkpoint_every=1", "rollout.async_steps=1")
    for attempt in range(2):
        proc = run_with_fault(out, spec, *overrides, resume=attempt > 0)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert json.loads((out / "checkpoints" / "committed.json").read_text())["prefetched"] is True
    proc = run_with_fault(out, spec, *overrides, resume=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = metrics(out)
    assert [r["iteration"] for r in got] == list(range(5))
    for g, want in zip(got, rows[:5]):
        assert g["reward/mean"] == pytest.approx(want["reward/mean"], abs=1e-6), g["iteration"]
        assert g["rollout/policy_version_min"] == want["rollout/policy_version_min"]


@pytest.mark.slow
@requires_loopback
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["strict", "one_step_off"])
def test_an_engine_that_silently_keeps_stale_weights_stops_the_run_naming_it(mode, dtype, tmp_path):
    """OIRL_FAULT=stale-engine:<it>: at the sync after iteration <it> the engine's worker receives and hashes the new
    weights (so the fingerprint matches) but does not load them, and reports success. What catches it is the digest
    the worker reads back from its model before and after the load (unchanged while new bytes arrived), at that
    very sync, in fp32 and in bf16, strictly on-policy and one-step-off. The logprob checks could not be relied on
    here: one update of the default job hides in bf16 noise (docs/checks.md has the numbers). bf16 end to end:
    configs/smoke_bf16.yaml, whose statistics-based checks pass its noise (its first iteration is checked and
    logged)."""
    it = 1
    extra = ["rollout.async_steps=1"] if mode == "one_step_off" else []
    config = str(REPO_ROOT / "configs" / "smoke_bf16.yaml") if dtype == "bfloat16" else SMOKE
    proc = run_with_fault(tmp_path, f"stale-engine:{it}", "iterations=4", "checkpoint_every=0", "sync.canary_every=0",
                          *extra, config=config)
    assert proc.returncode == 1, proc.stderr[-6000:]
    assert f"every engine skips the reload of the sync after iteration {it}" in proc.stderr
    assert re.search(r"engine 0 reports version \d+ loaded but serves the very weights it served before \(digest "
                     r"[0-9a-f]+\): its reload did not happen", proc.stderr), proc.stderr[-4000:]
    assert [r["iteration"] for r in metrics(tmp_path)] == [0], proc.stderr[-3000:]  # the sync of iteration 1
    first = metrics(tmp_path)[0]  # checked and passed before the fault: the noise of this precision
    assert first["rollout/on_policy_checked"] == 1 and first["rollout/engine_learner_logprob_tokens_checked"] > 0


@pytest.mark.slow
@requires_loopback
def test_dapo_drops_groups_without_signal_and_refills_and_gspo_runs(tmp_path):
    """learner.algorithm=dapo alone brings its recipe: with a reward that is constant for about half of the prompts,
    dynamic sampling generates more prompts until the batch holds only groups whose rewards differ, at its usual
    size; the overlong penalty applies (every smoke response runs to max_new_tokens). GSPO's sequence-level loss
    trains through the loop too."""
    run_cli(tmp_path / "dapo", "iterations=2", "checkpoint_every=0", "learner.algorithm=dapo", "reward.kind=none",
            "reward.function=tests.learner.partly_constant_reward:partly_constant")
    for r in metrics(tmp_path / "dapo"):
        assert r["rollout/dynamic_rounds"] >= 2, r["rollout/dynamic_rounds"]  # the first round had constant groups
        assert r["rollout/dynamic_informative_frac"] == 1.0 and r["rollout/samples"] == 32
        assert r["reward/overlong_penalty_mean"] < 0
    run_cli(tmp_path / "gspo", "iterations=2", "checkpoint_every=0", "learner.algorithm=gspo")
    rows = metrics(tmp_path / "gspo")
    assert rows[-1]["learner/policy_loss"] != 0 and "rollout/dynamic_rounds" not in rows[-1]


# Overrides, the least reward gain (mean of the last 3 iterations - of the first 3) that counts as learning, and
# whether a flipped-sign control run is needed. REINFORCE++ has no per-prompt baseline and climbs slowest here
# (measured: 0.06 -> 0.16 in 12 iterations, gain 0.044; noise on a 3-iteration mean is ~0.01), so it is held
# against its own flipped run. GRPO and RLOO must gain 0.1, ten times that noise, on the task and recipe whose
# flipped run test_ppo_learns_the_synthetic_task_and_flipped_sign_does_not already shows not to climb.
ALGORITHMS = {"grpo": (["learner.kl_in_loss=true"], 0.1, False), "rloo": (["learner.kl_in_loss=true"], 0.1, False),
              "reinforce_pp": ([], 0.03, True)}


@pytest.mark.slow
@requires_loopback
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_critic_free_algorithm_learns_and_flipped_sign_does_not(algorithm, tmp_path):
    def gain(out):
        rewards = [r["reward/mean"] for r in metrics(out)]
        return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3

    extra, least_gain, control = ALGORITHMS[algorithm]
    overrides = [f"iterations={LEARN_ITERS}", "checkpoint_every=0", f"learner.algorithm={algorithm}", *extra]
    run_cli(tmp_path / "learn", *overrides)
    learned = gain(tmp_path / "learn")
    assert learned > least_gain, f"{algorithm}: reward rose by only {learned:.3f}"
    if control:
        run_cli(tmp_path / "flipped", *overrides, "learner.flip_advantage_sign=true")
        flipped = gain(tmp_path / "flipped")
        assert flipped < 0.02, f"{algorithm}: a flipped advantage sign should not learn, but reward rose by {flipped:.3f}"
        assert learned - flipped > 0.05
    row = metrics(tmp_path / "learn")[-1]
    assert row["learner/value_loss"] == 0.0 and "learner/policy_loss" in row


@pytest.mark.slow
@requires_loopback
def test_a_dead_engine_past_max_restarts_stops_the_run_naming_it(tmp_path):
    proc = run_with_fault(tmp_path, "kill-actor:engine:1", "iterations=3", "checkpoint_every=1",
                          "rollout.max_restarts=0")
    assert proc.returncode == 1, proc.stderr[-6000:]
    assert ("engine 0 died during generate of iteration 1 and rollout.max_restarts=0 replacements are used up; "
            "rerun with --resume to continue from the last checkpoint") in proc.stderr
    # ... and where its output went (oirl/logs.py): the engine's file, and every role's folder
    assert f"(its log: {tmp_path}/logs/rollout-0.log)" in proc.stderr and (tmp_path / "logs" / "rollout-0.log").is_file()
    assert f"oirl: every role's output is in {tmp_path}/logs/" in proc.stderr
    assert "Traceback" not in proc.stderr.split("oirl: the run failed")[0]  # a dead engine's shutdown: no traceback
    assert [r["iteration"] for r in metrics(tmp_path)] == [0]


@pytest.mark.slow
@requires_loopback
def test_collective_transport_with_two_engines(tmp_path):
    """Learner rank 0 broadcasts every version over a gloo group it forms with both engines' workers; each worker
    hashes what it received, and the usual on-policy checks hold. An engine killed mid-generate is replaced and the
    group formed anew within a short sync.timeout_s: the replacement's vLLM start-up is waited for first, under
    rollout.timeout_s, so the sync's own timeout need not cover it."""
    out = tmp_path / "collective"
    proc = run_with_fault(out, "kill-actor:engine:1", "iterations=3", "checkpoint_every=0", "sync.transport=collective",
                          "rollout.num_engines=2", "sync.timeout_s=6")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "2 engines, 2 learner ranks (ZeRO-2), weight transport collective" in proc.stderr
    assert "replacing it (1/" in proc.stderr
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["rollout/engine_restarts"] for r in rows] == [0, 1, 1]
    for r in rows:
        assert r["rollout/policy_version_min"] == r["rollout/policy_version_max"] == r["iteration"]
        assert r["rollout/engine_learner_logprob_frac_over_tol"] == 0.0
        assert r["sync/bytes"] == r["sync/expected_bytes"] and r["sync/gbps"] > 0
        assert r["sync/logprob_max_abs_diff"] < 1e-3


def test_missing_reward_model_fails_at_start_naming_the_field(tmp_path):
    t0 = time.time()
    proc = subprocess.run([*oirl_cmd(), "train", "--config", SMOKE, "--out", str(tmp_path),
                           "reward.model_path=/nonexistent"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("HF_")})
    assert proc.returncode == 2
    assert "reward.model_path='/nonexistent'" in proc.stderr and "oirl train-rm" in proc.stderr
    assert "huggingface.co" not in proc.stderr and time.time() - t0 < 60


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
