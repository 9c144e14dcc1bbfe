"""The reward actor under failure: killed mid-call it is restarted and the call retried; without restarts the
caller gets a clear error at once, never a hang."""

import os
import signal
import time

import pytest
import ray

from oirl.batch import make_rollout_batch
from reward_server.reward_worker import RewardConfig, spawn_reward_actor

pytestmark = pytest.mark.slow


def batch(n=6):
    return make_rollout_batch(list(range(n)), [0] * n, [[1, 2]] * n, [[5 + i] * (i + 1) for i in range(n)],
                              [[0.0] * (i + 1) for i in range(n)], ["stop"] * n, 0)


def _kill_during_call(actor, b):
    pid = ray.get(actor.pid.remote(), timeout=120)
    ref = actor.score.remote(b)
    time.sleep(0.8)  # the call is inside the slow reward function now
    os.kill(pid, signal.SIGKILL)
    return ref, pid


def test_killed_reward_actor_is_restarted_and_the_call_retried(ray_cluster, tiny_model_path):
    cfg = RewardConfig(kind="none", function="tests.reward_server.slow_reward:slow", max_restarts=1)
    actor = spawn_reward_actor(cfg, tiny_model_path)
    b = batch()
    expected = ray.get(actor.score.remote(b), timeout=120)
    ref, pid = _kill_during_call(actor, b)
    got = ray.get(ref, timeout=180)
    assert list(got) == list(expected)
    assert ray.get(actor.pid.remote(), timeout=60) != pid  # a new process answered
    ray.kill(actor)


def test_without_restarts_the_caller_gets_a_clear_error(ray_cluster, tiny_model_path):
    cfg = RewardConfig(kind="none", function="tests.reward_server.slow_reward:slow", max_restarts=0)
    actor = spawn_reward_actor(cfg, tiny_model_path, name="oirl-reward-fault-test")
    ref, _ = _kill_during_call(actor, batch())
    t0 = time.time()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ref, timeout=120)
    assert time.time() - t0 < 60
