"""get_all, the one wait every remote call of the loop goes through, on real Ray actors: it times out naming the
calls still running, and it returns as soon as any call fails, naming that actor, however long an earlier call in
the list would still take."""

import os
import time

import pytest
import ray

from oirl.remote import ActorDiedError, RemoteError, get_all


@ray.remote(num_cpus=0)
class Sleeper:
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self) -> None:
        raise ValueError("bad row 3")

    def die(self) -> None:
        os._exit(1)


@pytest.fixture(scope="module")
def actors(ray_cluster):
    group = [Sleeper.remote() for _ in range(2)]
    ray.get([a.nap.remote(0) for a in group], timeout=60)  # both started
    yield group
    for a in group:
        ray.kill(a)


def test_results_come_back_in_order(actors):
    assert get_all([actors[0].nap.remote(0.2), actors[1].nap.remote(0)], 30, "naps") == [0.2, 0]


def test_a_call_past_the_timeout_is_named(actors):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"prepare did not finish within 0.5s \(still running: rank 1\); "
                                           "raise learner.timeout_s"):
        get_all([actors[0].nap.remote(0), actors[1].nap.remote(3)], 0.5, "prepare", ["rank 0", "rank 1"],
                hint="raise learner.timeout_s")
    assert time.monotonic() - t0 < 2.5  # not after the 3 s call


def test_a_failed_call_is_reported_before_an_earlier_slow_one_finishes(actors):
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="(?s)update: rank 1 failed: .*bad row 3"):
        get_all([actors[0].nap.remote(5), actors[1].fail.remote()], 60, "update", ["rank 0", "rank 1"])
    assert time.monotonic() - t0 < 4.0  # ray.get(list) would have waited for rank 0's 5 s first


def test_a_dead_actor_is_named_with_its_index(ray_cluster):
    slow, doomed = Sleeper.remote(), Sleeper.remote()
    ray.get([slow.nap.remote(0), doomed.nap.remote(0)], timeout=60)
    t0 = time.monotonic()
    with pytest.raises(ActorDiedError, match=r"generate: actor engine 1 died") as err:
        get_all([slow.nap.remote(5), doomed.die.remote()], 60, "generate", ["engine 0", "engine 1"])
    assert err.value.index == 1 and time.monotonic() - t0 < 4.0
    ray.kill(slow)
