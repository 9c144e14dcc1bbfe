"""A user reward function that is slow on purpose (imported by path inside the reward actor)."""

import time


def slow(prompt: str, response: str, reference: str) -> float:
    time.sleep(0.3)
    return float(len(response))


def slow_if_asked(prompt: str, response: str, reference: str) -> float:
    time.sleep(1.0 if "slow" in response else 0.0)
    return float(len(response))
